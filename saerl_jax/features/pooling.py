"""Per-sample features: SAE codes (or dense residuals) pooled by mean and max over the prompt (by default the
question's own tokens) and solution spans, in one jitted function per length bucket; plus shallow text metadata.

Shapes: B batch, T tokens (a length bucket), D hidden size, F SAE latents, K selected latents.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saerl_jax.model import causal_mask, positions_from_mask

SPANS = ("prompt", "solution")
POOLS = ("mean", "max")
METADATA_COLUMNS = ("prompt_tokens", "solution_tokens", "tex_ratio", "digit_ratio", "has_solution")
_TEX = re.compile(r"\\[A-Za-z]+|[$^_{}\\]")


def residual_and_keep(model, ids_BT, mask_BT, keep_BT, layer: int, outlier_factor: float):
    """Layer-``layer`` residual ``[B, T, D]`` and the tokens to pool: ``keep_BT`` minus those whose norm is
    over ``outlier_factor`` x the median norm of the kept tokens of their own sequence (attention sinks).

    The reference is per sequence, so a sample's features do not depend on the batch it was run in."""
    slots_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
    x_BTD, _ = model.hidden_states(
        ids_BT, positions_from_mask(mask_BT), causal_mask(mask_BT, slots_BT), num_layers=layer
    )
    norm_BT = jnp.linalg.norm(x_BTD.astype(jnp.float32), axis=-1)
    median_B1 = jnp.nanmedian(jnp.where(keep_BT, norm_BT, jnp.nan), axis=1, keepdims=True)
    return x_BTD, keep_BT & (norm_BT <= outlier_factor * median_B1)


def span_masks(spans_B22: jax.Array, length: int) -> jax.Array:
    """``[B, 2, T]``: whether token t lies in each row's prompt / solution span (``[start, end)``)."""
    t_T = jnp.arange(length)
    return (t_T >= spans_B22[:, :, :1]) & (t_T < spans_B22[:, :, 1:])


def pool_spans(values_BTK: jax.Array, spans_B2: jax.Array, keep_BT: jax.Array) -> jax.Array:
    """``[B, 2 spans * 2 pools * K]`` in the order prompt-mean, prompt-max, solution-mean, solution-max.

    ``spans_B2`` holds ``[start, end)`` token ranges as ``[B, 2, 2]``; only kept tokens count; an empty
    span pools to zeros.
    """
    in_BST = keep_BT[:, None, :] & span_masks(spans_B2, values_BTK.shape[1])
    pooled = []
    for s in range(len(SPANS)):
        in_BT = in_BST[:, s]
        count_B1 = jnp.sum(in_BT, axis=1, keepdims=True)
        inside_BTK = in_BT[..., None]
        mean_BK = jnp.sum(jnp.where(inside_BTK, values_BTK, 0.0), axis=1) / jnp.maximum(count_B1, 1)
        max_BK = jnp.where(count_B1 > 0, jnp.max(jnp.where(inside_BTK, values_BTK, -jnp.inf), axis=1), 0.0)
        pooled += [mean_BK, max_BK]
    return jnp.concatenate(pooled, axis=-1)


@functools.partial(jax.jit, static_argnames=("model_def", "sae_def", "layer", "outlier_factor"))
def pooled_codes(
    model_def, model_state, sae_def, sae_state, ids_BT, mask_BT, keep_BT, spans_B22, latents_K, *, layer, outlier_factor
):
    """SAE codes of the selected latents pooled over both spans: ``[B, 4K]``. ``sae_def=None``: dense."""
    model = nnx.merge(model_def, model_state)
    x_BTD, keep_BT = residual_and_keep(model, ids_BT, mask_BT, keep_BT, layer, outlier_factor)
    if sae_def is None:
        values_BTK = x_BTD.astype(jnp.float32)
    else:
        codes_BTF = nnx.merge(sae_def, sae_state).encode(x_BTD)
        values_BTK = jnp.take(codes_BTF, latents_K, axis=-1).astype(jnp.float32)
    return pool_spans(values_BTK, spans_B22, keep_BT)


@functools.partial(jax.jit, static_argnames=("model_def", "sae_def", "layer", "outlier_factor"))
def latent_counts(
    model_def, model_state, sae_def, sae_state, ids_BT, mask_BT, keep_BT, spans_B22, *, layer, outlier_factor
):
    """How many pooled tokens of the batch (kept, inside a span) activate each latent ``[F]`` (int32), and
    the count of those tokens."""
    model = nnx.merge(model_def, model_state)
    x_BTD, keep_BT = residual_and_keep(model, ids_BT, mask_BT, keep_BT, layer, outlier_factor)
    keep_BT = keep_BT & jnp.any(span_masks(spans_B22, ids_BT.shape[1]), axis=1)
    active_BTF = (nnx.merge(sae_def, sae_state).encode(x_BTD) > 0) & keep_BT[..., None]
    return jnp.sum(active_BTF, axis=(0, 1), dtype=jnp.int32), jnp.sum(keep_BT, dtype=jnp.int32)


def select_latents(counts_F: np.ndarray, n: int) -> np.ndarray:
    """Ids (ascending) of the ``n`` most frequently active latents; ties go to the lower index."""
    order = np.lexsort((np.arange(len(counts_F)), -np.asarray(counts_F, np.int64)))
    return np.sort(order[:n]).astype(np.int32) if n < len(counts_F) else np.arange(len(counts_F), dtype=np.int32)


def feature_columns(latents_K: np.ndarray | None, hidden_size: int | None = None) -> list[str]:
    """Column names: ``{span}_{pool}_l{latent}`` (or ``_d{dim}`` for dense), then the metadata columns."""
    names = [f"l{i}" for i in latents_K] if latents_K is not None else [f"d{i}" for i in range(hidden_size)]
    return [f"{span}_{pool}_{name}" for span in SPANS for pool in POOLS for name in names] + list(METADATA_COLUMNS)


def text_metadata(question: str, solution: str | None, prompt_tokens: int, solution_tokens: int) -> list[float]:
    """Prompt and solution token counts, the share of characters that are TeX markup and that are digits
    (over question + solution), and whether a solution was given."""
    text = question + (solution or "")
    tex = sum(len(m) for m in _TEX.findall(text))
    digits = sum(c.isdigit() for c in text)
    return [
        float(prompt_tokens),
        float(solution_tokens),
        tex / max(len(text), 1),
        digits / max(len(text), 1),
        float(bool(solution)),
    ]
