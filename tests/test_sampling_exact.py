"""Sampling is exact on a Qwen-sized, long-tailed vocabulary: draws follow the softmax down to tokens of
probability 2^-24, top-p keeps exactly the nucleus, temperature scales the logits, and 0 is greedy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from saerl_jax.model.sampling import SamplingConfig, nucleus_threshold, sample_token

V = 151_936  # Qwen2's vocabulary
HEAD = 4096
"""Tokens 0..HEAD-1 follow a Zipf law; every other token has probability exactly 2^-24."""


def _long_tail_probs() -> np.ndarray:
    """``[V]`` float64 probabilities: a Zipf head holding 99.1% of the mass, then 147,840 tokens of 2^-24.

    2^-24 is half the step of a float32 uniform number in [0, 1): a float32 inverse CDF, whose cumulative
    sum moves by one float32 step there per token, can reach only every other one of these tokens.
    """
    tail = np.full(V - HEAD, 2.0**-24)
    head = np.arange(1, HEAD + 1) ** -1.2
    return np.concatenate([head / head.sum() * (1 - tail.sum()), tail])


def _draw(logits_V: np.ndarray, n: int, cfg: SamplingConfig, seed: int = 0) -> np.ndarray:
    """``[n]`` tokens: :func:`sample_token` on one row of ``logits_V`` for each of ``n`` keys.

    ``vmap`` over the keys alone leaves what depends only on the logits (softmax, nucleus, block masses)
    unbatched, computed once: exactly the per-row function, without n copies of the vocabulary.
    """
    draw = jax.vmap(lambda logits_1V, key: sample_token(logits_1V, key[None], cfg)[0][0], in_axes=(None, 0))
    keys_N = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(draw)(jnp.asarray(logits_V, jnp.float32)[None], keys_N))


def _chi2_pvalue(tokens_N: np.ndarray, probs_V: np.ndarray, bins_V: np.ndarray) -> float:
    """Chi-square p-value of the draws' counts per bin against ``probs_V`` summed per bin (ids ``bins_V``)."""
    observed = np.bincount(bins_V[tokens_N], minlength=bins_V.max() + 1)
    expected = np.bincount(bins_V, weights=probs_V) / probs_V.sum() * tokens_N.size
    used = expected > 0
    assert observed[~used].sum() == 0 and expected[used].min() >= 5, expected  # the approximation needs >= 5
    return float(stats.chisquare(observed[used], expected[used]).pvalue)


def _log_prob_bins(probs_V: np.ndarray, edges=(-2.0, -4.0, -6.0, -9.0)) -> np.ndarray:
    """Bin id per token: 0 for log p >= edges[0], 1 for the next band, ..., len(edges) below the last."""
    return np.searchsorted(-np.asarray(edges), -np.log(probs_V), side="right")


def test_draws_follow_the_softmax_down_to_the_far_tail():
    probs_V = _long_tail_probs()
    # Bins: four log-probability bands of the head, the rest of the head, then the far tail split into its
    # even and odd ids (two bins of equal mass, 0.44% each: about 36 of the draws each). A sampler that
    # gets the tail's total right but reaches only some of its tokens fails the split; one that under-draws
    # tiny probabilities (float32 Gumbel noise, capped near 16) fails the tail's total.
    bins_V = _log_prob_bins(probs_V)
    bins_V[HEAD:] = bins_V.max() + 1 + np.arange(V - HEAD) % 2
    tokens_N = _draw(np.log(probs_V), 8192, SamplingConfig(max_new_tokens=1))
    assert _chi2_pvalue(tokens_N, probs_V, bins_V) > 1e-3


def _nucleus(probs_V: np.ndarray, top_p: float) -> np.ndarray:
    """Float64 reference: ids of the smallest most-probable set whose mass reaches ``top_p``."""
    order = np.argsort(-probs_V, kind="stable")
    return np.sort(order[: np.searchsorted(np.cumsum(probs_V[order]), top_p) + 1])


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.0, 0.9), (1.3, 0.8)])
def test_temperature_and_top_p_keep_their_meaning(temperature, top_p):
    logits_V = np.log(_long_tail_probs())
    scaled_V = np.exp(logits_V / temperature - np.max(logits_V / temperature))
    scaled_V /= scaled_V.sum()
    kept = _nucleus(scaled_V, top_p) if top_p < 1 else np.arange(V)
    threshold = nucleus_threshold(jnp.asarray(scaled_V[None], jnp.float32), top_p)[0, 0]
    np.testing.assert_array_equal(np.flatnonzero(scaled_V.astype(np.float32) >= threshold), kept)
    target_V = np.zeros(V)
    target_V[kept] = scaled_V[kept]
    tokens_N = _draw(logits_V, 4096, SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p), 1)
    assert np.isin(tokens_N, kept).all()  # top-p: nothing outside the nucleus, ever
    bins_V = _log_prob_bins(np.where(target_V > 0, target_V, 1e-300))
    assert _chi2_pvalue(tokens_N, target_V, bins_V) > 1e-3


def test_temperature_zero_is_greedy_whatever_the_keys():
    logits_BV = jax.random.normal(jax.random.key(0), (4, V)) * 3
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.0)
    tokens_B, logprobs_B = sample_token(logits_BV, jax.random.split(jax.random.key(1), 4), cfg)
    again_B, _ = sample_token(logits_BV, jax.random.split(jax.random.key(2), 4), cfg)
    np.testing.assert_array_equal(tokens_B, np.argmax(logits_BV, axis=-1))
    np.testing.assert_array_equal(again_B, tokens_B)
    expected_B = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_BV)), np.asarray(tokens_B)[:, None], 1)
    np.testing.assert_allclose(logprobs_B, expected_B[:, 0], rtol=1e-6)
