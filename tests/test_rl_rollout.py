"""Rollouts and chunked log-probs: masks up to the first EOS, truncation flags, log-probs equal to a full
forward pass (and the sampler's), chunking that never holds [B, T, V], and per-completion keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, padded_batch, save_hf_qwen2
from flax import nnx

from rl.rollout import completion_logprobs, logprobs_fn, rollout, row_keys
from saerl_jax.model import SamplingConfig, forward, load_pretrained

VOCAB = 320


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rollout")
    save_hf_qwen2(directory, initializer_range=0.2, **CONFIGS["tied-gqa"])
    return load_pretrained(directory)


def _reference_logprobs(model, prompt_ids, prompt_mask, completion, temperature):
    """log softmax(logits / T) of the completion tokens from one plain forward pass, in float64."""
    ids = np.concatenate([prompt_ids, completion], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(completion)], axis=1)
    p = prompt_ids.shape[1]
    logits = np.asarray(forward(model, ids, mask), np.float64)[:, p - 1 : -1] / temperature
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, completion[..., None], axis=-1)[..., 0] - logz
    probs = np.exp(logits - logz[..., None])
    return logp, -(probs * (logits - logz[..., None])).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_equal_a_full_forward(model, chunk):
    prompt_ids, prompt_mask = padded_batch([6, 3, 8], 8, VOCAB, side="left", seed=1)
    completion = np.random.default_rng(2).integers(1, VOCAB, (3, 7))
    logp, entropy = completion_logprobs(
        model,
        jnp.asarray(prompt_ids),
        jnp.asarray(prompt_mask),
        jnp.asarray(completion),
        jnp.ones((3, 7), jnp.int32),
        temperature=0.7,
        chunk=chunk,
    )
    ref_logp, ref_entropy = _reference_logprobs(model, prompt_ids, prompt_mask, completion, 0.7)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=2e-5)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, atol=2e-5)


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value produced anywhere in a jaxpr, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _shapes(inner)
    return shapes


def test_logprobs_and_their_gradient_never_hold_full_vocab_logits(model):
    b, p, n, chunk = 2, 8, 24, 4
    graphdef, params = nnx.split(model)
    args = (jnp.ones((b, p), jnp.int32), jnp.ones((b, p), jnp.int32), jnp.ones((b, n), jnp.int32))

    def total(params):
        logp, _ = completion_logprobs(
            nnx.merge(graphdef, params), *args, jnp.ones((b, n), jnp.int32), temperature=1.0, chunk=chunk
        )
        return logp.sum()

    shapes = _shapes(jax.make_jaxpr(jax.grad(total))(params).jaxpr)
    vocab_sized = [s for s in shapes if s and s[-1] == VOCAB and len(s) >= 3]
    assert vocab_sized, "the vocabulary axis should appear (per chunk)"
    assert max(int(np.prod(s)) for s in vocab_sized) <= b * chunk * VOCAB


def test_remat_and_chunked_attention_give_the_same_logprobs_and_gradient(model):
    """Remat (a checkpointed scan over the blocks) with attention 5 queries at a time against the plain
    forward: the same log-probs and gradient, and the attention scores held shrink to 5 queries (that remat
    bounds the compiled memory is checked in ``tests/test_memory_plan.py``)."""
    graphdef, params = nnx.split(model)
    prompt_ids, prompt_mask = padded_batch([6, 3], 8, VOCAB, side="left", seed=3)
    completion = jnp.asarray(np.random.default_rng(4).integers(1, VOCAB, (2, 9)))
    mask = jnp.asarray(np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32))  # one row ends early
    t = 8 + 9

    def total(params, attention_chunk):
        logp, _ = completion_logprobs(
            nnx.merge(graphdef, params),
            jnp.asarray(prompt_ids),
            jnp.asarray(prompt_mask),
            completion,
            mask,
            temperature=1.0,
            remat=attention_chunk > 0,
            attention_chunk=attention_chunk,
        )
        return jnp.sum(logp * mask), logp

    plain = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
    (_, whole), whole_grad = plain(params, 0)
    (_, chunked), chunked_grad = plain(params, 5)  # 17 queries = 5 + 5 + 5 + 2
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5)
    for a, b in zip(jax.tree.leaves(whole_grad), jax.tree.leaves(chunked_grad), strict=True):
        # the blocks' gradients come out of a scan, summed in another order: a few 1e-5 relative
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-3)
    heads = model.config.num_attention_heads
    for chunk, largest in ((0, t), (5, 5)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, c=chunk: total(p, c)[0]))(params)
        scores = [s for s in _shapes(jaxpr.jaxpr) if len(s) == 5 and s[-1] == t and s[0] == 2]  # [B,K,G,q,S]
        assert scores and max(s[1] * s[2] for s in scores) == heads
        assert max(s[3] for s in scores) == largest, chunk


def test_logprob_micro_batches_give_each_row_the_same_values(model):
    graphdef, params = nnx.split(model)
    prompt_ids, prompt_mask = padded_batch([6, 3, 8, 2], 8, VOCAB, side="left", seed=8)
    completion = jnp.asarray(np.random.default_rng(9).integers(1, VOCAB, (4, 6)))
    args = (jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), completion, jnp.ones((4, 6), jnp.int32))
    whole = logprobs_fn(graphdef, params, *args, 1.0)
    for micro_batches, attention_chunk in ((2, 0), (4, 3)):
        split = logprobs_fn(graphdef, params, *args, 1.0, micro_batches=micro_batches, attention_chunk=attention_chunk)
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), atol=2e-5, err_msg=str(micro_batches))


def test_rollout_masks_include_the_first_eos_and_flag_truncation(model):
    prompt_ids, prompt_mask = padded_batch([5, 7], 7, VOCAB, side="left", seed=3)
    graphdef, params = nnx.split(model)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    keys = row_keys(0, 0, ["a", "b"], 4)
    free = rollout(
        graphdef,
        params,
        prompt_ids,
        prompt_mask,
        keys=keys,
        num_generations=4,
        sampling=sampling,
        eos_ids=[VOCAB + 5],
        pad_id=0,
    )  # an id never sampled: nothing ends
    assert free.truncated_B.all() and free.completion_mask_BN.all()
    eos = int(free.completion_ids_BN[0, 3])  # row 0 emits this at position 3 (or earlier): make it EOS
    # pad == eos, as in Qwen: a "!= pad" mask would drop the EOS itself
    out = rollout(
        graphdef,
        params,
        prompt_ids,
        prompt_mask,
        keys=keys,
        num_generations=4,
        sampling=sampling,
        eos_ids=[eos],
        pad_id=eos,
    )
    assert out.prompt_ids_BP.shape == (8, 7)
    np.testing.assert_array_equal(out.prompt_ids_BP[:4], np.repeat(prompt_ids[:1] * prompt_mask[:1], 4, axis=0))
    np.testing.assert_array_equal(out.prompt_mask_BP[4:], np.repeat(prompt_mask[1:], 4, axis=0))
    for row in range(8):
        hits = np.flatnonzero(free.completion_ids_BN[row] == eos)
        length = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(out.completion_mask_BN[row], np.arange(12) < length)
        np.testing.assert_array_equal(out.completion_ids_BN[row, :length], free.completion_ids_BN[row, :length])
        assert out.truncated_B[row] == (hits.size == 0)
    assert out.lengths_B[0] <= 4 and not out.truncated_B[0]
    # The sampler's log-probs are what a teacher-forced pass gives for the kept tokens.
    logp = logprobs_fn(graphdef, params, *(jnp.asarray(a) for a in out[:4]), temperature=1.0, chunk=5)
    on = out.completion_mask_BN == 1
    np.testing.assert_allclose(np.asarray(logp)[on], out.sampler_logp_BN[on], atol=1e-4)


def test_row_keys_depend_on_sample_and_generation_not_position():
    a = jax.random.key_data(row_keys(3, 7, ["x", "y"], 2))
    b = jax.random.key_data(row_keys(3, 7, ["y", "x"], 2))
    np.testing.assert_array_equal(a[:2], b[2:])
    assert len({tuple(k) for k in a.tolist()}) == 4
    c = jax.random.key_data(row_keys(3, 8, ["x", "y"], 2))
    assert (a != c).any()


def test_row_keys_of_a_repeated_sample_differ_from_its_first_occurrence():
    once = jax.random.key_data(row_keys(3, 7, ["x", "y"], 2))
    twice = jax.random.key_data(row_keys(3, 7, ["x", "y", "x", "x"], 2))
    np.testing.assert_array_equal(twice[:4], once)  # first occurrences keep their keys
    assert len({tuple(k) for k in twice.tolist()}) == 8  # the repeats draw fresh ones


@pytest.mark.parametrize("rows_per_call, engine", [(3, "static"), (8, "static"), (5, "continuous"), (0, "continuous")])
def test_chunked_rollout_samples_exactly_what_one_call_samples(model, rows_per_call, engine):
    """Static chunks, or the continuous engine with that many slots: the same completions as one call."""
    prompt_ids, prompt_mask = padded_batch([5, 7, 2], 9, VOCAB, side="left", seed=7)
    graphdef, params = nnx.split(model)
    common = dict(
        keys=row_keys(0, 4, ["a", "b", "c"], 4),
        num_generations=4,
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9),
        eos_ids=[7],
        pad_id=0,
    )
    whole = rollout(graphdef, params, prompt_ids, prompt_mask, **common)
    chunked = rollout(graphdef, params, prompt_ids, prompt_mask, rows_per_call=rows_per_call, engine=engine, **common)
    for name, a, b in zip(whole._fields, whole, chunked, strict=True):
        if name != "sampler_logp_BN":
            np.testing.assert_array_equal(a, b, err_msg=name)
    # XLA:CPU's matmuls round differently at another row count (3 vs 12 rows: a few 1e-6).
    np.testing.assert_allclose(whole.sampler_logp_BN, chunked.sampler_logp_BN, atol=2e-5, rtol=0)


def test_rollout_does_not_depend_on_the_prompt_padding_width(model):
    prompt_ids, prompt_mask = padded_batch([5, 3], 5, VOCAB, side="left", seed=8)
    wide_ids = np.pad(prompt_ids, ((0, 0), (11, 0)))
    wide_mask = np.pad(prompt_mask, ((0, 0), (11, 0)))
    graphdef, params = nnx.split(model)
    common = dict(
        keys=row_keys(1, 0, ["a", "b"], 2),
        num_generations=2,
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        eos_ids=[7],
        pad_id=0,
    )
    narrow = rollout(graphdef, params, prompt_ids, prompt_mask, **common)
    wide = rollout(graphdef, params, wide_ids, wide_mask, rows_per_call=1, **common)
    np.testing.assert_array_equal(narrow.completion_ids_BN, wide.completion_ids_BN)
    np.testing.assert_allclose(narrow.sampler_logp_BN, wide.sampler_logp_BN, atol=1e-5)
