"""Jitted forward passes as pure functions of the NNX state, with length buckets bounding compiles."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saerl_jax.model.qwen2 import Qwen2


def bucket_length(n: int, minimum: int = 32) -> int:
    """Smallest bucket >= ``n`` among ``minimum * 2**k`` and ``1.5 * minimum * 2**k``.

    Padding wastes at most a third of the work and a run compiles about ``2 * log2(T_max / minimum)``
    shapes at most, whatever the distribution of lengths.
    """
    if n <= minimum:
        return minimum
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


@functools.partial(jax.jit, static_argnames=("graphdef", "capture_layer"))
def forward_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids_BT: jax.Array,
    attention_mask_BT: jax.Array,
    capture_layer: int | None = None,
) -> jax.Array:
    """``Qwen2.__call__`` as a jitted function of ``nnx.split(model)``; one compile per shape."""
    return nnx.merge(graphdef, state)(input_ids_BT, attention_mask_BT, capture_layer=capture_layer)


def pad_sequences(sequences, min_bucket: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences right-padded with 0 to the :func:`bucket_length` of the longest: ``(ids, mask)``,
    both int32 ``[B, T]``."""
    length = bucket_length(max(len(s) for s in sequences), min_bucket)
    ids_BT = np.zeros((len(sequences), length), np.int32)
    mask_BT = np.zeros_like(ids_BT)
    for row, seq in enumerate(sequences):
        ids_BT[row, : len(seq)], mask_BT[row, : len(seq)] = seq, 1
    return ids_BT, mask_BT


def left_pad(sequences, width: int, pad_id: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences left-padded with ``pad_id`` to ``width``, the layout prompts are sampled from:
    ``(ids, mask)``, both int32 ``[rows, width]`` (``rows`` defaults to the number of sequences; extra rows
    stay padding with an all-zero mask)."""
    ids_BT = np.full((len(sequences) if rows is None else rows, width), pad_id, np.int32)
    mask_BT = np.zeros_like(ids_BT)
    for row, seq in enumerate(sequences):
        ids_BT[row, width - len(seq) :], mask_BT[row, width - len(seq) :] = seq, 1
    return ids_BT, mask_BT


def pad_to_bucket(array_BT: np.ndarray, length: int, value: int = 0) -> np.ndarray:
    """Right-pads the time axis of a ``[B, T]`` host array to ``length``."""
    array_BT = np.asarray(array_BT)
    return np.pad(array_BT, ((0, 0), (0, length - array_BT.shape[1])), constant_values=value)


def forward(
    model: Qwen2,
    input_ids_BT,
    attention_mask_BT=None,
    *,
    capture_layer: int | None = None,
    min_bucket: int = 32,
) -> jax.Array:
    """Jitted, bucketed ``model(input_ids, attention_mask, capture_layer=...)``.

    The time axis is right-padded to :func:`bucket_length` (masked, so real tokens see the same
    context), run through :func:`forward_fn` and cut back to T.

    Returns:
      logits ``[B, T, V]`` or, with ``capture_layer``, the residual stream ``[B, T, D]``.
    """
    input_ids_BT = np.asarray(input_ids_BT)
    if attention_mask_BT is None:
        attention_mask_BT = np.ones_like(input_ids_BT)
    t = input_ids_BT.shape[1]
    length = bucket_length(t, min_bucket)
    graphdef, state = nnx.split(model)
    out = forward_fn(
        graphdef,
        state,
        jnp.asarray(pad_to_bucket(input_ids_BT, length)),
        jnp.asarray(pad_to_bucket(attention_mask_BT, length)),
        capture_layer=capture_layer,
    )
    return out[:, :t]
