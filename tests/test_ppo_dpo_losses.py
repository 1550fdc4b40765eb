"""PPO and DPO maths: every function against numbers worked out by hand (or by a plain Python loop written
here), plus the DPO / IPO losses against TRL's ``DPOTrainer`` on the same log-probs."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.dpo import DPOLoss, build_pairs, dpo_loss, pair_losses
from rl.ppo import PPOLoss, gae, kl_penalty, masked_whiten, ppo_loss, token_rewards

TOL = dict(rtol=1e-6, atol=1e-6)
NAN = float("nan")

# Two rows of N = 4: three real tokens, then two. Padding holds garbage that must never matter.
MASK_2x4 = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])


def _all_finite(*arrays) -> bool:
    return all(np.all(np.isfinite(np.asarray(a))) for a in arrays)


# --- KL penalty and per-token rewards ----------------------------------------------------------------------


def test_kl_penalty_by_hand():
    # d = ref - logp on the real tokens: [-0.5, 1.0, 0.0 | 0.3, -2.0]; padding holds inf, NaN and 1e30.
    logp_BN = jnp.array([[-1.0, -2.0, -0.3, NAN], [-1.3, -0.5, -jnp.inf, 1e30]])
    ref_BN = jnp.array([[-1.5, -1.0, -0.3, 0.0], [-1.0, -2.5, 0.0, NAN]])
    k1_BN = kl_penalty(logp_BN, ref_BN, MASK_2x4, "k1")
    np.testing.assert_allclose(k1_BN, [[0.5, -1.0, 0.0, 0.0], [-0.3, 2.0, 0.0, 0.0]], **TOL)
    k3 = lambda d: math.exp(d) - d - 1.0  # noqa: E731
    k3_BN = kl_penalty(logp_BN, ref_BN, MASK_2x4, "k3")
    np.testing.assert_allclose(k3_BN, [[k3(-0.5), k3(1.0), 0.0, 0.0], [k3(0.3), k3(-2.0), 0.0, 0.0]], **TOL)
    assert np.all(np.asarray(k3_BN) >= 0.0)
    # The gradient does not see the padding either.
    grad_BN = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref_BN, MASK_2x4, "k3")))(logp_BN)
    assert _all_finite(k1_BN, k3_BN, grad_BN)
    np.testing.assert_array_equal(np.asarray(grad_BN)[np.asarray(MASK_2x4) == 0], 0.0)
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl_penalty(logp_BN, ref_BN, MASK_2x4, "k2")


def test_token_rewards_by_hand():
    # Rows: two real tokens, a completion filling N = 4, no token at all (it gets no score).
    kl_BN = jnp.array([[0.5, -1.0, NAN, 7.0], [1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask_BN = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards_BN = token_rewards(jnp.array([2.0, -1.0, 5.0]), kl_BN, mask_BN, kl_coef=0.1)
    expected_BN = [
        [-0.05, 0.1 + 2.0, 0.0, 0.0],
        [-0.1, -0.2, -0.3, -0.4 - 1.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    np.testing.assert_allclose(rewards_BN, expected_BN, **TOL)
    assert _all_finite(rewards_BN)


# --- whitening ----------------------------------------------------------------------------------------------


def test_masked_whiten_by_hand():
    # Real tokens [1, 2, 3 | 4, 10]: mean 4, unbiased var (9 + 4 + 1 + 0 + 36) / 4 = 12.5.
    x_BN = jnp.array([[1.0, 2.0, 3.0, NAN], [4.0, 10.0, 1e30, -1e30]])
    real = np.asarray(MASK_2x4) > 0
    std = math.sqrt(12.5 + 1e-8)
    expected_BN = np.where(real, (np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 10.0, 0.0, 0.0]]) - 4.0) / std, 0.0)
    white_BN = np.asarray(masked_whiten(x_BN, MASK_2x4))
    np.testing.assert_allclose(white_BN, expected_BN, **TOL)
    np.testing.assert_allclose(white_BN[real].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(white_BN[real].std(ddof=1), 1.0, rtol=1e-6)
    assert np.all(white_BN[~real] == 0.0)

    kept_BN = np.asarray(masked_whiten(x_BN, MASK_2x4, shift_mean=False))
    np.testing.assert_allclose(kept_BN, np.where(real, expected_BN + 4.0, 0.0), **TOL)
    np.testing.assert_allclose(kept_BN[real].mean(), 4.0, rtol=1e-6)
    np.testing.assert_allclose(kept_BN[real].std(ddof=1), 1.0, rtol=1e-6)
    assert np.all(kept_BN[~real] == 0.0)


def test_masked_whiten_single_token_is_finite():
    # One real token: the variance is 0 and its unbiased denominator would be 0; the result is exactly 0.
    white_BN = masked_whiten(jnp.array([[3.0, NAN]]), jnp.array([[1, 0]]))
    np.testing.assert_array_equal(white_BN, [[0.0, 0.0]])


# --- GAE ----------------------------------------------------------------------------------------------------


def _gae_loop(rewards_BN, values_BN, mask_BN, gamma, lam):
    """GAE by an explicit backwards loop over each row's real tokens; V after the last token is 0."""
    rewards_BN, values_BN, mask_BN = (np.asarray(a, np.float64) for a in (rewards_BN, values_BN, mask_BN))
    advantages_BN = np.zeros_like(rewards_BN)
    returns_BN = np.zeros_like(rewards_BN)
    for b in range(rewards_BN.shape[0]):
        length = int(mask_BN[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = values_BN[b, t + 1] if t + 1 < length else 0.0
            delta = rewards_BN[b, t] + gamma * next_value - values_BN[b, t]
            running = delta + gamma * lam * running
            advantages_BN[b, t] = running
            returns_BN[b, t] = running + values_BN[b, t]
    return advantages_BN, returns_BN


REWARDS_2x4 = jnp.array([[0.1, -0.2, 1.5, 100.0], [0.5, 1.0, NAN, 3.0]])
VALUES_2x4 = jnp.array([[0.3, 0.7, -0.4, 50.0], [0.2, 0.4, 9.0, NAN]])


def test_gae_by_hand():
    advantages_BN, returns_BN = gae(REWARDS_2x4, VALUES_2x4, MASK_2x4, gamma=0.9, lam=0.8)
    # Row 1 by hand: delta_1 = 1.0 + 0.9 * 0 - 0.4 = 0.6 (the 9.0 after the last token is not a value);
    # delta_0 = 0.5 + 0.9 * 0.4 - 0.2 = 0.66, A_0 = 0.66 + 0.72 * 0.6 = 1.092; returns A + V.
    np.testing.assert_allclose(advantages_BN[1], [1.092, 0.6, 0.0, 0.0], **TOL)
    np.testing.assert_allclose(returns_BN[1], [1.292, 1.0, 0.0, 0.0], **TOL)
    loop_advantages_BN, loop_returns_BN = _gae_loop(REWARDS_2x4, VALUES_2x4, MASK_2x4, 0.9, 0.8)
    np.testing.assert_allclose(advantages_BN, loop_advantages_BN, **TOL)
    np.testing.assert_allclose(returns_BN, loop_returns_BN, **TOL)
    assert _all_finite(advantages_BN, returns_BN)
    padding = np.asarray(MASK_2x4) == 0
    assert np.all(np.asarray(advantages_BN)[padding] == 0.0) and np.all(np.asarray(returns_BN)[padding] == 0.0)


def test_gae_undiscounted_is_return_to_go_minus_value():
    advantages_BN, returns_BN = gae(REWARDS_2x4, VALUES_2x4, MASK_2x4, gamma=1.0, lam=1.0)
    # Return-to-go over the real tokens: [1.4, 1.3, 1.5 | 1.5, 1.0].
    np.testing.assert_allclose(returns_BN, [[1.4, 1.3, 1.5, 0.0], [1.5, 1.0, 0.0, 0.0]], **TOL)
    expected_BN = [[1.4 - 0.3, 1.3 - 0.7, 1.5 + 0.4, 0.0], [1.5 - 0.2, 1.0 - 0.4, 0.0, 0.0]]
    np.testing.assert_allclose(advantages_BN, expected_BN, **TOL)


# --- the PPO objective --------------------------------------------------------------------------------------

# Five real tokens (row 1's last position is padding, all NaN). cliprange 0.2, cliprange_value 0.2.
# Policy: (A, r) = (1, 1.5) clipped to 1.2 -> -1.2; (1, 0.5) -> -0.5; (-1, 0.5) clipped to 0.8 -> 0.8;
#   (-1, 1.5) -> 1.5; (2, 1) -> -2. Mean -1.4 / 5 = -0.28; 2 of 5 clipped.
# Value: (V_old, V, R) = (0, 1, 0): clip V to 0.2, errors 1 vs 0.04, unclipped larger;
#   (0, 1, 2): errors 1 vs 3.24, clipped larger; (0, 0.1, 1): inside the clip, 0.81 both;
#   (1, 0.5, -1): clip V to 0.8, errors 2.25 vs 3.24, clipped larger; (0, -0.5, 0): 0.25 vs 0.04.
#   vf_loss = 0.5 * (1 + 3.24 + 0.81 + 3.24 + 0.25) / 5 = 0.854; 2 of 5 clipped.
PPO_MASK = jnp.array([[1, 1, 1], [1, 1, 0]])
PPO_RATIO = np.array([[1.5, 0.5, 0.5], [1.5, 1.0, 1.0]])
PPO_OLD_LOGP = jnp.array([[-1.0, -2.0, -0.5], [-0.7, -1.1, NAN]])
PPO_LOGP = PPO_OLD_LOGP + jnp.asarray(np.log(PPO_RATIO), jnp.float32)
PPO_ADV = jnp.array([[1.0, 1.0, -1.0], [-1.0, 2.0, NAN]])
PPO_VALUES = jnp.array([[1.0, 1.0, 0.1], [0.5, -0.5, NAN]])
PPO_OLD_VALUES = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, NAN]])
PPO_RETURNS = jnp.array([[0.0, 2.0, 1.0], [-1.0, 0.0, NAN]])
PPO_KW = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)


def _ppo(logp_BN=PPO_LOGP, values_BN=PPO_VALUES, old_values_BN=PPO_OLD_VALUES, returns_BN=PPO_RETURNS) -> PPOLoss:
    return ppo_loss(logp_BN, PPO_OLD_LOGP, PPO_ADV, values_BN, old_values_BN, returns_BN, PPO_MASK, **PPO_KW)


def test_ppo_loss_by_hand():
    out = _ppo()
    assert isinstance(out, PPOLoss)
    np.testing.assert_allclose(out.pg_loss, -0.28, **TOL)
    np.testing.assert_allclose(out.pg_clipfrac, 0.4, **TOL)
    np.testing.assert_allclose(out.vf_loss, 0.854, **TOL)
    np.testing.assert_allclose(out.vf_clipfrac, 0.4, **TOL)
    np.testing.assert_allclose(out.approx_kl, 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(2.0) ** 2) / 5, **TOL)
    np.testing.assert_allclose(out.loss, -0.28 + 0.1 * 0.854, **TOL)
    assert _all_finite(*out)


def test_ppo_loss_at_ratio_one_has_no_clipping():
    out = ppo_loss(PPO_OLD_LOGP, PPO_OLD_LOGP, PPO_ADV, PPO_OLD_VALUES, PPO_OLD_VALUES, PPO_RETURNS, PPO_MASK, **PPO_KW)
    # pg = -mean(A) = -(1 + 1 - 1 - 1 + 2) / 5; vf = 0.5 * mean((V_old - R)^2) = 0.5 * (0 + 4 + 1 + 4 + 0) / 5.
    np.testing.assert_allclose(out.pg_loss, -0.4, **TOL)
    np.testing.assert_allclose(out.vf_loss, 0.9, **TOL)
    assert out.pg_clipfrac == 0.0 and out.vf_clipfrac == 0.0 and out.approx_kl == 0.0


def test_ppo_loss_gradients_vanish_where_clipped():
    # d loss / dV = vf_coef * 0.5 / 5 * 2 (V - R) = 0.02 (V - R) where the unclipped error counts (inside the
    # clip range both branches give the same), 0 where the clipped error is active and larger.
    # The value inputs' padding holds finite garbage here (non-finite: see the next test).
    finite = dict(old_values_BN=PPO_OLD_VALUES.at[1, 2].set(-1e3), returns_BN=PPO_RETURNS.at[1, 2].set(1e3))
    grad_values_BN = jax.grad(lambda v: _ppo(values_BN=v, **finite).loss)(PPO_VALUES.at[1, 2].set(1e3))
    np.testing.assert_allclose(grad_values_BN, [[0.02, 0.0, -0.018], [0.0, -0.01, 0.0]], **TOL)
    # d loss / dlogp = -A r / 5 where the unclipped surrogate counts, 0 where the clipped one does.
    grad_logp_BN = jax.grad(lambda x: _ppo(logp_BN=x).loss)(PPO_LOGP)
    np.testing.assert_allclose(grad_logp_BN, [[0.0, -0.1, 0.0], [0.3, -0.4, 0.0]], **TOL)


def test_ppo_value_gradient_finite_with_nan_padding():
    # The padding's NaN values are masked before the squares, so they reach neither the loss nor its gradient.
    grad_values_BN = jax.grad(lambda v: _ppo(values_BN=v).loss)(PPO_VALUES)
    assert _all_finite(grad_values_BN)


# --- DPO and IPO --------------------------------------------------------------------------------------------

# Log-ratios c = logp_chosen - ref_chosen = [1, -0.5, 0], r = [0, 0.5, 0]; lengths (4, 2), (1, 3), (2, 2).
CHOSEN_LOGP = jnp.array([-3.0, -4.5, -2.0])
REF_CHOSEN = jnp.array([-4.0, -4.0, -2.0])
REJECTED_LOGP = jnp.array([-6.0, -1.5, -3.0])
REF_REJECTED = jnp.array([-6.0, -2.0, -3.0])
CHOSEN_TOKENS = jnp.array([4, 1, 2])
REJECTED_TOKENS = jnp.array([2, 3, 2])


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pair_losses_by_hand(beta):
    # sigmoid: -log sigmoid(beta * (c - r)) = softplus(-beta * (c - r)), c - r = [1, -1, 0].
    sigmoid_K = pair_losses(CHOSEN_LOGP, REJECTED_LOGP, REF_CHOSEN, REF_REJECTED, beta=beta, loss_type="sigmoid")
    np.testing.assert_allclose(sigmoid_K, [_softplus(-beta), _softplus(beta), math.log(2.0)], **TOL)
    # ipo: (c / n_c - r / n_r - 1 / (2 beta))^2 with c / n_c - r / n_r = [0.25, -0.5 - 1 / 6, 0].
    ipo_K = pair_losses(
        CHOSEN_LOGP,
        REJECTED_LOGP,
        REF_CHOSEN,
        REF_REJECTED,
        beta=beta,
        loss_type="ipo",
        chosen_tokens_K=CHOSEN_TOKENS,
        rejected_tokens_K=REJECTED_TOKENS,
    )
    margin = 1.0 / (2.0 * beta)
    np.testing.assert_allclose(ipo_K, [(0.25 - margin) ** 2, (-2 / 3 - margin) ** 2, margin**2], rtol=1e-6)


def test_pair_losses_validation():
    args = (CHOSEN_LOGP, REJECTED_LOGP, REF_CHOSEN, REF_REJECTED)
    with pytest.raises(ValueError, match="token counts"):
        pair_losses(*args, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="'sigmoid' or 'ipo'"):
        pair_losses(*args, beta=0.1, loss_type="hinge")


def _pad_pair(x_K, garbage):
    return jnp.concatenate([x_K, jnp.array([garbage], x_K.dtype)])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_metrics_and_padding_pair(loss_type):
    beta = 0.5
    lengths = dict(chosen_tokens_K=CHOSEN_TOKENS, rejected_tokens_K=REJECTED_TOKENS)
    out = dpo_loss(
        CHOSEN_LOGP, REJECTED_LOGP, REF_CHOSEN, REF_REJECTED, jnp.ones(3), beta=beta, loss_type=loss_type, **lengths
    )
    assert isinstance(out, DPOLoss)
    per_pair_K = pair_losses(
        CHOSEN_LOGP, REJECTED_LOGP, REF_CHOSEN, REF_REJECTED, beta=beta, loss_type=loss_type, **lengths
    )
    np.testing.assert_allclose(out.loss, np.mean(np.asarray(per_pair_K)), **TOL)
    # beta * c = [0.5, -0.25, 0], beta * r = [0, 0.25, 0]; only pair 0 has chosen > rejected (the tie is no win).
    np.testing.assert_allclose(out.chosen_rewards, 0.25 / 3, **TOL)
    np.testing.assert_allclose(out.rejected_rewards, 0.25 / 3, **TOL)
    np.testing.assert_allclose(out.reward_accuracy, 1 / 3, **TOL)

    # A fourth, padding pair full of garbage changes nothing.
    padded = dpo_loss(
        _pad_pair(CHOSEN_LOGP, NAN),
        _pad_pair(REJECTED_LOGP, -1e30),
        _pad_pair(REF_CHOSEN, 1e30),
        _pad_pair(REF_REJECTED, NAN),
        jnp.array([1, 1, 1, 0]),
        beta=beta,
        loss_type=loss_type,
        chosen_tokens_K=_pad_pair(CHOSEN_TOKENS, 0),
        rejected_tokens_K=_pad_pair(REJECTED_TOKENS, 0),
    )
    for field in DPOLoss._fields:
        np.testing.assert_allclose(getattr(padded, field), getattr(out, field), **TOL, err_msg=field)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_micro_batches_add_up(loss_type):
    # Four slots, three real pairs; split 2 + 2 with the batch's count of real pairs as the denominator.
    chosen_K, rejected_K = _pad_pair(CHOSEN_LOGP, 0.0), _pad_pair(REJECTED_LOGP, 0.0)
    ref_chosen_K, ref_rejected_K = _pad_pair(REF_CHOSEN, 0.0), _pad_pair(REF_REJECTED, 0.0)
    chosen_tokens_K, rejected_tokens_K = _pad_pair(CHOSEN_TOKENS, 0), _pad_pair(REJECTED_TOKENS, 0)
    mask_K = jnp.array([1, 1, 1, 0])
    arrays = (chosen_K, rejected_K, ref_chosen_K, ref_rejected_K, mask_K, chosen_tokens_K, rejected_tokens_K)

    def loss(part, num_pairs=None):
        c, r, rc, rr, m, nc, nr = (a[part] for a in arrays)
        kw = dict(beta=0.1, loss_type=loss_type, chosen_tokens_K=nc, rejected_tokens_K=nr, num_pairs=num_pairs)
        return dpo_loss(c, r, rc, rr, m, **kw).loss

    full = loss(slice(None))
    halves = loss(slice(0, 2), num_pairs=jnp.sum(mask_K)) + loss(slice(2, 4), num_pairs=jnp.sum(mask_K))
    np.testing.assert_allclose(halves, full, rtol=1e-6)
    # Without num_pairs each half is its own mean: the halves do not add up to the full batch's loss.
    assert not np.isclose(loss(slice(0, 2)) + loss(slice(2, 4)), full)


def test_build_pairs():
    # G = 3: mixed, all correct, all wrong, mixed with the incorrect one in the middle.
    correct_B = np.array([0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1], np.float32)
    pairs = build_pairs(correct_B, num_generations=3)
    np.testing.assert_array_equal(pairs.valid_K, [True, False, False, True])
    np.testing.assert_array_equal(pairs.chosen_K, [1, 0, 0, 9])
    np.testing.assert_array_equal(pairs.rejected_K, [0, 0, 0, 10])
    assert np.all(correct_B[pairs.chosen_K[pairs.valid_K]] == 1) and np.all(
        correct_B[pairs.rejected_K[pairs.valid_K]] == 0
    )


# --- parity with TRL ----------------------------------------------------------------------------------------


def _trl_dpo(per_token_logps_2KT, completion_mask_2KT, ref_chosen_K, ref_rejected_K, *, beta, loss_type):
    """Loss and reward metrics from TRL 1.16's ``DPOTrainer._compute_loss``, called unbound on a stand-in
    trainer (the attributes that method reads) and a stand-in model returning the given per-token
    log-probs (``[2K, T - 1]``, chosen rows first, 0 off the shifted completion mask). TRL and torch are
    imported here: loading them costs seconds that every test worker would pay at collection."""
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    rows, length = completion_mask_2KT.shape
    outputs = types.SimpleNamespace(
        log_probs=torch.as_tensor(per_token_logps_2KT),
        entropy=torch.zeros(rows, length - 1),
        mean_logits=torch.zeros(rows, length - 1),
        is_top1=torch.zeros(rows, length - 1, dtype=torch.bool),
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    completion_mask = torch.as_tensor(completion_mask_2KT)
    inputs = {
        "input_ids": torch.arange(rows * length).reshape(rows, length),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.as_tensor(ref_chosen_K),
        "ref_rejected_logps": torch.as_tensor(ref_rejected_K),
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss.item(), {k: metrics[f"rewards/{k}"][0] for k in ("chosen", "rejected", "accuracies")}


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_trl(loss_type, beta):
    # K = 3 pairs, prompt of 2 tokens, T = 8; completion lengths differ between chosen and rejected.
    rng = np.random.default_rng(0)
    prompt, length = 2, 8
    lengths_2K = np.array([6, 2, 4, 3, 5, 1])  # chosen 6, 2, 4; rejected 3, 5, 1
    completion_mask_2KT = (np.arange(length) >= prompt) & (np.arange(length) < prompt + lengths_2K[:, None])
    shifted_2KT = completion_mask_2KT[:, 1:]  # log-prob t predicts token t + 1
    per_token_2KT = np.where(shifted_2KT, -rng.exponential(size=shifted_2KT.shape), 0.0).astype(np.float32)
    logp_2K = per_token_2KT.sum(axis=1)
    ref_2K = (logp_2K + rng.normal(scale=2.0, size=6)).astype(np.float32)
    chosen_logp_K, rejected_logp_K = logp_2K[:3], logp_2K[3:]
    ref_chosen_K, ref_rejected_K = ref_2K[:3], ref_2K[3:]

    trl_loss, trl_rewards = _trl_dpo(
        per_token_2KT,
        completion_mask_2KT.astype(np.int64),
        ref_chosen_K,
        ref_rejected_K,
        beta=beta,
        loss_type=loss_type,
    )
    out = dpo_loss(
        chosen_logp_K,
        rejected_logp_K,
        ref_chosen_K,
        ref_rejected_K,
        jnp.ones(3),
        beta=beta,
        loss_type=loss_type,
        chosen_tokens_K=lengths_2K[:3],
        rejected_tokens_K=lengths_2K[3:],
    )
    np.testing.assert_allclose(out.loss, trl_loss, rtol=1e-5)
    np.testing.assert_allclose(out.chosen_rewards, trl_rewards["chosen"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.rejected_rewards, trl_rewards["rejected"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.reward_accuracy, trl_rewards["accuracies"], **TOL)
