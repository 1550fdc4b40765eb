"""Batched sampling with a key/value cache: one prefill, then a jitted ``while_loop`` of decode steps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saerl_jax.model.forward import bucket_length
from saerl_jax.model.qwen2 import Qwen2, causal_mask, positions_from_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are drawn; static under jit (one compile per distinct config)."""

    max_new_tokens: int
    """Completion length budget N."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    cache_dtype: str | None = None
    """Dtype of the KV cache; None: the model's compute dtype (that of its parameters)."""
    attention_chunk: int = 0
    """Prompt queries attended at a time in the prefill (bounded scores, same values); 0: all at once."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk must be >= 0, got {self.attention_chunk}")


class GenerateOutput(NamedTuple):
    """What :func:`generate` returns; N is ``max_new_tokens``."""

    tokens_BN: jax.Array
    """Sampled ids; after a row's first EOS the rest is ``pad_token_id``."""
    logprobs_BN: jax.Array
    """Log-probability of each sampled token under the temperature-scaled full distribution
    (raw logits when greedy); 0 where ``mask_BN`` is 0."""
    mask_BN: jax.Array
    """1 for completion tokens up to and including the first EOS, else 0."""


def left_align(input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray, length: int):
    """Moves every row's real tokens to the right end of a ``[B, length]`` array (left padding).

    Padding slots hold token 0, a valid id whatever the tokenizer's pad id is: masked keys still flow
    through the matmuls, and an out-of-range id would turn them into NaN.
    """
    b = input_ids_BT.shape[0]
    ids_BL = np.zeros((b, length), dtype=np.int32)
    mask_BL = np.zeros((b, length), dtype=np.int32)
    for row in range(b):
        real = input_ids_BT[row][attention_mask_BT[row].astype(bool)]
        if real.size == 0:
            raise ValueError(f"prompt {row} is empty (its attention mask is all zeros)")
        ids_BL[row, length - real.size :] = real
        mask_BL[row, length - real.size :] = 1
    return ids_BL, mask_BL


def nucleus_threshold(probs_BV: jax.Array, top_p: float, iterations: int = 32) -> jax.Array:
    """Per row, the largest t whose tokens with probability >= t hold at least ``top_p`` of the mass.

    Keeping ``probs >= t`` is nucleus sampling (the smallest most-probable set reaching ``top_p``,
    the token that crosses it included). Found by bisection on t: ``iterations`` masked sums over the
    vocabulary instead of a sort, which on CPU costs about 100x more at Qwen's 151,936 tokens.
    """
    lo_B1 = jnp.zeros((*probs_BV.shape[:-1], 1), probs_BV.dtype)
    hi_B1 = jnp.max(probs_BV, axis=-1, keepdims=True)

    def halve(_, bounds):
        lo_B1, hi_B1 = bounds
        mid_B1 = (lo_B1 + hi_B1) / 2
        enough_B1 = jnp.sum(jnp.where(probs_BV >= mid_B1, probs_BV, 0), axis=-1, keepdims=True) >= top_p
        return jnp.where(enough_B1, mid_B1, lo_B1), jnp.where(enough_B1, hi_B1, mid_B1)

    lo_B1, hi_B1 = jax.lax.fori_loop(0, iterations, halve, (lo_B1, hi_B1))
    # hi itself may already hold enough mass (e.g. one token above top_p): then keep just the top.
    top_enough_B1 = jnp.sum(jnp.where(probs_BV >= hi_B1, probs_BV, 0), axis=-1, keepdims=True) >= top_p
    return jnp.where(top_enough_B1, hi_B1, lo_B1)


def gumbel_max_sample(probs_BV: jax.Array, keys_B: jax.Array, block: int = 128) -> jax.Array:
    """One exact draw per row from unnormalised probabilities ``[B, V]``, keyed by that row's key ``[B]``.

    Gumbel-max in two levels over the vocabulary cut into C blocks of K = ``block`` tokens: a block with
    probability proportional to its mass, then a token of that block in proportion to its probability;
    the product is ``p_i / sum(p)``. The Gumbel numbers use all 64 bits of jax's "highest" mode, so a
    token is reachable with its probability down to about 1e-19 of the row's mass (jax's default mode
    caps the noise at about 16 and loses every token below about 1e-7, as float32 inverse CDFs do).
    Only C + K numbers per row are drawn instead of V. Never returns a zero-probability token.
    """
    b, v = probs_BV.shape
    c = -(-v // block)
    probs_BCK = jnp.pad(probs_BV, ((0, 0), (0, c * block - v))).reshape(b, c, block)
    keys_B2 = jax.vmap(jax.random.split)(keys_B)

    def gumbel_Bn(row_keys_B: jax.Array, n: int) -> jax.Array:
        return jax.vmap(lambda key: jax.random.gumbel(key, (n,), probs_BV.dtype, mode="highest"))(row_keys_B)

    block_B = jnp.argmax(jnp.log(jnp.sum(probs_BCK, axis=-1)) + gumbel_Bn(keys_B2[:, 0], c), axis=-1)
    probs_BK = jnp.take_along_axis(probs_BCK, block_B[:, None, None], axis=1)[:, 0]
    return block_B * block + jnp.argmax(jnp.log(probs_BK) + gumbel_Bn(keys_B2[:, 1], block), axis=-1)


def sample_token(logits_BV: jax.Array, keys_B: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row; returns ids ``[B]`` and their log-probs ``[B]``."""
    logits_BV = logits_BV.astype(jnp.float32)
    if cfg.temperature == 0:
        logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
        token_B = jnp.argmax(logits_BV, axis=-1)
    else:
        logprobs_BV = jax.nn.log_softmax(logits_BV / cfg.temperature, axis=-1)
        probs_BV = jnp.exp(logprobs_BV)
        if cfg.top_p < 1.0:
            probs_BV = jnp.where(probs_BV >= nucleus_threshold(probs_BV, cfg.top_p), probs_BV, 0.0)
        token_B = gumbel_max_sample(probs_BV, keys_B)
    return token_B, jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def generate_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids_BT: jax.Array,
    attention_mask_BT: jax.Array,
    rng: jax.Array,
    eos_ids_E: jax.Array,
    pad_id: jax.Array,
    cfg: SamplingConfig,
) -> GenerateOutput:
    """Prefill + decode loop over left-padded prompts, as a pure function of the model state."""
    model = nnx.merge(graphdef, state)
    b, t = input_ids_BT.shape
    n = cfg.max_new_tokens
    keys_B = rng if rng.shape == (b,) else jax.random.split(rng, b)
    key_mask_BS = jnp.concatenate([attention_mask_BT, jnp.ones((b, n), attention_mask_BT.dtype)], axis=1)
    prompt_len_B = jnp.sum(attention_mask_BT, axis=-1)
    x_BTD, cache = model.hidden_states(
        input_ids_BT,
        positions_from_mask(attention_mask_BT),
        causal_mask(key_mask_BS, jnp.broadcast_to(jnp.arange(t), (b, t))),
        cache=model.init_cache(b, t + n, cfg.cache_dtype),
        attention_chunk=cfg.attention_chunk,
    )
    logits_BV = model.logits(x_BTD[:, -1])

    def cond(carry):
        step, _, _, done_B, *_ = carry
        return (step < n) & ~jnp.all(done_B)

    def body(carry):
        step, cache, logits_BV, done_B, tokens_BN, logprobs_BN, mask_BN = carry
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        token_B, logprob_B = sample_token(logits_BV, step_keys_B, cfg)
        token_B = jnp.where(done_B, pad_id, token_B).astype(jnp.int32)
        tokens_BN = tokens_BN.at[:, step].set(token_B)
        logprobs_BN = logprobs_BN.at[:, step].set(jnp.where(done_B, 0.0, logprob_B))
        mask_BN = mask_BN.at[:, step].set(~done_B)
        done_B = done_B | jnp.isin(token_B, eos_ids_E)
        slot = t + step
        x_B1D, cache = model.hidden_states(
            token_B[:, None],
            (prompt_len_B + step)[:, None],
            causal_mask(key_mask_BS, jnp.full((b, 1), slot)),
            cache=cache,
            cache_index=slot,
        )
        return step + 1, cache, model.logits(x_B1D[:, 0]), done_B, tokens_BN, logprobs_BN, mask_BN

    init = (
        jnp.int32(0),
        cache,
        logits_BV,
        jnp.zeros((b,), bool),
        jnp.full((b, n), pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), bool),
    )
    _, _, _, _, tokens_BN, logprobs_BN, mask_BN = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(tokens_BN, logprobs_BN, mask_BN.astype(jnp.int32))


def generate(
    model: Qwen2,
    input_ids_BT,
    attention_mask_BT=None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int],
    rng: jax.Array,
    pad_token_id: int | None = None,
    min_bucket: int = 32,
) -> GenerateOutput:
    """Samples ``max_new_tokens`` tokens after each prompt with a key/value cache.

    Args:
      model: the policy.
      input_ids_BT: prompts ``[B, T]``, padded on either side (they are re-aligned to the left).
      attention_mask_BT: 1 for prompt tokens, 0 for padding; all ones if None.
      max_new_tokens: completion budget N.
      temperature: 0 for greedy decoding.
      top_p: nucleus threshold.
      eos_token_id: one id or several; a row stops after the first of them.
      rng: a ``jax.random.key``, or one key per row (``[B]``) so that a row's tokens do not depend on
        which other rows share its batch.
      pad_token_id: written after EOS; defaults to the first EOS id.
      min_bucket: prompts are left-padded to :func:`bucket_length` ``(T, min_bucket)``.

    Returns:
      :class:`GenerateOutput` with ``[B, N]`` tokens, log-probs and completion mask.
    """
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    eos_ids = np.atleast_1d(np.asarray(eos_token_id, dtype=np.int32))
    pad_id = int(eos_ids[0]) if pad_token_id is None else pad_token_id
    input_ids_BT = np.asarray(input_ids_BT)
    if attention_mask_BT is None:
        attention_mask_BT = np.ones_like(input_ids_BT)
    length = bucket_length(int(np.asarray(attention_mask_BT).sum(axis=1).max()), min_bucket)
    ids_BL, mask_BL = left_align(input_ids_BT, np.asarray(attention_mask_BT), length)
    graphdef, state = nnx.split(model)
    return generate_fn(
        graphdef,
        state,
        jnp.asarray(ids_BL),
        jnp.asarray(mask_BL),
        rng,
        jnp.asarray(eos_ids),
        jnp.int32(pad_id),
        cfg,
    )
