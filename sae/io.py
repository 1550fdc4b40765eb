"""SAE files: the SAELens layout both ways, plus importers for EleutherAI sparsify and Gemma Scope.

Layers: in memory ``SAEMetadata.hook_layer`` is our capture layer L, the residual stream after L blocks
(transformers' ``output_hidden_states[L]``). SAELens names that site ``blocks.{L-1}.hook_resid_post``
(equivalently ``blocks.{L}.hook_resid_pre``) with ``hook_layer`` the block index, so :func:`save` writes
``hook_name = blocks.{L-1}.hook_resid_post`` and ``hook_layer = L-1``, and :func:`load` reads the capture
layer back from ``hook_name``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sae.model import SAEConfig, SAEMetadata, SparseAutoencoder
from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# Our architecture name -> SAELens' (a trained BatchTopK SAE is used as a JumpReLU with its threshold).
_SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu", "batchtopk": "batchtopk"}
# hook_name -> capture layer: SAELens' residual hooks of block N, and our own earlier ``model.layers.L``.
_RESID_HOOKS = (
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 1),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), 0),
    (re.compile(r"model\.layers\.(\d+)"), 0),
)


class SAEFileError(UserError):
    """SAE files that cannot be used: bad ``cfg.json``, missing or mis-shaped tensors, or a ``d_in`` that is
    not the model's hidden size; the message names the file (or both sizes)."""


def saelens_hook_name(layer: int) -> str:
    """SAELens' name of capture layer ``layer`` (the residual after ``layer`` blocks)."""
    return f"blocks.{layer - 1}.hook_resid_post"


def capture_layer(hook_name: str | None) -> int | None:
    """The capture layer a residual-stream ``hook_name`` reads, or None for another (or no) hook."""
    for pattern, offset in _RESID_HOOKS:
        match = pattern.fullmatch(hook_name or "")
        if match:
            return int(match.group(1)) + offset
    return None


def save(sae: SparseAutoencoder, path: str | os.PathLike) -> Path:
    """Writes ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), atomically.

    Input normalisation is folded into the weights (``W_enc * s``, ``W_dec / s``, ``b_dec / s``), so the
    saved SAE encodes raw activations and says ``normalize_activations: none``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.config
    scale = np.float32(sae.norm_scale[...])
    tensors = {
        "W_enc": np.asarray(sae.W_enc[...]) * scale,
        "b_enc": np.asarray(sae.b_enc[...]),
        "W_dec": np.asarray(sae.W_dec[...]) / scale,
        "b_dec": np.asarray(sae.b_dec[...]) / scale,
    }
    if sae.threshold is not None:
        tensors["threshold"] = np.asarray(sae.threshold[...])
    tensors = {name: np.ascontiguousarray(t.astype(cfg.dtype)) for name, t in tensors.items()}
    cfg_json = {
        "architecture": _SAELENS_ARCH[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _saelens_metadata(cfg.metadata),
    }
    if cfg.architecture == "topk":
        cfg_json["k"] = cfg.k
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(cfg_json, indent=2, sort_keys=True) + "\n"
    atomic_write(path / CFG_FILE, lambda tmp: Path(tmp).write_text(text))
    return path


def _saelens_metadata(metadata: SAEMetadata) -> dict:
    """``cfg.json``'s metadata: the capture layer as SAELens names it (see the module docstring)."""
    raw = dataclasses.asdict(metadata)
    if metadata.hook_layer is not None:
        raw |= {"hook_name": saelens_hook_name(metadata.hook_layer), "hook_layer": metadata.hook_layer - 1}
    return raw


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: no {file.name}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SAEFileError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise SAEFileError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: no {file.name}")
    try:
        with safe_open(file, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise SAEFileError(f"{file}: not a readable safetensors file ({err})") from err


def _metadata(raw: dict | None) -> SAEMetadata:
    """In-memory metadata; ``hook_layer`` is the capture layer read from ``hook_name`` (None if it is not a
    residual-stream hook, so the user passes ``--layer``)."""
    names = {f.name for f in dataclasses.fields(SAEMetadata)}
    values = {k: v for k, v in (raw or {}).items() if k in names}
    return SAEMetadata(**values | {"hook_layer": capture_layer(values.get("hook_name"))})


def from_arrays(config: SAEConfig, arrays: dict[str, np.ndarray], source: str) -> SparseAutoencoder:
    """Builds an SAE from SAELens-named arrays, checking every name and shape against ``config``."""
    d, f = config.d_in, config.d_sae
    expected = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
    if config.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (f,)
    for name, shape in expected.items():
        if name not in arrays:
            raise SAEFileError(f"{source}: missing tensor {name}")
        if tuple(arrays[name].shape) != shape:
            raise SAEFileError(f"{source}: tensor {name} has shape {list(arrays[name].shape)}, expected {list(shape)}")
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise SAEFileError(f"{source}: unexpected tensor(s) {', '.join(unexpected)}")
    sae = nnx.eval_shape(lambda: SparseAutoencoder(config, rngs=nnx.Rngs(0)))
    dtype = jnp.dtype(config.dtype)
    for name in expected:
        getattr(sae, name).set_value(jnp.asarray(arrays[name], dtype))
    sae.norm_scale.set_value(jnp.ones((), jnp.float32))
    return sae


def load(path: str | os.PathLike) -> SparseAutoencoder:
    """Loads an SAE saved by :func:`save` or by SAELens (``cfg.json`` + ``sae_weights.safetensors``).

    The capture layer (``config.metadata.hook_layer``) comes from ``metadata.hook_name``:
    ``blocks.N.hook_resid_post`` is layer N+1, ``blocks.N.hook_resid_pre`` layer N.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not an SAE directory")
    raw = _read_json(path / CFG_FILE)
    source = str(path / CFG_FILE)
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise SAEFileError(f"{source}: architecture {arch!r} is not supported ({', '.join(_FROM_SAELENS)})")
    if raw.get("normalize_activations", "none") != "none":
        raise SAEFileError(f"{source}: normalize_activations={raw['normalize_activations']!r} is not supported")
    for field in ("d_in", "d_sae"):
        if field not in raw:
            raise SAEFileError(f"{source}: missing field {field}")
    try:
        config = SAEConfig(
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            architecture=_FROM_SAELENS[arch],
            k=raw.get("k", 32),
            apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True),
            dtype=raw.get("dtype", "float32"),
            metadata=_metadata(raw.get("metadata", raw.get("meta", raw))),  # older SAELens: top level
        )
    except (TypeError, ValueError) as err:
        raise SAEFileError(f"{source}: {err}") from err
    return from_arrays(config, _read_tensors(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))


def load_sparsify(path: str | os.PathLike) -> SparseAutoencoder:
    """Imports an EleutherAI sparsify TopK SAE (``cfg.json`` + ``sae.safetensors``).

    sparsify stores ``encoder.weight [F, D]`` (a PyTorch Linear), ``encoder.bias [F]``,
    ``W_dec [F, D]`` and ``b_dec [D]``, and encodes ``topk(relu(encoder(x - b_dec)))``.
    """
    path = Path(path)
    raw = _read_json(path / CFG_FILE)
    tensors = _read_tensors(path / "sae.safetensors")
    source = str(path / "sae.safetensors")
    if "encoder.weight" not in tensors:
        raise SAEFileError(f"{source}: missing tensor encoder.weight (not a sparsify checkpoint)")
    # Widths from W_dec (or encoder.weight without it), so a bad encoder tensor is blamed by its own name.
    widths = "W_dec" if "W_dec" in tensors else "encoder.weight"
    if tensors[widths].ndim != 2:
        raise SAEFileError(f"{source}: tensor {widths} has shape {list(tensors[widths].shape)}, expected 2-D")
    d_sae, d_in = tensors[widths].shape
    if raw.get("num_latents", d_sae) not in (0, d_sae):
        raise SAEFileError(f"{path / CFG_FILE}: num_latents {raw['num_latents']} but {widths} has {d_sae} rows")
    if raw.get("skip_connection"):
        raise SAEFileError(f"{path / CFG_FILE}: skip_connection SAEs are not supported")
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise SAEFileError(f"{source}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    arrays = {
        "W_enc": tensors.pop("encoder.weight").T,
        "b_enc": tensors.pop("encoder.bias", np.zeros(d_sae, np.float32)),
        "W_dec": tensors.pop("W_dec", None),
        "b_dec": tensors.pop("b_dec", None),
    }
    arrays = {k: v for k, v in arrays.items() if v is not None} | tensors
    config = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=raw["k"], apply_b_dec_to_input=True)
    return from_arrays(config, arrays, source)


def load_gemma_scope(file: str | os.PathLike) -> SparseAutoencoder:
    """Imports a Gemma Scope JumpReLU SAE from its ``params.npz``.

    Gemma Scope stores ``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc``, ``b_dec``, ``threshold`` and encodes
    ``relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc`` (no ``b_dec`` subtraction).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    with np.load(file) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if "W_enc" not in arrays:
        raise SAEFileError(f"{file}: missing tensor W_enc (not a Gemma Scope params.npz)")
    d_in, d_sae = arrays["W_enc"].shape
    config = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=False)
    return from_arrays(config, arrays, str(file))


def check_matches_model(
    sae: SparseAutoencoder, hidden_size: int, model_name: str = "the model", sae_name: str = "SAE"
) -> None:
    """Raises :class:`SAEFileError` if the SAE's ``d_in`` differs from the model's hidden size."""
    if sae.config.d_in != hidden_size:
        raise SAEFileError(
            f"{sae_name}: d_in={sae.config.d_in} does not match the hidden size {hidden_size} of {model_name}"
        )
