"""SAE training: a planted dictionary recovered, every variant learns and obeys its sparsity knob, AuxK
revives dead latents, straight-through gradients and the schedule by hand, real Qwen2 activations, resume
equal to no interruption, NaN raises."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import save_hf_qwen2
from flax import nnx

import sae.train as train_module
from sae import SAEConfig, SparseAutoencoder
from sae.activations import ArraySource, ModelSource, drop_outlier_norms, token_mask
from sae.metrics import fvu, reconstruction_metrics
from sae.train import TrainConfig, jumprelu_ste, learning_rate, step_ste, train
from saerl_jax.model import forward, load_pretrained

D_IN, D_SAE, K = 64, 128, 4
SPECIAL_IDS = (317, 318, 319)  # BOS-like, EOS-like and a separator, all excluded from SAE training
OUTLIER_ID = 7  # its embedding is blown up, so its residual norm is far above 10x the median


def planted_dictionary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples ``[n, D_IN]``, each a mix of K distinct unit directions of a dictionary ``[D_SAE, D_IN]``
    with coefficients uniform in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    dictionary_FD = rng.normal(size=(D_SAE, D_IN))
    dictionary_FD /= np.linalg.norm(dictionary_FD, axis=-1, keepdims=True)
    indices_NK = np.argsort(rng.random((n, D_SAE)), axis=-1)[:, :K]
    coef_NK = rng.uniform(0.5, 2.0, size=(n, K))
    x_ND = np.einsum("nk,nkd->nd", coef_NK, dictionary_FD[indices_NK])
    return x_ND.astype(np.float32), dictionary_FD


@pytest.fixture(scope="module")
def planted():
    """``(train [16384, D], held-out [2048, D], dictionary [F, D])``."""
    x_ND, dictionary_FD = planted_dictionary(16384 + 2048)
    return x_ND[:16384], x_ND[16384:], dictionary_FD


def _sae(architecture: str = "topk", seed: int = 0, **config) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=K, **config)
    return SparseAutoencoder(cfg, rngs=nnx.Rngs(seed))


def _train_planted(sae, x_ND, steps=400, **overrides):
    cfg = TrainConfig(
        **{"total_steps": steps, "batch_size": 512, "lr": 1e-2, "warmup_steps": 20, "dead_after_tokens": 20000}
        | overrides
    )
    return train(sae, ArraySource(x_ND, 512, seed=0), cfg, progress=False)


def _values(sae: SparseAutoencoder) -> dict[str, np.ndarray]:
    names = ["W_enc", "W_dec", "b_enc", "b_dec", "norm_scale"] + (["threshold"] if sae.threshold is not None else [])
    return {name: np.asarray(getattr(sae, name)[...]) for name in names}


# --- 1. TopK recovers a planted dictionary --------------------------------------------------------------


@pytest.mark.slow  # about a minute of CPU each; make test keeps the SAE trained on model activations
@pytest.mark.parametrize("data_seed,sae_seed", [(0, 0), (1, 0), (2, 0), (0, 42)])
def test_topk_recovers_planted_dictionary(planted, data_seed, sae_seed):
    if data_seed == 0:
        x_train, x_eval, dictionary_FD = planted
    else:
        x_ND, dictionary_FD = planted_dictionary(16384 + 2048, seed=data_seed)
        x_train, x_eval = x_ND[:16384], x_ND[16384:]
    sae, history = _train_planted(_sae(seed=sae_seed), x_train, steps=2000)
    assert len(history) == 2000
    assert history[-1]["fvu"] < 0.1 < history[0]["fvu"]
    # Measured on the held-out samples: FVU 0.052-0.064 and 94-98% of directions found over 8 seeds.
    value = fvu(x_eval, np.asarray(sae(jnp.asarray(x_eval)).x_hat))
    assert value < 0.08
    w_dec_FD = np.asarray(sae.W_dec[...])
    np.testing.assert_allclose(np.linalg.norm(w_dec_FD, axis=-1), 1.0, atol=1e-5)
    best_cos_F = np.abs(dictionary_FD @ w_dec_FD.T).max(axis=-1)
    assert np.mean(best_cos_F > 0.9) >= 0.9
    codes_NF = np.asarray(sae.encode(jnp.asarray(x_eval)))
    np.testing.assert_array_equal(np.sum(codes_NF > 0, axis=-1), K)


# --- 2. The other variants learn and their sparsity knobs work ------------------------------------------


def test_batchtopk_normalized_learns_with_inference_threshold(planted):
    x_train, x_eval, _ = planted
    scale = 30.0  # far from unit norm, so the fitted input scale matters
    sae, history = _train_planted(_sae("batchtopk", normalize_activations="expected_average_only_in"), scale * x_train)
    first_ND = next(ArraySource(scale * x_train, 512, seed=0).iterate())[0]
    norm_scale = float(sae.norm_scale[...])
    assert np.mean(np.sum((norm_scale * first_ND) ** 2, axis=-1)) == pytest.approx(D_IN, rel=0.05)
    assert np.mean(np.sum((norm_scale * scale * x_train) ** 2, axis=-1)) == pytest.approx(D_IN, rel=0.05)
    # Training keeps exactly k * batch codes per batch; inference uses the learned per-latent threshold.
    assert all(row["l0"] == K for row in history)
    threshold_F = np.asarray(sae.threshold[...])
    assert np.all(threshold_F > 0)
    metrics = reconstruction_metrics(sae, scale * x_eval)  # measured: FVU 0.11, L0 3.97
    assert 0.5 * K <= metrics["l0"] <= 1.5 * K
    assert metrics["fvu"] < 0.5


def test_relu_l1_coefficient_controls_sparsity(planted):
    x_train, x_eval, _ = planted
    l0s = []
    for l1 in (0.003, 0.03, 0.1):  # measured L0 96, 21, 6; FVU 0.014, 0.087, 0.16
        sae, _ = _train_planted(_sae("relu"), x_train, l1_coefficient=l1, l1_warmup_steps=50)
        metrics = reconstruction_metrics(sae, x_eval)
        assert metrics["fvu"] < 0.5
        l0s.append(metrics["l0"])
    assert l0s[0] > l0s[1] > l0s[2]
    assert l0s[0] > 3 * l0s[2]


def test_jumprelu_l0_coefficient_controls_sparsity(planted):
    x_train, x_eval, _ = planted
    l0s = []
    for l0_coefficient in (1e-3, 1e-2, 3e-2):  # measured L0 65, 5.0, 3.5; FVU 0.006, 0.094, 0.13
        sae, _ = _train_planted(_sae("jumprelu"), x_train, l0_coefficient=l0_coefficient)
        metrics = reconstruction_metrics(sae, x_eval)
        assert metrics["fvu"] < 0.5
        l0s.append(metrics["l0"])
    assert l0s[0] > l0s[1] > l0s[2]
    assert l0s[0] > 3 * l0s[2]


# --- 3. AuxK ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_auxk_revives_dead_latents(planted):
    """A quarter of the latents get encoder columns too weak to ever reach the top k: dead after 4 steps."""
    x_train, x_eval, _ = planted
    killed = np.arange(0, D_SAE, 4)

    def run(auxk_alpha):
        sae = _sae()
        sae.W_enc.set_value(sae.W_enc[...].at[:, killed].multiply(0.05))
        w_enc_killed = np.asarray(sae.W_enc[...])[:, killed]
        sae, history = _train_planted(sae, x_train, steps=300, dead_after_tokens=2048, auxk_alpha=auxk_alpha)
        return sae, [row["dead_fraction"] for row in history], w_enc_killed

    sae_off, dead_off, w_enc_before = run(0.0)
    # Dead once more than 2048 activations went by unfired: after the fifth batch of 512.
    assert dead_off[:4] == [0.0] * 4
    assert dead_off[4:] == [0.25] * (len(dead_off) - 4)
    # Without AuxK a dead latent gets no gradient at all.
    np.testing.assert_array_equal(np.asarray(sae_off.W_enc[...])[:, killed], w_enc_before)

    sae_on, dead_on, _ = run(1 / 32)  # measured: dead fraction 0.25 -> 0.055, held-out FVU 0.20 -> 0.085
    assert max(dead_on[:20]) > dead_on[-1]
    assert dead_on[-1] <= 0.125
    assert reconstruction_metrics(sae_on, x_eval)["fvu"] < 0.75 * reconstruction_metrics(sae_off, x_eval)["fvu"]


def test_auxk_is_zero_when_nothing_is_dead(planted):
    _, history = _train_planted(_sae(), planted[0], steps=30, dead_after_tokens=1_000_000)
    assert all(row["dead_fraction"] == 0.0 and row["auxk"] == 0.0 for row in history)


# --- 4. JumpReLU straight-through gradients, by hand ----------------------------------------------------

EPS = 0.1
THETA_F = np.array([0.5, 0.3, 0.2], np.float32)
# Within the kernel (|pre - theta| < EPS / 2): (0,0), (0,1), (1,0), (1,2), (2,1).
PRE_NF = np.array([[0.48, 0.30, 0.9], [0.53, 0.1, 0.21], [0.6, 0.34, 0.0]], np.float32)
G_NF = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32)


def _vjp(fn, pre, theta, g):
    out, pullback = jax.vjp(lambda p, t: fn(p, t, EPS), jnp.asarray(pre), jnp.asarray(theta))
    d_pre, d_theta = pullback(jnp.asarray(g))
    return np.asarray(out), np.asarray(d_pre), np.asarray(d_theta)


def test_jumprelu_ste_gradients_by_hand():
    out, d_pre, d_theta = _vjp(jumprelu_ste, PRE_NF, THETA_F, G_NF)
    np.testing.assert_allclose(out, [[0, 0, 0.9], [0.53, 0, 0.21], [0.6, 0.34, 0]])
    np.testing.assert_array_equal(d_pre, [[0, 0, 3], [4, 0, 6], [7, 8, 0]])  # g where pre > theta
    # -(theta / eps) * sum of g over the in-kernel entries: -(5)(1 + 4), -(3)(2 + 8), -(2)(6).
    np.testing.assert_allclose(d_theta, [-25.0, -30.0, -12.0], rtol=1e-5)
    # Leading axes are all summed: two copies double the threshold gradient.
    _, d_pre2, d_theta2 = _vjp(jumprelu_ste, np.stack([PRE_NF] * 2), THETA_F, np.stack([G_NF] * 2))
    np.testing.assert_array_equal(d_pre2, np.stack([d_pre] * 2))
    np.testing.assert_allclose(d_theta2, 2 * d_theta, rtol=1e-6)


def test_step_ste_gradients_by_hand():
    out, d_pre, d_theta = _vjp(step_ste, PRE_NF, THETA_F, G_NF)
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(d_pre, 0.0)
    # -(1 / eps) * sum of g over the in-kernel entries.
    np.testing.assert_allclose(d_theta, [-50.0, -100.0, -60.0], rtol=1e-5)
    _, _, d_theta2 = _vjp(step_ste, np.stack([PRE_NF] * 2), THETA_F, np.stack([G_NF] * 2))
    np.testing.assert_allclose(d_theta2, 2 * d_theta, rtol=1e-6)


# --- 5. Learning-rate schedule --------------------------------------------------------------------------


def test_learning_rate_schedule_by_hand():
    cfg = TrainConfig(total_steps=100, warmup_steps=10, decay_fraction=0.2, lr=3e-3)
    schedule = learning_rate(cfg, d_sae=1024)
    expected = {0: 0.0, 5: 1.5e-3, 10: 3e-3, 50: 3e-3, 80: 3e-3, 90: 1.5e-3, 95: 0.75e-3, 100: 0.0}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-9), step
    values = np.array([float(schedule(s)) for s in range(101)])
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[80:]) < 0)


@pytest.mark.parametrize("d_sae", [256, 2**14, 2**16])
def test_default_learning_rate_scales_with_width(d_sae):
    cfg = TrainConfig(total_steps=1000, warmup_steps=100)
    assert cfg.lr is None
    assert float(learning_rate(cfg, d_sae)(500)) == pytest.approx(2e-4 / np.sqrt(d_sae / 2**14), rel=1e-6)


# --- 6. Real activations from a Qwen2 model -------------------------------------------------------------


def test_token_mask_by_hand():
    ids = np.array([[318, 5, 317, 9, 0], [318, 12, 319, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    expected = np.array([[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(token_mask(ids, mask, SPECIAL_IDS), expected)
    np.testing.assert_array_equal(token_mask(ids, mask, ()), mask.astype(bool))  # padding alone is masked


def test_drop_outlier_norms_by_hand():
    norms = np.array([1.0, 2.0, 1.0, 10.0, 1.0, 10.5, 1.0, 40.0, 1.0])  # median 1: keep <= 10, drop 10.5, 40
    acts_ND = np.zeros((9, 3), np.float32)
    acts_ND[:, 1] = norms
    np.testing.assert_array_equal(drop_outlier_norms(acts_ND)[:, 1], [1.0, 2.0, 1.0, 10.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(drop_outlier_norms(acts_ND, factor=50.0), acts_ND)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random tiny Qwen2 whose token OUTLIER_ID has a 1000x embedding (an attention-sink-like norm)."""
    directory = tmp_path_factory.mktemp("sae-train-model")
    save_hf_qwen2(directory, vocab_size=320, hidden_size=64, num_hidden_layers=3)
    model = load_pretrained(directory)
    embedding = model.embed_tokens.embedding
    embedding.set_value(embedding[...].at[OUTLIER_ID].multiply(1000.0))
    return model


def _sequences(n: int, seed: int) -> list[np.ndarray]:
    """Random ids of lengths 8..40 between special tokens, a separator in every fifth, the outlier in every
    seventh."""
    rng = np.random.default_rng(seed)
    sequences = []
    for i in range(n):
        ids = rng.integers(10, 317, int(rng.integers(8, 41)))
        ids[0], ids[-1] = 318, 319
        if i % 5 == 0:
            ids[len(ids) // 2] = 317
        if i % 7 == 0:
            ids[len(ids) // 3] = OUTLIER_ID
        sequences.append(ids.astype(np.int32))
    return sequences


def test_model_source_keeps_only_real_tokens_and_drops_outliers(qwen):
    sequences = _sequences(40, seed=1)
    source = ModelSource(qwen, 2, sequences, batch_size=64, special_ids=SPECIAL_IDS, sequences_per_round=24, seed=3)
    got_ND = source.round_activations(1)  # sequences 24..39, then 0..7 (rounds wrap around)
    picked = [sequences[(24 + i) % 40] for i in range(24)]
    per_sequence = []
    for ids in picked:  # one unpadded sequence at a time, no masking needed
        acts_TD = np.asarray(forward(qwen, ids[None], capture_layer=2))[0]
        per_sequence.append(acts_TD[~np.isin(ids, SPECIAL_IDS)])
    all_ND = np.concatenate(per_sequence)
    norms = np.linalg.norm(all_ND, axis=-1)
    outliers = norms > 10 * np.median(norms)
    n_outlier_tokens = sum(int(np.sum(ids == OUTLIER_ID)) for ids in picked)
    assert n_outlier_tokens > 0 and outliers.sum() == n_outlier_tokens
    expected_ND = all_ND[~outliers][np.random.default_rng([3, 1]).permutation(int((~outliers).sum()))]
    assert got_ND.shape == expected_ND.shape  # no special, padding or outlier rows
    np.testing.assert_allclose(got_ND, expected_ND, atol=1e-4, rtol=1e-4)


def test_topk_sae_on_model_activations(qwen):
    source = ModelSource(
        qwen, 2, _sequences(200, seed=0), batch_size=256, special_ids=SPECIAL_IDS, sequences_per_round=64, seed=0
    )
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=256, architecture="topk", k=8), rngs=nnx.Rngs(0))
    cfg = TrainConfig(total_steps=300, batch_size=256, lr=5e-3, warmup_steps=20, dead_after_tokens=20000)
    sae, history = train(sae, source, cfg, progress=False)
    held_out = ModelSource(qwen, 2, _sequences(64, seed=99), batch_size=256, special_ids=SPECIAL_IDS, seed=0)
    metrics = reconstruction_metrics(sae, held_out.round_activations(0))
    assert metrics["fvu"] < 0.4  # measured 0.18 (training batches 0.19)
    assert metrics["l0"] == 8
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"]


# --- 7. Resume equals no interruption --------------------------------------------------------------------


def _checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _check_resume(make_sae, source, cfg, tmp_path, stop_after):
    full_sae, full_history = train(make_sae(), source, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    first_sae, first_history = train(
        make_sae(), source, cfg, checkpoint_dir=tmp_path / "cut", stop_after=stop_after, progress=False
    )
    assert len(first_history) == stop_after
    assert first_history == full_history[:stop_after]
    assert max(_checkpoint_steps(tmp_path / "cut")) == stop_after
    resumed_sae, resumed_history = train(make_sae(), source, cfg, checkpoint_dir=tmp_path / "cut", progress=False)
    assert resumed_history == full_history[stop_after:]
    full_values, resumed_values = _values(full_sae), _values(resumed_sae)
    for name, value in full_values.items():
        np.testing.assert_array_equal(resumed_values[name], value, err_msg=name)
    assert any(not np.array_equal(v, _values(first_sae)[k]) for k, v in full_values.items())

    # A restart after completion restores the final state and trains no further.
    steps_before = _checkpoint_steps(tmp_path / "full")
    again_sae, again_history = train(make_sae(), source, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    assert again_history == []
    assert _checkpoint_steps(tmp_path / "full") == steps_before
    for name, value in _values(again_sae).items():
        np.testing.assert_array_equal(value, full_values[name], err_msg=name)
    return steps_before


@pytest.mark.parametrize(
    "architecture,normalize",
    [("topk", "none"), ("batchtopk", "expected_average_only_in"), ("jumprelu", "expected_average_only_in")],
)
def test_resume_equals_no_interruption_array_source(planted, tmp_path, architecture, normalize):
    source = ArraySource(planted[0][:4096], 256, seed=1)  # 16 batches an epoch: the run crosses epochs
    cfg = TrainConfig(
        total_steps=40, batch_size=256, lr=1e-2, warmup_steps=5, dead_after_tokens=2048, checkpoint_every=15
    )
    steps = _check_resume(
        lambda: _sae(architecture, normalize_activations=normalize), source, cfg, tmp_path, stop_after=20
    )
    assert steps == [30, 40]  # every 15 steps and at the end, the last two kept


def test_resume_equals_no_interruption_model_source(qwen, tmp_path):
    # About 5 batches a round: the cut at step 8 falls inside a round and the run crosses rounds.
    source = ModelSource(
        qwen, 2, _sequences(40, seed=2), batch_size=64, special_ids=SPECIAL_IDS, sequences_per_round=16, seed=0
    )
    cfg = TrainConfig(total_steps=16, batch_size=64, lr=5e-3, warmup_steps=2, checkpoint_every=5)
    steps = _check_resume(
        lambda: SparseAutoencoder(SAEConfig(d_in=64, d_sae=128, k=8), rngs=nnx.Rngs(0)),
        source,
        cfg,
        tmp_path,
        stop_after=8,
    )
    assert steps == [15, 16]


# --- 8. Non-finite loss, and the caller's SAE ----------------------------------------------------------


class NaNFrom:
    """``source`` with batch ``bad`` (counted from the first yielded) replaced by NaN."""

    def __init__(self, source, bad: int):
        self.source, self.bad = source, bad

    def iterate(self, position=(0, 0)):
        for i, (x_ND, next_position) in enumerate(self.source.iterate(position)):
            yield (np.full_like(x_ND, np.nan) if i == self.bad else x_ND), next_position


@pytest.mark.parametrize("bad", [3, 9])  # a middle step, and the last one (its metrics are read after the loop)
def test_nan_loss_raises(planted, bad):
    source = NaNFrom(ArraySource(planted[0][:2048], 128), bad)
    cfg = TrainConfig(total_steps=10, batch_size=128, lr=1e-2, warmup_steps=2)
    with pytest.raises(FloatingPointError, match="nan"):
        train(_sae(), source, cfg, progress=False)


def test_nan_step_is_not_checkpointed(planted, tmp_path):
    """The step before a checkpoint goes NaN: the error must come before that state is saved, or every
    resume restores NaN parameters, even on clean data."""
    clean = ArraySource(planted[0][:2048], 128)
    cfg = TrainConfig(total_steps=10, batch_size=128, lr=1e-2, warmup_steps=2, checkpoint_every=5)
    with pytest.raises(FloatingPointError):
        train(_sae(), NaNFrom(clean, 4), cfg, checkpoint_dir=tmp_path, progress=False)
    deadline = time.monotonic() + 30  # let a background Orbax save finish
    while any("tmp" in p.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        sae, _ = train(_sae(), clean, cfg, checkpoint_dir=tmp_path, progress=False)
    except FloatingPointError:
        pytest.fail(f"resuming on clean data restored a NaN state from checkpoint {_checkpoint_steps(tmp_path)}")
    assert all(np.all(np.isfinite(value)) for value in _values(sae).values())


def test_callers_sae_stays_usable(planted):
    """``train`` donates its state buffers to the jitted step; the SAE object passed in must survive."""
    sae = _sae()
    trained, _ = train(
        sae, ArraySource(planted[0][:2048], 128), TrainConfig(total_steps=3, batch_size=128), progress=False
    )
    np.asarray(sae.W_enc[...])
    np.asarray(trained.W_enc[...])


def test_resume_refuses_a_checkpoint_of_another_state_layout(planted, tmp_path, monkeypatch):
    source = ArraySource(planted[0][:1024], 256, seed=1)
    cfg = TrainConfig(total_steps=4, batch_size=256, warmup_steps=1, checkpoint_every=2)
    monkeypatch.setattr(train_module, "STATE_LAYOUT", "W_enc [D, F]")
    train(_sae("topk"), source, cfg, checkpoint_dir=tmp_path, stop_after=2, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"layout W_enc \[D, F\].*needs W_enc \[F, D\].*empty checkpoint directory"):
        train(_sae("topk"), source, cfg, checkpoint_dir=tmp_path, progress=False)
