"""Continuous batching: the slot engine draws exactly what the static sampler draws for the same rows and
keys, whatever the slot count, admission order or sharing of prompts; greedy equals transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, padded_batch, save_hf_qwen2
from flax import nnx

from saerl_jax.model import SamplingConfig, generate_fn, load_pretrained
from saerl_jax.model.engine import EngineConfig, generate_continuous
from saerl_jax.model.qwen2 import _write_cache

EOS, PAD = 7, 0


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A wide-initialised checkpoint (greedy paths depend on context) and prompts of mixed lengths, each
    repeated G = 3 times with one key per row."""
    directory = tmp_path_factory.mktemp("engine")
    hf_model = save_hf_qwen2(directory, initializer_range=0.2, **CONFIGS["tied-gqa"])
    graphdef, params = nnx.split(load_pretrained(directory))
    ids, mask = padded_batch([9, 4, 7, 2, 6], 9, 320, side="left", seed=5)
    ids, mask = np.repeat(ids, 3, axis=0).astype(np.int32), np.repeat(mask, 3, axis=0).astype(np.int32)
    keys = jax.random.split(jax.random.key(11), len(ids))
    return graphdef, params, hf_model, ids, mask, keys


def _static(policy, cfg):
    graphdef, params, _, ids, mask, keys = policy
    eos = jnp.asarray([EOS], jnp.int32)
    out = generate_fn(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), keys, eos, jnp.int32(PAD), cfg)
    return [np.asarray(a) for a in out]


def _continuous(policy, cfg, engine, order=None):
    graphdef, params, _, ids, mask, keys = policy
    order = np.arange(len(ids)) if order is None else order
    out, stats = generate_continuous(
        graphdef, params, ids[order], mask[order], keys[order], sampling=cfg, eos_ids=[EOS], pad_id=PAD, engine=engine
    )
    back = np.argsort(order)
    return [np.asarray(a)[back] for a in out], stats


def _assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])  # tokens
    np.testing.assert_array_equal(got[2], want[2])  # completion mask
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)  # log-probs: prefill compiled on its own


@pytest.mark.parametrize(
    "temperature, top_p, slots, sync_steps", [(1.0, 1.0, 2, 1), (0.8, 0.9, 4, 3), (0.0, 1.0, 15, 5)]
)
def test_continuous_equals_static(policy, temperature, top_p, slots, sync_steps):
    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p)
    want = _static(policy, cfg)
    got, stats = _continuous(policy, cfg, EngineConfig(slots=slots, sync_steps=sync_steps))
    _assert_same(got, want)
    assert stats.items == 15 and stats.live_slot_steps == want[2].sum()
    if slots < 15:
        assert stats.admissions > 1  # slots were refilled mid-run
    if temperature > 0:
        assert 0 < want[2].sum() < want[2].size  # some rows end early
    assert len(stats.prefill_shapes) <= int(np.log2(stats.slots)) + 1


def test_a_completion_does_not_depend_on_its_slot_or_admission_time(policy):
    cfg = SamplingConfig(max_new_tokens=10)
    first, _ = _continuous(policy, cfg, EngineConfig(slots=4, sync_steps=2))
    order = np.random.default_rng(0).permutation(15)
    again, _ = _continuous(policy, cfg, EngineConfig(slots=3, sync_steps=1, min_free=2), order)
    _assert_same(again, first)


def test_rows_of_one_prompt_share_their_prefill(policy):
    cfg = SamplingConfig(max_new_tokens=4)
    _, stats = _continuous(policy, cfg, EngineConfig(slots=15))
    assert stats.admissions == 1 and stats.prefilled == 5  # 15 rows, 5 distinct prompts
    _, stats = _continuous(policy, cfg, EngineConfig(slots=3, sync_steps=1))
    assert stats.prefilled < stats.items


def test_continuous_greedy_equals_transformers(policy):
    graphdef, params, hf_model, ids, mask, _ = policy
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor(ids[::3]).long(),
            attention_mask=torch.tensor(mask[::3]).long(),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    keys = jax.random.split(jax.random.key(0), 5)
    out, _ = generate_continuous(
        graphdef,
        params,
        ids[::3],
        mask[::3],
        keys,
        sampling=cfg,
        eos_ids=[-1],
        pad_id=PAD,
        engine=EngineConfig(slots=2),
    )
    np.testing.assert_array_equal(out.tokens_BN, ref)
    assert len(np.unique(ref)) > 8


def test_per_row_cache_write():
    cache = jnp.zeros((3, 2, 5, 4))
    new = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 1, 4) + 1
    out = np.asarray(_write_cache(cache, new, jnp.array([0, 4, 2])))
    for row, slot in enumerate([0, 4, 2]):
        np.testing.assert_array_equal(out[row, :, slot], np.asarray(new[row, :, 0]))
        assert np.count_nonzero(out[row]) == 8
    dense = np.asarray(_write_cache(cache, jnp.ones((3, 2, 2, 4)), 1))
    assert (dense[:, :, 1:3] == 1).all() and dense.sum() == 3 * 2 * 2 * 4


def test_engine_config_is_checked():
    with pytest.raises(ValueError, match="slots"):
        EngineConfig(slots=0)
    with pytest.raises(ValueError, match="min_free"):
        EngineConfig(slots=4, min_free=5)
    assert EngineConfig(slots=64).admit_at == 8 and EngineConfig(slots=4, min_free=3).admit_at == 3


WORKER = Path(__file__).with_name("engine_worker.py")
ROOT = WORKER.parents[1]


def _sharded_decode(tmp_path, meshes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "engine.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), "1x1x1", *meshes], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return np.load(out)


def _check_mesh(saved, mesh: str, cache_spec: str, q_shards: int) -> None:
    """The same tokens as one device, slots split over the batch axes, parameters left sharded."""
    np.testing.assert_array_equal(saved[f"{mesh}/tokens"], saved["1x1x1/tokens"])
    np.testing.assert_array_equal(saved[f"{mesh}/mask"], saved["1x1x1/mask"])
    np.testing.assert_allclose(saved[f"{mesh}/logprobs"], saved["1x1x1/logprobs"], atol=1e-5)
    assert str(saved[f"{mesh}/cache_spec"]) == cache_spec and int(saved[f"{mesh}/cache_devices"]) == 8
    assert int(saved[f"{mesh}/q_proj_shards"]) == q_shards


def test_sharded_decoding_equals_one_device(tmp_path):
    saved = _sharded_decode(tmp_path, ["2x2x2"])
    lengths = saved["1x1x1/mask"].sum(axis=1)
    assert lengths.min() < lengths.max() and int(saved["1x1x1/admissions"]) > 3  # slots refilled mid-run
    _check_mesh(saved, "2x2x2", "P(('data', 'fsdp'), 'tensor')", q_shards=4)


@pytest.mark.slow
def test_sharded_decoding_equals_one_device_on_data_and_fsdp_tensor_meshes(tmp_path):
    saved = _sharded_decode(tmp_path, ["8x1x1", "1x4x2"])
    _check_mesh(saved, "8x1x1", "P('data',)", q_shards=1)
    _check_mesh(saved, "1x4x2", "P('fsdp', 'tensor')", q_shards=8)
