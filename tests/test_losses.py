"""GRPO / DAPO maths: every function against numbers worked out by hand in the test, plus the properties the
trainer relies on (advantages summing to zero per group, micro-batches adding up, finite gradients)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.losses import (
    LOSS_TYPES,
    LossOutput,
    aggregate,
    clipped_surrogate,
    group_advantages,
    group_reward_std,
    groups_with_signal,
    k3_kl,
    log_importance_weights,
    masked_mean,
    overlong_penalty,
    policy_loss,
)

TOL = dict(rtol=1e-6, atol=1e-6)

# Two groups of three: [1, 2, 3] has mean 2, sample var (1 + 0 + 1) / 2 = 1; [0, 0, 3] has mean 1,
# sample var (1 + 1 + 4) / 2 = 3. The whole batch has mean 1.5 and sample var 9.5 / 5 = 1.9.
REWARDS = jnp.array([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
CENTRED = np.array([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])


# --- advantages and reward statistics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "denominator"),
    [
        ("group", np.array([1.0, 1.0, 1.0, math.sqrt(3), math.sqrt(3), math.sqrt(3)]) + 1e-4),
        ("batch", np.full(6, math.sqrt(1.9) + 1e-4)),
        ("none", np.ones(6)),
    ],
)
def test_group_advantages_by_hand(scale, denominator):
    adv_B = group_advantages(REWARDS, num_generations=3, scale_rewards=scale)
    np.testing.assert_allclose(adv_B, CENTRED / denominator, **TOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_gives_exact_zeros(scale):
    rewards_B = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.3])
    adv_B = np.asarray(group_advantages(rewards_B, num_generations=3, scale_rewards=scale))
    assert np.all(adv_B[:6] == 0.0)
    assert np.all(adv_B[6:] != 0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_sum_to_zero_per_group(scale):
    rewards_B = jnp.asarray(np.random.default_rng(0).normal(size=32), jnp.float32)
    adv_KxG = np.asarray(group_advantages(rewards_B, num_generations=8, scale_rewards=scale)).reshape(4, 8)
    np.testing.assert_allclose(adv_KxG.sum(axis=1), 0.0, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_single_generation_gives_zero_advantages(scale):
    adv_B = group_advantages(jnp.array([1.0, 2.0, 5.0]), num_generations=1, scale_rewards=scale)
    assert np.all(np.asarray(adv_B) == 0.0)


def test_group_advantages_validates_and_jits():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(jnp.ones(5), num_generations=2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(jnp.ones(4), num_generations=2, scale_rewards="std")
    jitted = jax.jit(group_advantages, static_argnames=("num_generations", "scale_rewards"))
    np.testing.assert_allclose(jitted(REWARDS, num_generations=3, scale_rewards="none"), CENTRED, **TOL)


def test_group_reward_std():
    np.testing.assert_allclose(group_reward_std(REWARDS, 3), [1.0, math.sqrt(3)], **TOL)
    std_K = np.asarray(group_reward_std(jnp.array([0.1, 0.1, 0.1, 0.0, 1.0, 0.0]), 3))
    assert std_K[0] == 0.0  # exact, so frac_reward_zero_std can compare with 0
    np.testing.assert_allclose(std_K[1], math.sqrt((1 / 9 + 4 / 9 + 1 / 9) / 2), **TOL)
    assert np.all(np.asarray(group_reward_std(jnp.array([1.0, 2.0]), 1)) == 0.0)
    with pytest.raises(ValueError):
        group_reward_std(jnp.ones(3), 2)


def test_groups_with_signal():
    signal_K = groups_with_signal(np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5]), 2)
    assert isinstance(signal_K, np.ndarray)
    assert signal_K.dtype == bool
    np.testing.assert_array_equal(signal_K, [False, True, False, False])
    np.testing.assert_array_equal(groups_with_signal(jnp.array([0.0, 1.0, 1.0, 1.0]), 4), [True])
    with pytest.raises(ValueError):
        groups_with_signal(np.ones(5), 2)


# --- overlong penalty and KL -------------------------------------------------------------------------------


def test_overlong_penalty_by_hand():
    # expected = 100 - 20 = 80; inside the buffer the penalty is -(L - 80) / 20 * 0.5.
    lengths_B = jnp.array([10, 80, 90, 95, 100, 130])
    penalty_B = overlong_penalty(
        lengths_B, max_completion_length=100, overlong_buffer_len=20, overlong_penalty_factor=0.5
    )
    np.testing.assert_allclose(penalty_B, [0.0, 0.0, -0.25, -0.375, -0.5, -0.5], **TOL)


def test_overlong_penalty_zero_buffer_and_validation():
    penalty_B = overlong_penalty(jnp.array([5, 100]), 100, overlong_buffer_len=0, overlong_penalty_factor=1.0)
    assert np.all(np.asarray(penalty_B) == 0.0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(jnp.array([5]), 100, overlong_buffer_len=101, overlong_penalty_factor=1.0)


def test_k3_kl_by_hand():
    # d = ref - logp = [-0.5, 1.0, 0.0]: exp(-0.5) + 0.5 - 1 and e - 2 and 0.
    kl_BN = k3_kl(jnp.array([[-1.0, -2.0, -0.3]]), jnp.array([[-1.5, -1.0, -0.3]]))
    np.testing.assert_allclose(kl_BN, [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]], **TOL)


def test_k3_kl_zero_at_equality_and_nonnegative():
    rng = np.random.default_rng(1)
    logp_BN = jnp.asarray(-rng.exponential(size=(4, 16)), jnp.float32)
    ref_BN = jnp.asarray(-rng.exponential(size=(4, 16)), jnp.float32)
    assert np.all(np.asarray(k3_kl(logp_BN, logp_BN)) == 0.0)
    assert np.all(np.asarray(k3_kl(logp_BN, ref_BN)) >= 0.0)


# --- importance weights and the clipped surrogate ----------------------------------------------------------

LOGP_BN = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0], [-1.0, -1.0, -1.0]])
OLD_BN = jnp.array([[-1.5, -2.0, -2.0], [-1.0, -0.2, -50.0], [0.0, 0.0, 0.0]])
MASK_BN = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_log_importance_weights_token():
    log_ratio_BN = log_importance_weights(LOGP_BN, OLD_BN, MASK_BN, "token")
    np.testing.assert_allclose(log_ratio_BN, [[0.5, 0.0, -1.0], [0.5, -0.3, 0.0], [0.0, 0.0, 0.0]], **TOL)


def test_log_importance_weights_sequence():
    # Row 0: (0.5 + 0 - 1) / 3; row 1: (0.5 - 0.3) / 2, the padded 59 ignored; row 2: empty, so 0.
    log_ratio_B1 = log_importance_weights(LOGP_BN, OLD_BN, MASK_BN.astype(bool), "sequence")
    assert log_ratio_B1.shape == (3, 1)
    np.testing.assert_allclose(log_ratio_B1, [[-1 / 6], [0.1], [0.0]], **TOL)


RATIOS = np.array([0.5, 0.9, 1.1, 1.5])


def test_clipped_surrogate_by_hand():
    # Clip range [0.8, 1.28]. A = 2: -A * min(r, clip(r)) = -2 * [0.5, 0.9, 1.1, 1.28].
    # A = -1: -A * max(r, clip(r)) = [0.8, 0.9, 1.1, 1.5]. A = 0: nothing.
    log_ratio_BN = jnp.asarray(np.log(np.tile(RATIOS, (3, 1))), jnp.float32)
    loss_BN, low_BN, high_BN = clipped_surrogate(log_ratio_BN, jnp.array([2.0, -1.0, 0.0]), 0.2, 0.28)
    np.testing.assert_allclose(loss_BN, [[-1.0, -1.8, -2.2, -2.56], [0.8, 0.9, 1.1, 1.5], [0.0] * 4], **TOL)
    np.testing.assert_array_equal(low_BN, [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(high_BN, [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_clipped_surrogate_gradient_vanishes_where_clipped():
    # d/dlog r of -A * r is -A * r where unclipped, 0 where the clipped branch is the minimum.
    log_ratio_BN = jnp.asarray(np.log(np.tile(RATIOS, (2, 1))), jnp.float32)
    advantages_B = jnp.array([2.0, -1.0])
    grad_BN = jax.grad(lambda x: jnp.sum(clipped_surrogate(x, advantages_B, 0.2, 0.28)[0]))(log_ratio_BN)
    np.testing.assert_allclose(grad_BN, [[-1.0, -1.8, -2.2, 0.0], [0.0, 0.9, 1.1, 1.5]], **TOL)


def test_clipped_surrogate_sequence_shape():
    loss_B1, low_B1, high_B1 = clipped_surrogate(jnp.log(jnp.array([[0.5], [1.5]])), jnp.array([-1.0, 1.0]), 0.2, 0.2)
    assert loss_B1.shape == low_B1.shape == high_B1.shape == (2, 1)
    np.testing.assert_allclose(loss_B1, [[0.8], [-1.2]], **TOL)
    np.testing.assert_array_equal(low_B1, [[True], [False]])
    np.testing.assert_array_equal(high_B1, [[False], [True]])


# --- aggregation --------------------------------------------------------------------------------------------

LOSS_2x3 = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK_2x3 = jnp.array([[1, 1, 0], [1, 1, 1]])
# Row means 1.5 and 5; masked sum 18 over 5 tokens; max_completion_length 4.
EXPECTED_2x3 = {"grpo": 3.25, "bnpo": 3.6, "dr_grpo": 18 / 8, "dapo": 3.6}
# The same with a third, empty row [7, 8, 9]: it counts as a sequence for grpo and dr_grpo only.
EXPECTED_3x3 = {"grpo": 6.5 / 3, "bnpo": 3.6, "dr_grpo": 18 / 12, "dapo": 3.6}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_by_hand(loss_type):
    np.testing.assert_allclose(aggregate(LOSS_2x3, MASK_2x3, loss_type, 4), EXPECTED_2x3[loss_type], **TOL)
    loss_3x3 = jnp.concatenate([LOSS_2x3, jnp.array([[7.0, 8.0, 9.0]])])
    mask_3x3 = jnp.concatenate([MASK_2x3, jnp.zeros((1, 3), jnp.int32)])
    np.testing.assert_allclose(aggregate(loss_3x3, mask_3x3, loss_type, 4), EXPECTED_3x3[loss_type], **TOL)


def test_aggregate_dapo_num_items_and_masked_nan():
    np.testing.assert_allclose(aggregate(LOSS_2x3, MASK_2x3, "dapo", 4, num_items=10), 1.8, **TOL)
    loss_BN = LOSS_2x3.at[0, 2].set(jnp.nan)  # padding: excluded, not multiplied by 0
    for loss_type in LOSS_TYPES:
        np.testing.assert_allclose(aggregate(loss_BN, MASK_2x3, loss_type, 4), EXPECTED_2x3[loss_type], **TOL)


def test_aggregate_broadcasts_sequence_loss():
    # A [B, 1] loss of [2, -1] over lengths 2 and 3: grpo (2 - 1) / 2, dapo (4 - 3) / 5.
    loss_B1 = jnp.array([[2.0], [-1.0]])
    np.testing.assert_allclose(aggregate(loss_B1, MASK_2x3, "grpo", 4), 0.5, **TOL)
    np.testing.assert_allclose(aggregate(loss_B1, MASK_2x3, "dapo", 4), 0.2, **TOL)


def test_aggregate_unknown_type_lists_choices():
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        aggregate(LOSS_2x3, MASK_2x3, "ppo", 4)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_micro_batches_add_up(split):
    rng = np.random.default_rng(2)
    loss_BN = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    mask_BN = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [0], [2], [3]]), jnp.float32)
    halves = [(loss_BN[:split], mask_BN[:split]), (loss_BN[split:], mask_BN[split:])]
    num_items = jnp.sum(mask_BN)  # 10 tokens in the global batch
    dapo = sum(aggregate(loss, mask, "dapo", 5, num_items=num_items) for loss, mask in halves)
    np.testing.assert_allclose(dapo, aggregate(loss_BN, mask_BN, "dapo", 5), **TOL)
    for loss_type in ("grpo", "dr_grpo"):
        weighted = sum(mask.shape[0] / 4 * aggregate(loss, mask, loss_type, 5) for loss, mask in halves)
        np.testing.assert_allclose(weighted, aggregate(loss_BN, mask_BN, loss_type, 5), **TOL)


def test_masked_mean():
    np.testing.assert_allclose(
        masked_mean(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[1, 0], [1, 1]])), 8 / 3, **TOL
    )
    assert masked_mean(jnp.ones((2, 2)), jnp.zeros((2, 2))) == 0.0
    np.testing.assert_allclose(masked_mean(jnp.array([[1.0], [4.0]]), MASK_2x3), (2 + 12) / 5, **TOL)


# --- the full objective -------------------------------------------------------------------------------------

ADV_B = jnp.array([2.0, -1.0])
LOGP_2x3 = jnp.array([[-0.7, -1.2, -0.1], [-2.0, -0.3, -0.9]])
# At ratio 1 the per-token loss is -A: -2 on row 0's two tokens, +1 on row 1's three.
AT_RATIO_ONE = {"grpo": (-2.0 + 1.0) / 2, "bnpo": (-4.0 + 3.0) / 5, "dr_grpo": (-4.0 + 3.0) / 8, "dapo": -0.2}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_at_ratio_one(loss_type, level):
    out = policy_loss(
        LOGP_2x3,
        LOGP_2x3,
        ADV_B,
        MASK_2x3,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=4,
    )
    assert isinstance(out, LossOutput)
    np.testing.assert_allclose(out.loss, AT_RATIO_ONE[loss_type], **TOL)
    assert out.kl == 0.0 and out.clip_low == 0.0 and out.clip_high == 0.0 and out.clip_region == 0.0


@pytest.mark.parametrize(
    ("loss_type", "level", "expected_BN"),
    [
        # dapo: d/dlogp of -A_b * r_t / 5 at r = 1 is -A_b / 5 on active tokens.
        ("dapo", "token", [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]),
        # grpo: -A_b / (len_b * B); GSPO's sequence ratio gives the same at r = 1.
        ("grpo", "token", [[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        ("grpo", "sequence", [[-0.5, -0.5, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
        # dr_grpo: -A_b / (B * max_completion_length).
        ("dr_grpo", "token", [[-0.25, -0.25, 0.0], [0.125, 0.125, 0.125]]),
    ],
)
def test_policy_loss_gradient_at_ratio_one(loss_type, level, expected_BN):
    def loss_fn(logp_BN):
        return policy_loss(
            logp_BN,
            jax.lax.stop_gradient(logp_BN),
            ADV_B,
            MASK_2x3,
            loss_type=loss_type,
            importance_sampling_level=level,
            max_completion_length=4,
        ).loss

    np.testing.assert_allclose(jax.grad(loss_fn)(LOGP_2x3), expected_BN, **TOL)


def test_policy_loss_kl_term():
    # ref - logp on active tokens: [0.5, -0.5 | 1, 0, 0]; the padded ref of +100 must not matter.
    ref_BN = LOGP_2x3 + jnp.array([[0.5, -0.5, 100.0], [1.0, 0.0, 0.0]])
    kl_tokens = [math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, math.e - 2.0, 0.0, 0.0]
    expected_kl = sum(kl_tokens) / 5
    common = dict(ref_logp_BN=ref_BN, loss_type="bnpo", max_completion_length=4)
    without = policy_loss(LOGP_2x3, LOGP_2x3, ADV_B, MASK_2x3, beta=0.0, **common)
    with_kl = policy_loss(LOGP_2x3, LOGP_2x3, ADV_B, MASK_2x3, beta=0.04, **common)
    np.testing.assert_allclose(without.kl, expected_kl, **TOL)
    np.testing.assert_allclose(without.loss, AT_RATIO_ONE["bnpo"], **TOL)
    np.testing.assert_allclose(with_kl.loss, AT_RATIO_ONE["bnpo"] + 0.04 * expected_kl, **TOL)
    grad_BN = jax.grad(lambda x: policy_loss(x, jax.lax.stop_gradient(x), ADV_B, MASK_2x3, beta=0.04, **common).loss)(
        LOGP_2x3
    )
    assert np.all(np.isfinite(np.asarray(grad_BN)))
    assert grad_BN[0, 2] == 0.0


def test_policy_loss_needs_reference_for_beta():
    with pytest.raises(ValueError, match="ref_logp_BN"):
        policy_loss(LOGP_2x3, LOGP_2x3, ADV_B, MASK_2x3, beta=0.1, max_completion_length=4)


def test_policy_loss_clip_fractions():
    # Row 0 (A = 1): ratios 0.5, 1, 1.5, 1.25 -> only 1.5 exceeds 1.28. Row 1 (A = -1): 0.5 and 0.7 fall below
    # 0.8; its last position is padding. 7 active tokens: 2 low, 1 high.
    ratios_BN = np.array([[0.5, 1.0, 1.5, 1.25], [0.5, 0.7, 1.0, 0.1]])
    old_BN = jnp.zeros((2, 4))
    mask_BN = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    logp_BN = jnp.asarray(np.log(ratios_BN), jnp.float32)
    adv_B = jnp.array([1.0, -1.0])
    out = policy_loss(logp_BN, old_BN, adv_B, mask_BN, epsilon=0.2, epsilon_high=0.28, max_completion_length=4)
    np.testing.assert_allclose([out.clip_low, out.clip_high, out.clip_region], [2 / 7, 1 / 7, 3 / 7], **TOL)
    # Symmetric clipping (epsilon_high None -> 0.2): 1.25 is now above 1.2 as well.
    symmetric = policy_loss(logp_BN, old_BN, adv_B, mask_BN, epsilon=0.2, max_completion_length=4)
    np.testing.assert_allclose([symmetric.clip_low, symmetric.clip_high], [2 / 7, 2 / 7], **TOL)
    # epsilon 0.1: 0.5 and 0.7 are below 0.9; the 0.1 on padding never counts.
    tighter = policy_loss(logp_BN, old_BN, adv_B, mask_BN, epsilon=0.1, max_completion_length=4)
    np.testing.assert_allclose([tighter.clip_low, tighter.clip_region], [2 / 7, 4 / 7], **TOL)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_jit_and_grad_finite_on_empty_mask(loss_type, level):
    rng = np.random.default_rng(3)
    logp_BN = jnp.asarray(-rng.exponential(size=(4, 6)) * 30, jnp.float32)  # garbage, as on padding
    old_BN = jnp.asarray(-rng.exponential(size=(4, 6)) * 30, jnp.float32)
    ref_BN = jnp.asarray(-rng.exponential(size=(4, 6)) * 30, jnp.float32)
    adv_B = group_advantages(jnp.array([1.0, 1.0, 0.0, 0.0]), 2)  # all-equal groups: zeros

    @jax.jit
    def loss_and_grad(logp_BN, mask_BN):
        def loss_fn(x):
            kwargs = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=6)
            return policy_loss(x, old_BN, adv_B, mask_BN, ref_logp_BN=ref_BN, beta=0.1, **kwargs).loss

        return jax.value_and_grad(loss_fn)(logp_BN)

    loss, grad_BN = loss_and_grad(logp_BN, jnp.zeros((4, 6), jnp.int32))
    assert loss == 0.0
    assert np.all(np.asarray(grad_BN) == 0.0)
