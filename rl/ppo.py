"""PPO maths as pure JAX functions of arrays, with the conventions of :mod:`rl.losses` (``B`` completions,
``N`` padded completion length, 0/1 masks, float32 maths, padding never reaching an ``exp``).

Per-token rewards are the KL penalty to the reference, ``-kl_coef * kl_t``, plus the sequence's score at
its last real token; GAE runs backwards over the completion tokens with the values of the padding taken
as 0 (the episode ends at the last token); advantages are whitened over the batch's real tokens. Values
and log-probs of completion token ``t`` come from position ``P - 1 + t`` (the state before the token).

References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ouyang et al. 2022 (per-token KL
penalty in RLHF); option names and the value-clip / whitening conventions as in TRL's ``PPOTrainer``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from rl.losses import masked_mean

KLEstimator = Literal["k1", "k3"]


def kl_penalty(logp_BN: jax.Array, ref_logp_BN: jax.Array, mask_BN: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token KL estimate of the policy against the reference, 0 off the mask.

    ``k1``: ``logp - ref`` (unbiased, can be negative); ``k3``: ``exp(ref - logp) - (ref - logp) - 1``
    (unbiased, >= 0).

    Returns:
        ``[B, N]`` float32.
    """
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    delta_BN = jnp.where(mask_BN > 0, jnp.asarray(ref_logp_BN, jnp.float32) - jnp.asarray(logp_BN, jnp.float32), 0.0)
    if estimator == "k1":
        return -delta_BN
    if estimator == "k3":
        return jnp.expm1(delta_BN) - delta_BN
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(scores_B: jax.Array, kl_BN: jax.Array, mask_BN: jax.Array, kl_coef: float) -> jax.Array:
    """``-kl_coef * kl`` on every real token, plus each row's score at its last real token.

    Args:
        scores_B: sequence rewards ``[B]`` (the math reward, shaped).
        kl_BN: per-token KL estimates ``[B, N]`` (see :func:`kl_penalty`).
        mask_BN: 0/1 completion mask ``[B, N]``; a row without tokens gets no score.
        kl_coef: penalty weight.

    Returns:
        ``[B, N]`` float32, 0 off the mask.
    """
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    n = mask_BN.shape[1]
    last_B = jnp.max(jnp.where(mask_BN > 0, jnp.arange(n), -1), axis=1)
    at_last_BN = (jnp.arange(n) == last_B[:, None]).astype(jnp.float32)
    rewards_BN = -kl_coef * jnp.where(mask_BN > 0, kl_BN, 0.0)
    return rewards_BN + at_last_BN * jnp.asarray(scores_B, jnp.float32)[:, None]


def masked_whiten(x_BN: jax.Array, mask_BN: jax.Array, shift_mean: bool = True) -> jax.Array:
    """``(x - mean) / sqrt(var + 1e-8)`` over the real tokens of the whole batch (unbiased variance, as TRL);
    with ``shift_mean=False`` the mean is added back (rewards keep their sign). 0 off the mask."""
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    x_BN = jnp.where(mask_BN > 0, jnp.asarray(x_BN, jnp.float32), 0.0)
    count = jnp.sum(mask_BN)
    mean = jnp.sum(x_BN) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.where(mask_BN > 0, (x_BN - mean) ** 2, 0.0)) / jnp.maximum(count - 1.0, 1.0)
    out_BN = (x_BN - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out_BN = out_BN + mean
    return jnp.where(mask_BN > 0, out_BN, 0.0)


def gae(
    rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the completion tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with rewards
    and values 0 off the mask (so ``V`` after the last token is 0: the episode ends there).

    Returns:
        ``(advantages_BN, returns_BN)``, ``returns = advantages + values``; both 0 off the mask.
    """
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    rewards_BN = jnp.where(mask_BN > 0, jnp.asarray(rewards_BN, jnp.float32), 0.0)
    values_BN = jnp.where(mask_BN > 0, jnp.asarray(values_BN, jnp.float32), 0.0)
    next_values_BN = jnp.pad(values_BN[:, 1:], ((0, 0), (0, 1)))
    deltas_BN = rewards_BN + gamma * next_values_BN - values_BN

    def back(carry_B, delta_B):
        advantage_B = delta_B + gamma * lam * carry_B
        return advantage_B, advantage_B

    _, advantages_NB = jax.lax.scan(back, jnp.zeros(deltas_BN.shape[0]), deltas_BN.T, reverse=True)
    advantages_BN = jnp.where(mask_BN > 0, advantages_NB.T, 0.0)
    return advantages_BN, jnp.where(mask_BN > 0, advantages_BN + values_BN, 0.0)


class PPOLoss(NamedTuple):
    """What :func:`ppo_loss` returns; every field is a float32 scalar."""

    loss: jax.Array
    """``pg_loss + vf_coef * vf_loss``."""
    pg_loss: jax.Array
    """Clipped policy surrogate, masked mean over tokens."""
    vf_loss: jax.Array
    """``0.5 *`` the masked mean of the larger of the clipped and unclipped squared value errors."""
    pg_clipfrac: jax.Array
    """Share of tokens whose policy gradient the clip removed."""
    vf_clipfrac: jax.Array
    """Share of tokens whose value prediction the clip moved and whose clipped error was the larger."""
    approx_kl: jax.Array
    """``0.5 * mean((logp - old_logp)^2)``: how far the update moved from the sampling policy."""


def ppo_loss(
    logp_BN: jax.Array,
    old_logp_BN: jax.Array,
    advantages_BN: jax.Array,
    values_BN: jax.Array,
    old_values_BN: jax.Array,
    returns_BN: jax.Array,
    mask_BN: jax.Array,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
) -> PPOLoss:
    """The PPO objective on a mini-batch: clipped policy surrogate plus the clipped value loss.

    Per token, ``pg = max(-A * r, -A * clip(r, 1 - c, 1 + c))`` with ``r = exp(logp - old_logp)``, and
    ``vf = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -cv, cv) - R)^2)``; each is a masked mean over
    the mini-batch's real tokens. Differentiate with respect to ``logp_BN`` and ``values_BN``.

    Args:
        logp_BN, old_logp_BN: current and sampling-policy log-probs of the completion tokens ``[B, N]``.
        advantages_BN, returns_BN: from :func:`gae` (advantages whitened) ``[B, N]``.
        values_BN, old_values_BN: current and rollout-time value predictions ``[B, N]``.
        mask_BN: 0/1 completion mask ``[B, N]``.
        cliprange, cliprange_value, vf_coef: as in :class:`rl.config.PPOConfig`.

    Returns:
        A :class:`PPOLoss` of scalars.
    """
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    log_ratio_BN = jnp.where(mask_BN > 0, f32(logp_BN) - f32(old_logp_BN), 0.0)
    ratio_BN = jnp.exp(log_ratio_BN)
    adv_BN = f32(advantages_BN)
    pg1_BN = -adv_BN * ratio_BN
    pg2_BN = -adv_BN * jnp.clip(ratio_BN, 1.0 - cliprange, 1.0 + cliprange)
    values_BN, old_values_BN, returns_BN = (
        jnp.where(mask_BN > 0, f32(x), 0.0) for x in (values_BN, old_values_BN, returns_BN)
    )
    clipped_values_BN = old_values_BN + jnp.clip(values_BN - old_values_BN, -cliprange_value, cliprange_value)
    outside_BN = jnp.abs(values_BN - old_values_BN) > cliprange_value
    vf1_BN = (values_BN - returns_BN) ** 2
    vf2_BN = (clipped_values_BN - returns_BN) ** 2
    pg_loss = masked_mean(jnp.maximum(pg1_BN, pg2_BN), mask_BN)
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf1_BN, vf2_BN), mask_BN)
    return PPOLoss(
        loss=pg_loss + vf_coef * vf_loss,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        pg_clipfrac=masked_mean((pg2_BN > pg1_BN).astype(jnp.float32), mask_BN),
        # Only where the clip moved the prediction: inside the range the two errors differ by rounding alone.
        vf_clipfrac=masked_mean(((vf2_BN > vf1_BN) & outside_BN).astype(jnp.float32), mask_BN),
        approx_kl=0.5 * masked_mean(log_ratio_BN**2, mask_BN),
    )
