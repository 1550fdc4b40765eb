"""KV-cache sampling: greedy equals transformers token for token; log-probs and masks are right."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, padded_batch, save_hf_qwen2

from saerl_jax.model import forward, generate, load_pretrained
from saerl_jax.model.sampling import gumbel_max_sample, nucleus_threshold


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A checkpoint with a wide initialisation: greedy paths then depend on context instead of
    repeating one token, so a wrong cache or position would change them."""
    directory = tmp_path_factory.mktemp("generate")
    hf_model = save_hf_qwen2(directory, initializer_range=0.2, **CONFIGS["tied-gqa"])
    return load_pretrained(directory), hf_model


def _hf_greedy(hf_model, ids, mask, n, eos):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def test_greedy_generate_equals_transformers(models):
    model, hf_model = models
    ids, mask = padded_batch([9, 4, 7], 9, 320, side="left", seed=5)
    n = 12
    out = generate(model, ids, mask, max_new_tokens=n, temperature=0.0, eos_token_id=320, rng=jax.random.key(0))
    ref = _hf_greedy(hf_model, ids, mask, n, eos=None)
    np.testing.assert_array_equal(np.asarray(out.tokens_BN), ref)
    assert np.asarray(out.mask_BN).all()
    assert len(np.unique(ref)) > 12  # the paths vary, so equality is informative


def test_greedy_stops_at_eos_like_transformers(models):
    model, hf_model = models
    ids, mask = padded_batch([9, 4, 7], 9, 320, side="left", seed=5)
    free_run = _hf_greedy(hf_model, ids, mask, 12, eos=None)
    step = next(k for k in range(2, 12) if free_run[0, k] not in free_run[0, :k])
    eos = int(free_run[0, step])  # row 0 first emits this token at `step`: make it the EOS
    ref = _hf_greedy(hf_model, ids, mask, 12, eos=eos)
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=12,
        temperature=0.0,
        eos_token_id=[eos],
        rng=jax.random.key(0),
        pad_token_id=0,
    )
    tokens, out_mask = np.asarray(out.tokens_BN), np.asarray(out.mask_BN)
    for row in range(3):
        stop = np.flatnonzero(tokens[row] == eos)
        length = stop[0] + 1 if stop.size else 12
        np.testing.assert_array_equal(out_mask[row], np.arange(12) < length)
        np.testing.assert_array_equal(tokens[row, :length], ref[row, :length])
        assert (tokens[row, length:] == 0).all()
    assert out_mask[0].sum() == step + 1 and not out_mask.all()
    assert (np.asarray(out.logprobs_BN)[out_mask == 0] == 0).all()


def test_right_padded_prompts_are_realigned(models):
    model, _ = models
    left_ids, left_mask = padded_batch([8, 3], 8, 320, side="left", seed=9)
    right_ids, right_mask = np.zeros_like(left_ids), np.zeros_like(left_mask)
    for row in range(2):
        real = left_ids[row][left_mask[row] == 1]
        right_ids[row, : real.size], right_mask[row, : real.size] = real, 1
    kwargs = dict(max_new_tokens=6, temperature=0.0, eos_token_id=320, rng=jax.random.key(0))
    a = generate(model, left_ids, left_mask, **kwargs)
    b = generate(model, right_ids, right_mask, **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens_BN), np.asarray(b.tokens_BN))


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_logprobs_equal_teacher_forced_forward(models, temperature):
    model, _ = models
    ids, mask = padded_batch([6, 10], 10, 320, side="left", seed=4)
    out = generate(model, ids, mask, max_new_tokens=8, temperature=temperature, eos_token_id=320, rng=jax.random.key(3))
    tokens = np.asarray(out.tokens_BN)
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    logits = np.asarray(forward(model, full_ids, full_mask), np.float64)[:, 9:-1]
    logits = logits / (temperature or 1.0)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - logz
    np.testing.assert_allclose(np.asarray(out.logprobs_BN), expected, atol=1e-4)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(models):
    model, _ = models
    ids, mask = padded_batch([5, 5, 5, 5], 5, 320, side="left", seed=2)
    kwargs = dict(max_new_tokens=10, eos_token_id=320)
    a = generate(model, ids, mask, temperature=1.0, rng=jax.random.key(1), **kwargs)
    b = generate(model, ids, mask, temperature=1.0, rng=jax.random.key(1), **kwargs)
    c = generate(model, ids, mask, temperature=1.0, rng=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens_BN), np.asarray(b.tokens_BN))
    assert (np.asarray(a.tokens_BN) != np.asarray(c.tokens_BN)).any()
    greedy = generate(model, ids, mask, temperature=0.0, rng=jax.random.key(0), **kwargs)
    nucleus = generate(model, ids, mask, temperature=1.0, top_p=1e-6, rng=jax.random.key(5), **kwargs)
    np.testing.assert_array_equal(np.asarray(nucleus.tokens_BN), np.asarray(greedy.tokens_BN))


def test_top_p_only_samples_from_the_nucleus(models):
    model, _ = models
    ids, mask = padded_batch([5], 5, 320, side="left", seed=8)
    logits = np.asarray(forward(model, ids, mask))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.3) + 1].tolist())
    batch = np.repeat(ids, 64, axis=0)
    out = generate(
        model, batch, np.ones_like(batch), max_new_tokens=1, top_p=0.3, eos_token_id=320, rng=jax.random.key(0)
    )
    assert set(np.asarray(out.tokens_BN)[:, 0].tolist()) <= nucleus


def test_per_row_keys_make_rows_independent_of_their_batch(models):
    model, _ = models
    ids, mask = padded_batch([5, 7, 6], 7, 320, side="left", seed=11)
    keys = jax.random.split(jax.random.key(4), 3)
    kwargs = dict(max_new_tokens=10, temperature=1.0, eos_token_id=320)
    together = np.asarray(generate(model, ids, mask, rng=keys, **kwargs).tokens_BN)
    alone = np.asarray(generate(model, ids[1:2], mask[1:2], rng=keys[1:2], **kwargs).tokens_BN)
    swapped = np.asarray(generate(model, ids[::-1], mask[::-1], rng=keys[::-1], **kwargs).tokens_BN)
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(together, swapped[::-1])
    assert len({tuple(row) for row in together}) == 3


def test_bad_arguments(models):
    model, _ = models
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, ids, max_new_tokens=0, eos_token_id=1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, ids, max_new_tokens=2, top_p=0.0, eos_token_id=1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, ids, np.zeros_like(ids), max_new_tokens=2, eos_token_id=1, rng=jax.random.key(0))
    assert jnp.asarray(ids).shape == (1, 4)


@pytest.mark.parametrize("block", [4, 128])  # two blocks, the last padded; one block larger than V
def test_gumbel_max_sampling_follows_the_distribution(block):
    probs = np.array([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], np.float32)
    n = 20000
    tokens = np.asarray(
        # unnormalised probabilities, one key per row
        gumbel_max_sample(
            jnp.broadcast_to(jnp.asarray(probs) * 3.0, (n, 6)), jax.random.split(jax.random.key(0), n), block
        )
    )
    freq = np.bincount(tokens, minlength=6) / n
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.5, {1}), (0.51, {1, 4}), (0.8, {1, 4}), (0.81, {1, 3, 4}), (1.0, {1, 3, 4})]
)
def test_nucleus_threshold_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    probs = jnp.asarray([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]], jnp.float32)
    threshold = nucleus_threshold(probs, top_p)
    assert set(np.flatnonzero(np.asarray(probs[0] >= threshold[0]) & (np.asarray(probs[0]) > 0))) == kept
