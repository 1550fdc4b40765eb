"""Mixed precision: a bfloat16-compute GRPO step agrees with the float32 one and updates float32 master
weights by less than bfloat16 can represent; the trainer learns, resumes and refuses a changed precision;
SFT and SAE training learn with bfloat16 compute."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_trainer import _job

from rl.config import GRPOConfig
from rl.metrics import read_metrics
from rl.rollout import logprobs_fn
from rl.step import init_state, train_step
from rl.trainer import Trainer
from sae.activations import ArraySource
from sae.model import SAEConfig, SparseAutoencoder
from sae.train import TrainConfig, train
from saerl_jax import sft
from saerl_jax.data import load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.data.tinymath import generate
from saerl_jax.errors import UserError
from saerl_jax.model import Qwen2, Qwen2Config
from saerl_jax.precision import cast_floating

VOCAB = 128


def _model() -> Qwen2:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return Qwen2(config, rngs=nnx.Rngs(0))


def _batch(graphdef, params, cfg: GRPOConfig) -> dict:
    rng = np.random.default_rng(0)
    b, p, n = cfg.rows, 6, 5
    batch = {
        "prompt_ids_BP": jnp.asarray(rng.integers(1, VOCAB, (b, p)), jnp.int32),
        "prompt_mask_BP": jnp.ones((b, p), jnp.int32),
        "completion_ids_BN": jnp.asarray(rng.integers(1, VOCAB, (b, n)), jnp.int32),
        "loss_mask_BN": jnp.asarray(np.arange(n) < rng.integers(2, n + 1, (b, 1)), jnp.int32),
        "rewards_B": jnp.asarray(rng.random(b), jnp.float32),
    }
    args = [batch[k] for k in ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BN", "loss_mask_BN")]
    logp_BN = logprobs_fn(graphdef, params, *args, temperature=cfg.temperature)
    batch["old_logp_BN"] = logp_BN - 0.1 * jnp.asarray(rng.standard_normal(logp_BN.shape), jnp.float32)
    batch["ref_logp_BN"] = logp_BN + 0.1 * jnp.asarray(rng.standard_normal(logp_BN.shape), jnp.float32)
    return batch


def _sgd_step(compute_dtype: str):
    """One GRPO step with plain SGD at rate 1: the parameter change is minus the gradient."""
    graphdef, params = nnx.split(_model())
    cfg = GRPOConfig(batch_size=2, num_generations=4, num_iterations=2, compute_dtype=compute_dtype)
    batch = _batch(graphdef, params, cfg)
    optimizer = optax.sgd(1.0)
    state, metrics = train_step(graphdef, cfg, optimizer, init_state(params, optimizer), batch)
    grads = jax.tree.map(lambda before, after: before - after, params, state.params)
    return metrics, grads, state


def test_a_bfloat16_step_agrees_with_the_float32_step():
    metrics32, grads32, _ = _sgd_step("float32")
    metrics16, grads16, state16 = _sgd_step("bfloat16")
    assert {x.dtype for x in jax.tree.leaves(state16.params)} == {jnp.dtype(jnp.float32)}
    assert metrics16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(metrics16["entropy"], metrics32["entropy"], rtol=0.02)
    flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
    flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
    cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cosine > 0.99, cosine


def test_float32_compute_adds_no_casts():
    _, params = nnx.split(_model())
    same = zip(jax.tree.leaves(cast_floating(params, "float32")), jax.tree.leaves(params), strict=True)
    assert all(a is b for a, b in same)  # the very same arrays: the float32 step is unchanged


@pytest.mark.slow  # 13 s: `make test-slow`
def test_updates_below_bfloat16_resolution_move_the_float32_master_weights():
    """RMSNorm weights are 1: an Adam step of 1e-6 is far below bfloat16's spacing there (2**-7)."""
    graphdef, params = nnx.split(_model())
    cfg = GRPOConfig(batch_size=2, num_generations=4, num_iterations=2, learning_rate=1e-6, compute_dtype="bfloat16")
    batch = _batch(graphdef, params, cfg)
    optimizer = optax.adam(cfg.learning_rate)

    def norm_change(master_dtype):
        master = cast_floating(params, master_dtype)
        state, _ = train_step(graphdef, cfg, optimizer, init_state(master, optimizer), batch)
        before = np.asarray(master["norm"]["weight"][...], np.float64)
        return np.abs(np.asarray(state.params["norm"]["weight"][...], np.float64) - before).max()

    assert 0.5e-6 < norm_change("float32") < 2e-6
    assert norm_change("bfloat16") == 0.0  # a bfloat16 master would not move


LEARN = GRPOConfig(
    batch_size=4,
    num_generations=8,
    max_prompt_length=96,
    max_completion_length=8,
    beta=0.0,
    learning_rate=1e-2,
    max_steps=25,
    save_steps=25,
    compute_dtype="bfloat16",
)


@pytest.mark.slow
def test_reward_goes_up_with_bfloat16_compute(tiny_model, tmp_path, capsys):
    Trainer(_job(tiny_model, tmp_path, LEARN)).train()
    assert "precision: params float32, compute bfloat16, cache bfloat16" in capsys.readouterr().out
    rewards = [row["reward_mean"] for row in read_metrics(tmp_path)]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > max(5 * first, 0.5), rewards


@pytest.mark.slow  # two trainers in bfloat16 on CPU, about 20 s
def test_a_checkpoint_resumes_exactly_in_its_precision_and_refuses_another(tiny_model, tmp_path, capsys):
    cfg = dataclasses.replace(
        LEARN, batch_size=2, num_generations=4, beta=0.04, reference_dtype="bfloat16", max_steps=2, save_steps=1
    )
    straight = Trainer(_job(tiny_model, tmp_path / "straight", cfg))
    straight.train()
    assert "precision: params float32, compute bfloat16, reference bfloat16, cache bfloat16" in capsys.readouterr().out
    assert {x.dtype for x in jax.tree.leaves(straight.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    out = tmp_path / "resumed"
    Trainer(_job(tiny_model, out, dataclasses.replace(cfg, max_steps=1))).train()
    resumed = Trainer(_job(tiny_model, out, cfg, resume=True))
    assert resumed.step == 1
    resumed.train()
    assert {x.dtype for x in jax.tree.leaves(resumed.state.params)} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for other in ("float32", None):  # None: automatic, float32 on CPU
        changed = dataclasses.replace(cfg, compute_dtype=other)
        with pytest.raises(UserError, match=r"compute_dtype=bfloat16, but this run has compute_dtype=float32"):
            Trainer(_job(tiny_model, out, changed, resume=True))


def test_sft_learns_with_bfloat16_compute():
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    data = sft.tokenize_sft(tokenizer, generate(16, seed=2, noise_fraction=0.0), seq_len=96)
    config = dataclasses.replace(_model().config, vocab_size=len(tokenizer))
    model = Qwen2(config, rngs=nnx.Rngs(0))
    cfg = sft.SFTConfig(steps=12, batch_size=16, lr=1e-2, warmup_steps=2, compute_dtype="bfloat16")
    losses, _ = sft.train(model, data, cfg, progress=False)
    assert losses[-1] < losses[0] - 1.0, losses
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_sae_training_learns_with_bfloat16_compute():
    rng = np.random.default_rng(0)
    basis_FD = rng.standard_normal((64, 16)).astype(np.float32)
    codes_NF = rng.random((4096, 64)) * (rng.random((4096, 64)) < 0.06)
    acts_ND = (codes_NF @ basis_FD).astype(np.float32)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=4), rngs=nnx.Rngs(0))
    cfg = TrainConfig(total_steps=150, batch_size=256, lr=3e-3, warmup_steps=10, compute_dtype="bfloat16")
    trained, history = train(sae, ArraySource(acts_ND, 256, seed=0), cfg, progress=False)
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"], (history[0], history[-1])
    assert trained.W_enc[...].dtype == jnp.float32
