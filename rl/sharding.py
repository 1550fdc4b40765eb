"""Device mesh and partition rules for training Qwen2 with ``jax.jit`` in/out shardings.

The mesh has three named axes: ``data`` (pure data parallelism: params replicated, batch rows split),
``fsdp`` (batch rows split *and* parameters sharded along their model dimension D, gathered by XLA when
used) and ``tensor`` (Megatron-style: heads and MLP columns split). Axes are ``AxisType.Auto``: the
model code carries no sharding annotations, so XLA's propagation places intermediates from the in/out
shardings of the jitted step (``Explicit`` axes would need every op to state its output sharding).
Nothing here is skipped on a single device: a 1x1x1 mesh runs the same code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
"""Mesh axes that split the rows of a batch."""

# Parameter path (joined with "/") -> spec; first match wins. Kernels are [in, out] (flax Linear).
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj)/kernel", P("fsdp", "tensor")),  # [D, heads * head_dim]
    (r"(q_proj|k_proj|v_proj)/bias", P("tensor")),
    (r"o_proj/kernel", P("tensor", "fsdp")),  # [heads * head_dim, D]
    (r"(gate_proj|up_proj)/kernel", P("fsdp", "tensor")),  # [D, F]
    (r"down_proj/kernel", P("tensor", "fsdp")),  # [F, D]
    (r"(layernorm|norm)/weight", P()),
    (r"value_head/kernel", P("fsdp", None)),  # [D, 1], PPO's value head
    (r"value_head/bias", P()),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (all of them by default, every process's).

    ``data = -1`` takes whatever the other two leave. The product must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} devices, "
            f"have {len(devices)}"
        )
    return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_name(path) -> str:
    """``(layers, 0, self_attn, q_proj, kernel, value)`` -> ``layers/0/self_attn/q_proj/kernel``."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(p for p in parts if p != "value")


def spec_for(name: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The rule's spec for a tensor (scalars and unmatched non-parameter leaves are replicated).

    Raises:
      ValueError: a parameter matches no rule, or a dimension does not divide by its mesh axes.
    """
    if len(shape) == 0:
        return P()
    spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, name)), None)
    if spec is None:
        raise ValueError(f"no partition rule matches parameter {name!r} {tuple(shape)}; add one to PARTITION_RULES")
    for dim, axes in zip(shape, spec, strict=False):
        size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes) if a is not None]))
        if dim % size:
            raise ValueError(f"{name!r} {tuple(shape)}: dimension {dim} does not divide over mesh axes {axes} ({size})")
    return spec


def tree_shardings(tree, mesh: Mesh):
    """A ``NamedSharding`` for every array leaf of a params / optimizer-state / train-state tree."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_name(path), np.shape(leaf), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over ``data`` and ``fsdp``; the other axes whole."""
    return NamedSharding(mesh, P(BATCH))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of a batch (every process passes its own, equal-sized part).

    Raises:
      ValueError: the global row count does not divide over the batch axes.
    """
    sharding = batch_sharding(mesh)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for name, local in batch.items():
        rows = local.shape[0] * jax.process_count()
        if rows % ways:
            raise ValueError(f"batch field {name!r}: {rows} rows do not divide over data x fsdp = {ways}")
        out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(local), (rows, *local.shape[1:]))
    return out
