"""Parity of the NNX Qwen2 with transformers' Qwen2ForCausalLM, and the loader's contract."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import padded_batch
from flax import nnx

from saerl_jax.model import (
    Qwen2,
    Qwen2Config,
    bucket_length,
    causal_mask,
    forward,
    forward_fn,
    load_pretrained,
    positions_from_mask,
)

ATOL = 1e-4


def _hf_forward(hf_model, ids, mask):
    """transformers forward with the position ids its own ``generate`` derives from the mask."""
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    with torch.no_grad():
        return hf_model(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_every_capture_layer_match_transformers(hf_checkpoint, side):
    directory, hf_model = hf_checkpoint
    model = load_pretrained(directory)
    ids, mask = padded_batch([13, 7, 10], 13, hf_model.config.vocab_size, side=side)
    ref = _hf_forward(hf_model, ids, mask)
    real = mask.astype(bool)
    logits = np.asarray(forward(model, ids, mask))
    assert logits.shape == (3, 13, hf_model.config.vocab_size)
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=ATOL, rtol=0)
    for layer in range(hf_model.config.num_hidden_layers):
        hidden = np.asarray(forward(model, ids, mask, capture_layer=layer))
        assert hidden.shape == (3, 13, hf_model.config.hidden_size)
        np.testing.assert_allclose(hidden[real], ref.hidden_states[layer].numpy()[real], atol=ATOL, rtol=0)


def test_right_padding_needs_no_position_ids(small_checkpoint):
    directory, hf_model = small_checkpoint
    ids, mask = padded_batch([9, 4], 9, hf_model.config.vocab_size, side="right", seed=3)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(load_pretrained(directory)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=ATOL, rtol=0)


def test_capture_layer_never_runs_later_blocks(small_checkpoint):
    directory, _ = small_checkpoint
    model = load_pretrained(directory)
    ids, mask = padded_batch([8], 8, 320, side="right")
    expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), capture_layer=1))
    poisoned = model.layers[1].mlp.down_proj.kernel
    poisoned.set_value(jnp.full(poisoned.get_value().shape, jnp.nan))
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), capture_layer=1))
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), capture_layer=2))).all()


def test_capture_layer_out_of_range_is_an_error(small_checkpoint):
    model = load_pretrained(small_checkpoint[0])
    with pytest.raises(ValueError, match=r"capture_layer=3 is out of range: this model has 3 layers"):
        model(jnp.zeros((1, 4), jnp.int32), capture_layer=3)


def test_bfloat16_loading_and_its_error(small_checkpoint, capsys):
    directory, hf_model = small_checkpoint
    ids, mask = padded_batch([12, 6], 12, hf_model.config.vocab_size, side="left", seed=1)
    real = mask.astype(bool)
    model = load_pretrained(directory, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    ours = np.asarray(forward(model, ids, mask).astype(jnp.float32))[real]
    f32 = _hf_forward(hf_model, ids, mask).logits.numpy()[real]
    bf16 = _hf_forward(copy.deepcopy(hf_model).to(torch.bfloat16), ids, mask).logits.float().numpy()[real]
    err_vs_f32, err_vs_bf16 = np.abs(ours - f32).max(), np.abs(ours - bf16).max()
    with capsys.disabled():
        print(f"\nbf16 logits: max |ours - hf f32| = {err_vs_f32:.3g}, max |ours - hf bf16| = {err_vs_bf16:.3g}")
    scale = np.abs(f32).max()
    assert err_vs_f32 < 0.05 * scale
    assert err_vs_bf16 < 0.05 * scale


def test_kv_cache_decoding_equals_full_forward(small_checkpoint):
    model = load_pretrained(small_checkpoint[0])
    ids, mask = padded_batch([11, 6, 9], 11, 320, side="left", seed=2)
    prefix, total = 5, 11
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    positions = positions_from_mask(mask_j)
    slots = jnp.broadcast_to(jnp.arange(total), ids.shape)
    x, cache = model.hidden_states(
        ids_j[:, :prefix],
        positions[:, :prefix],
        causal_mask(mask_j, slots[:, :prefix]),
        cache=model.init_cache(3, total),
    )
    steps = [model.logits(x)]
    for t in range(prefix, total):
        x, cache = model.hidden_states(
            ids_j[:, t : t + 1],
            positions[:, t : t + 1],
            causal_mask(mask_j, slots[:, t : t + 1]),
            cache=cache,
            cache_index=t,
        )
        steps.append(model.logits(x))
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=ATOL, rtol=0)


def test_bucketed_forward_compiles_once_per_bucket(small_checkpoint):
    model = load_pretrained(small_checkpoint[0])
    graphdef, _ = nnx.split(model)
    before = forward_fn._cache_size()
    lengths = range(1, 100, 3)
    for t in lengths:
        forward(model, np.ones((2, t), np.int32), capture_layer=2)
    buckets = {bucket_length(t) for t in lengths}
    assert buckets == {32, 48, 64, 96, 128}
    assert forward_fn._cache_size() - before == len(buckets)
    del graphdef


def test_bucket_length_bounds_padding():
    for n in range(1, 5000):
        b = bucket_length(n, 32)
        assert b >= n and (b <= 32 or b <= n * 1.5 + 1)
    assert len({bucket_length(n, 32) for n in range(1, 4097)}) == 15


def test_full_size_qwen2p5_math_1p5b_shapes_without_allocating():
    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    sizes = [v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    assert sum(sizes) == 1_543_714_304
    graphdef, state = nnx.split(abstract)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    out = jax.eval_shape(lambda s, i: nnx.merge(graphdef, s)(i, capture_layer=27), state, ids)
    assert out.shape == (2, 64, 1536) and out.dtype == jnp.bfloat16


def test_config_reads_rope_theta_old_and_new_layout():
    base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16)
    base |= dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    assert Qwen2Config.from_hf_dict(base | {"rope_theta": 1e6}).rope_theta == 1e6
    new = base | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert Qwen2Config.from_hf_dict(new).rope_theta == 10000.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, r"cfg\.json: model_type is 'llama', expected 'qwen2'"),
        ({"use_sliding_window": True}, r"use_sliding_window=true is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn' is not supported"),
        ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads 3"),
        ({"vocab_size": None}, r"missing field\(s\) vocab_size"),
    ],
)
def test_config_errors(change, message):
    cfg = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16)
    cfg |= dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    cfg |= change
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        Qwen2Config.from_hf_dict(cfg, source="cfg.json")
