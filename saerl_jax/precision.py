"""Mixed precision: float32 master weights and optimizer state, a compute dtype for matmuls and activations.

A Qwen2 (and an SAE) computes in the dtype of its parameters, so a step computes in bfloat16 by casting the
float32 master parameters with :func:`cast_floating` inside the differentiated function: the cast is
differentiable, so the gradients, the optimizer state and the update stay float32. RMSNorm statistics,
softmax, log-probs, losses and advantages are float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

DType = Literal["float32", "bfloat16"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def check_dtype(name: str, value: str | None, *, optional: bool = True) -> None:
    """Raises ``ValueError`` naming the field unless ``value`` is one of :data:`DTYPES` (or None if optional)."""
    if value is None and optional:
        return
    if value not in DTYPES:
        raise ValueError(f"{name} must be one of {DTYPES}{' or None (auto)' if optional else ''}, got {value!r}")


def resolve_compute_dtype(compute_dtype: str | None) -> str:
    """The compute dtype a setting means: None is bfloat16 on accelerators and float32 on CPU."""
    if compute_dtype is None:
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    check_dtype("compute_dtype", compute_dtype, optional=False)
    return compute_dtype


def cast_floating(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype``; leaves already of it are returned as they are
    (no extra ops, so a float32 step with float32 compute is unchanged)."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if floating and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """The resolved dtypes of a run."""

    params: str = "float32"
    """Master weights and optimizer state."""
    compute: str = "float32"
    """Matmuls and activations (the parameters are cast to it inside each step)."""
    reference: str | None = None
    """Stored frozen reference policy (RL with a KL term); None when there is none."""
    cache: str | None = None
    """KV cache of the sampler; None when nothing is sampled."""

    def describe(self) -> str:
        """One line for the start of a run, e.g. ``precision: params float32, compute bfloat16, cache bfloat16``."""
        parts = [f"{name} {value}" for name, value in dataclasses.asdict(self).items() if value is not None]
        return "precision: " + ", ".join(parts)
