"""Hugging Face safetensors <-> our NNX Qwen2: one name table, strict loading, streamed tensor by tensor."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write
from saerl_jax.model.qwen2 import Qwen2, Qwen2Config

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(UserError):
    """A model directory that cannot be loaded: bad ``config.json``, or a missing, unexpected or mis-shaped
    tensor; the message names the file and the tensor."""


# HF tensor name -> (our state path with {i} for the layer, transpose?). Linear weights are stored
# [out, in] by PyTorch and [in, out] by nnx.Linear.
_NAME_TABLE: dict[str, tuple[str, bool]] = {
    r"model\.embed_tokens\.weight": ("embed_tokens.embedding", False),
    r"model\.norm\.weight": ("norm.weight", False),
    r"lm_head\.weight": ("lm_head.kernel", True),
    r"model\.layers\.(\d+)\.input_layernorm\.weight": ("layers.{i}.input_layernorm.weight", False),
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": (
        "layers.{i}.post_attention_layernorm.weight",
        False,
    ),
    r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight": ("layers.{i}.self_attn.{p}_proj.kernel", True),
    r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.bias": ("layers.{i}.self_attn.{p}_proj.bias", False),
    r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight": ("layers.{i}.mlp.{p}_proj.kernel", True),
}
_COMPILED = [(re.compile(pattern + r"\Z"), target) for pattern, target in _NAME_TABLE.items()]


def hf_to_path(name: str) -> tuple[str, bool] | None:
    """Our dotted state path for an HF tensor name, and whether it is transposed; None if unknown."""
    for pattern, (target, transpose) in _COMPILED:
        match = pattern.match(name)
        if match:
            groups = match.groups()
            path = target.format(i=groups[0] if groups else "", p=groups[1] if len(groups) > 1 else "")
            return path, transpose
    return None


def path_to_hf(path: str) -> str:
    """Inverse of :func:`hf_to_path` for the paths of our state."""
    parts = path.split(".")
    if parts[0] == "layers":
        return "model." + ".".join(parts[:-1]) + (".bias" if parts[-1] == "bias" else ".weight")
    if parts[0] == "lm_head":
        return "lm_head.weight"
    return "model." + parts[0] + ".weight"


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index_file, single_file = path / _INDEX_FILE, path / _SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index_file}: not a safetensors index (no weight_map): {err}") from err
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} names {file.name}, which does not exist")
        for file in sorted(set(files.values())):
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in files:
                        raise CheckpointError(f"{file}: tensor {name} is not listed in {index_file.name}")
        return files
    if single_file.is_file():
        with safe_open(single_file, framework="numpy") as f:
            return {name: single_file for name in f.keys()}  # noqa: SIM118
    raise FileNotFoundError(f"{path}: neither {_SINGLE_FILE} nor {_INDEX_FILE} found")


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> Qwen2:
    """Loads a local HF Qwen2 directory (``config.json`` + safetensors, single or sharded).

    Tensors are read one at a time, cast to ``dtype`` and placed on the default device, so host memory
    never holds a second copy of the model. Every expected tensor must be present with its exact
    shape and every stored tensor must be used (a stored ``lm_head.weight`` is ignored when the
    embeddings are tied); otherwise a :class:`CheckpointError` names the tensor and the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    try:
        config = Qwen2Config.from_pretrained(path)
    except ValueError as err:
        source = path / "config.json"
        raise CheckpointError(str(err) if str(err).startswith(str(source)) else f"{source}: {err}") from err
    files = _tensor_files(path)
    abstract = nnx.eval_shape(lambda: Qwen2(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    filled: set[str] = set()
    by_file = itertools.groupby(sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])), key=lambda kv: kv[1])
    for file, entries in by_file:
        with safe_open(file, framework="numpy") as f:
            for name, _ in entries:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                target = hf_to_path(name)
                if target is None or target[0] not in variables:
                    raise CheckpointError(f"{file}: unexpected tensor {name} (not part of {_describe(config)})")
                key, transpose = target
                expected = variables[key].get_value().shape
                stored_shape = tuple(f.get_slice(name).get_shape())
                if stored_shape != (expected[::-1] if transpose else expected):
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {list(stored_shape)}, "
                        f"expected {list(expected[::-1] if transpose else expected)}"
                    )
                array = f.get_tensor(name)
                variables[key].set_value(jax.device_put(jnp.asarray(array.T if transpose else array, dtype=dtype)))
                filled.add(key)
    missing = [path_to_hf(k) for k in variables if k not in filled]
    if missing:
        where = path / (_INDEX_FILE if (path / _INDEX_FILE).is_file() else _SINGLE_FILE)
        more = " ..." if len(missing) > 8 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:8])}{more}")
    return nnx.merge(graphdef, state)


def _describe(config: Qwen2Config) -> str:
    tied = "tied" if config.tie_word_embeddings else "untied"
    return f"a {config.num_hidden_layers}-layer Qwen2 with {tied} embeddings"


def hf_tensors(model: Qwen2) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(HF name, host array in PyTorch layout)`` for every parameter of ``model``."""
    for p, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, p))
        _, transpose = hf_to_path(path_to_hf(key))
        array = np.asarray(jax.device_get(variable.get_value()))
        yield path_to_hf(key), array.T if transpose else array


def save_pretrained(model: Qwen2, path: str | os.PathLike) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that transformers' ``Qwen2ForCausalLM`` loads.

    Both files are written to temporary names and renamed into place. Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(array) for name, array in hf_tensors(model)}
    atomic_write(path / _SINGLE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = json.dumps(model.config.to_hf_dict(model.dtype), indent=2, sort_keys=True) + "\n"
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(config))
    return path
