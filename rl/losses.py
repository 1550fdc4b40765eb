"""GRPO / DAPO objective maths as pure JAX functions of arrays.

Conventions:

- ``B`` is the number of completions in a batch and ``N`` the (padded) completion length. Groups are
  contiguous: rows ``[g * G, (g + 1) * G)`` are the ``G = num_generations`` completions of prompt ``g``;
  ``K = B / G`` is the number of groups.
- Masks are 0/1 arrays of any dtype, ``[B, N]``, marking real completion tokens; they are cast to float32
  inside. Log-probabilities are per-token log-probabilities of the sampled tokens, ``[B, N]``; all maths is
  done in float32.
- Padded positions never reach an ``exp``: log-ratios and KL differences are zeroed there first, so
  garbage log-probabilities on padding cannot overflow into the loss or its gradient.
- Option names and defaults follow TRL's ``GRPOConfig`` (``loss_type``, ``scale_rewards``, ``epsilon``,
  ``epsilon_high``, ``beta``, ``importance_sampling_level``, ``max_completion_length``). String options are
  Python values, static under ``jax.jit``.

References:

- GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models" (group-normalised advantages, per-sequence mean of the clipped objective, k3 KL penalty).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (no division
  by the reward std, normalisation by a constant ``B * max_completion_length``).
- DAPO: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (asymmetric
  clip-higher, token-level aggregation, dynamic sampling, soft overlong punishment).
- GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization" (sequence-level importance ratio).
- k3 KL estimator: J. Schulman 2020, "Approximating KL Divergence".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_groups(num_rewards: int, num_generations: int) -> None:
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if num_rewards % num_generations:
        raise ValueError(f"batch of {num_rewards} rewards is not a multiple of num_generations={num_generations}")


def _sample_std(x: jax.Array, axis: int | None) -> jax.Array:
    """Standard deviation with ddof=1 along ``axis``; 0 when there is a single element."""
    n = x.size if axis is None else x.shape[axis]
    centred = x - jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(centred**2, axis=axis) / max(n - 1, 1))


def group_reward_std(rewards_B: jax.Array, num_generations: int) -> jax.Array:
    """Per-group sample standard deviation of the rewards (ddof=1, like ``torch.std``).

    Args:
        rewards_B: rewards ``[B]``, groups contiguous.
        num_generations: group size ``G``; ``B`` must be a multiple of it.

    Returns:
        ``[K] = [B / G]`` float32 standard deviations; exactly 0 for a group whose rewards are all equal, and 0
        for every group when ``G == 1``.
    """
    _check_groups(rewards_B.shape[0], num_generations)
    rewards_KxG = jnp.asarray(rewards_B, jnp.float32).reshape(-1, num_generations)
    all_equal_K = jnp.max(rewards_KxG, axis=1) == jnp.min(rewards_KxG, axis=1)
    return jnp.where(all_equal_K, 0.0, _sample_std(rewards_KxG, axis=1))


def group_advantages(
    rewards_B: jax.Array, num_generations: int, scale_rewards: ScaleRewards = "group", eps: float = 1e-4
) -> jax.Array:
    """Group-relative advantages ``(r - group mean) / (std + eps)``.

    The standard deviation is the sample one (ddof=1, like ``torch.std``): of the completion's own group for
    ``scale_rewards='group'`` (GRPO), of all of ``rewards_B`` for ``'batch'``; ``'none'`` (Dr. GRPO) only
    subtracts the group mean. A single reward has std 0. A group whose rewards are all equal gets
    advantages of exactly 0 under every scaling, as does every completion when ``G == 1``.

    Args:
        rewards_B: rewards ``[B]`` of the whole generation batch, groups contiguous.
        num_generations: group size ``G``; ``B`` must be a multiple of it.
        scale_rewards: 'group', 'batch' or 'none'.
        eps: added to the std before dividing.

    Returns:
        Advantages ``[B]``, float32.

    Raises:
        ValueError: ``B`` is not a multiple of ``num_generations``, or an unknown ``scale_rewards``.
    """
    _check_groups(rewards_B.shape[0], num_generations)
    rewards_B = jnp.asarray(rewards_B, jnp.float32)
    rewards_KxG = rewards_B.reshape(-1, num_generations)
    all_equal_K1 = (jnp.max(rewards_KxG, axis=1) == jnp.min(rewards_KxG, axis=1))[:, None]
    centred_KxG = jnp.where(all_equal_K1, 0.0, rewards_KxG - jnp.mean(rewards_KxG, axis=1, keepdims=True))
    if scale_rewards == "none":
        return centred_KxG.reshape(-1)
    if scale_rewards == "group":
        std_K1 = _sample_std(rewards_KxG, axis=1)[:, None]
    elif scale_rewards == "batch":
        std_K1 = _sample_std(rewards_B, axis=None)
    else:
        raise ValueError(f"scale_rewards must be one of ('group', 'batch', 'none'), got {scale_rewards!r}")
    return (centred_KxG / (std_K1 + eps)).reshape(-1)


def groups_with_signal(rewards_B: np.ndarray | jax.Array, num_generations: int) -> np.ndarray:
    """DAPO dynamic sampling: which groups have rewards that are not all equal (exact comparison, on host).

    Args:
        rewards_B: rewards ``[B]`` (NaN-free), groups contiguous.
        num_generations: group size ``G``; ``B`` must be a multiple of it.

    Returns:
        Boolean numpy array ``[B / G]``, True where the group carries a learning signal.
    """
    rewards = np.asarray(rewards_B)
    _check_groups(rewards.shape[0], num_generations)
    rewards_KxG = rewards.reshape(-1, num_generations)
    return rewards_KxG.max(axis=1) != rewards_KxG.min(axis=1)


def overlong_penalty(
    lengths_B: jax.Array, max_completion_length: int, overlong_buffer_len: int, overlong_penalty_factor: float
) -> jax.Array:
    """DAPO soft overlong punishment, a reward term in ``[-factor, 0]`` from completion lengths in tokens.

    With ``expected = max_completion_length - overlong_buffer_len`` the penalty is 0 up to ``expected``
    tokens, falls linearly inside the buffer to ``-overlong_penalty_factor`` at ``max_completion_length``,
    and stays there beyond it: ``clip(-(L - expected) / buffer * factor, -factor, 0)``. A buffer of 0 turns
    the penalty off.

    Args:
        lengths_B: completion lengths ``[B]`` in tokens.
        max_completion_length: the generation limit.
        overlong_buffer_len: length of the linear buffer before the limit, ``0 <= buffer <= max``.
        overlong_penalty_factor: size of the penalty at (and beyond) the limit, >= 0.

    Returns:
        Penalties ``[B]``, float32, to add to the rewards.
    """
    if not 0 <= overlong_buffer_len <= max_completion_length:
        raise ValueError(
            f"overlong_buffer_len must be in [0, max_completion_length={max_completion_length}], "
            f"got {overlong_buffer_len}"
        )
    if overlong_penalty_factor < 0:
        raise ValueError(f"overlong_penalty_factor must be >= 0, got {overlong_penalty_factor}")
    lengths_B = jnp.asarray(lengths_B, jnp.float32)
    if overlong_buffer_len == 0:
        return jnp.zeros_like(lengths_B)
    expected = max_completion_length - overlong_buffer_len
    penalty_B = -(lengths_B - expected) / overlong_buffer_len * overlong_penalty_factor
    return jnp.clip(penalty_B, -overlong_penalty_factor, 0.0)


def k3_kl(logp_BN: jax.Array, ref_logp_BN: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1`` with ``d = ref - logp``.

    Unbiased for samples drawn from the policy, and >= 0 everywhere (0 where the two agree).

    Args:
        logp_BN: policy log-probabilities of the sampled tokens ``[B, N]``.
        ref_logp_BN: reference-model log-probabilities of the same tokens ``[B, N]``.

    Returns:
        Per-token estimates ``[B, N]``, float32.
    """
    delta_BN = jnp.asarray(ref_logp_BN, jnp.float32) - jnp.asarray(logp_BN, jnp.float32)
    return jnp.exp(delta_BN) - delta_BN - 1.0


def masked_mean(x_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
    """Scalar ``sum(x * mask) / max(sum(mask), 1)``; ``x`` may be ``[B, 1]`` and is broadcast to the mask.

    Masked positions are excluded with ``where``, so a NaN or inf there does not reach the result.
    """
    mask_BN = jnp.broadcast_to(jnp.asarray(mask_BN, jnp.float32), jnp.broadcast_shapes(x_BN.shape, mask_BN.shape))
    return jnp.sum(jnp.where(mask_BN > 0, x_BN, 0.0)) / jnp.maximum(jnp.sum(mask_BN), 1.0)


def log_importance_weights(
    logp_BN: jax.Array, old_logp_BN: jax.Array, mask_BN: jax.Array, level: ImportanceLevel
) -> jax.Array:
    """Log importance ratios of the current policy against the sampling policy.

    Args:
        logp_BN: current policy log-probabilities ``[B, N]``.
        old_logp_BN: log-probabilities under the policy that sampled the completions ``[B, N]``.
        mask_BN: 0/1 completion mask ``[B, N]``.
        level: 'token' gives ``logp - old_logp`` per token, ``[B, N]``, 0 at padded positions.
            'sequence' (GSPO) gives the masked mean over tokens of ``logp - old_logp``, ``[B, 1]``, with
            the length clamped to >= 1 (an empty row gives 0).

    Returns:
        ``[B, N]`` for 'token', ``[B, 1]`` for 'sequence'; float32.
    """
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    diff_BN = jnp.where(mask_BN > 0, jnp.asarray(logp_BN, jnp.float32) - jnp.asarray(old_logp_BN, jnp.float32), 0.0)
    if level == "token":
        return diff_BN
    if level == "sequence":
        return jnp.sum(diff_BN, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask_BN, axis=1, keepdims=True), 1.0)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


def clipped_surrogate(
    log_ratio: jax.Array, advantages_B: jax.Array, epsilon_low: float, epsilon_high: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO clipped surrogate, as a loss: ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``.

    Args:
        log_ratio: log importance ratios ``[B, N]`` (token level) or ``[B, 1]`` (sequence level).
        advantages_B: advantages ``[B]``, broadcast over tokens as ``[B, 1]``.
        epsilon_low: lower clip range; ratios below ``1 - epsilon_low`` stop pushing a negative advantage.
        epsilon_high: upper clip range (DAPO's clip-higher when larger than ``epsilon_low``).

    Returns:
        ``(per_token_loss, low_clipped, high_clipped)``, all with the shape of ``log_ratio`` (``[B, N]`` or
        ``[B, 1]``). ``low_clipped`` is True where ``r < 1 - epsilon_low`` and ``A < 0``, ``high_clipped``
        where ``r > 1 + epsilon_high`` and ``A > 0``: the tokens whose gradient the clip removes.
    """
    ratio = jnp.exp(jnp.asarray(log_ratio, jnp.float32))
    adv_B1 = jnp.asarray(advantages_B, jnp.float32)[:, None]
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token_loss = -jnp.minimum(ratio * adv_B1, clipped_ratio * adv_B1)
    low_clipped = (ratio < 1.0 - epsilon_low) & (adv_B1 < 0)
    high_clipped = (ratio > 1.0 + epsilon_high) & (adv_B1 > 0)
    return per_token_loss, low_clipped, high_clipped


def _grpo(
    masked_BN: jax.Array, mask_BN: jax.Array, max_completion_length: int, num_items: float | jax.Array | None
) -> jax.Array:
    return jnp.mean(jnp.sum(masked_BN, axis=1) / jnp.maximum(jnp.sum(mask_BN, axis=1), 1.0))


def _bnpo(
    masked_BN: jax.Array, mask_BN: jax.Array, max_completion_length: int, num_items: float | jax.Array | None
) -> jax.Array:
    return jnp.sum(masked_BN) / jnp.maximum(jnp.sum(mask_BN), 1.0)


def _dr_grpo(
    masked_BN: jax.Array, mask_BN: jax.Array, max_completion_length: int, num_items: float | jax.Array | None
) -> jax.Array:
    return jnp.sum(masked_BN) / (mask_BN.shape[0] * max_completion_length)


def _dapo(
    masked_BN: jax.Array, mask_BN: jax.Array, max_completion_length: int, num_items: float | jax.Array | None
) -> jax.Array:
    if num_items is None:
        num_items = jnp.sum(mask_BN)
    return jnp.sum(masked_BN) / jnp.maximum(jnp.asarray(num_items, jnp.float32), 1.0)


_AGGREGATORS: dict[str, Callable[..., jax.Array]] = {"grpo": _grpo, "bnpo": _bnpo, "dr_grpo": _dr_grpo, "dapo": _dapo}


def aggregate(
    per_token_loss_BN: jax.Array,
    mask_BN: jax.Array,
    loss_type: LossType,
    max_completion_length: int,
    num_items: float | jax.Array | None = None,
) -> jax.Array:
    """Reduces a per-token loss to a scalar, the way ``loss_type`` weights tokens.

    - 'grpo': masked mean over each sequence's tokens (length clamped to >= 1), then mean over sequences.
    - 'bnpo': masked mean over all tokens of this batch.
    - 'dr_grpo': masked sum divided by the constant ``B * max_completion_length``.
    - 'dapo': masked sum divided by ``num_items``, the number of active tokens in the whole global batch
      (default: this batch's, clamped to >= 1).

    Rows with an all-zero mask contribute 0 (never NaN), and masked positions are excluded with ``where``.

    Gradient accumulation: to make the micro-batch losses add up to the full-batch loss, a trainer weights
    each micro-batch of ``B_micro`` rows out of ``B`` as follows. 'dapo': pass ``num_items`` = the global
    active-token count to every micro-batch and sum the results (weight 1). 'grpo' and 'dr_grpo': weight
    each result by ``B_micro / B`` and sum. 'bnpo' normalises by the micro-batch's own token count, so no
    fixed weights recover the full-batch value; averaging the micro-batch results (weight ``B_micro / B``)
    is the usual, local approximation.

    Args:
        per_token_loss_BN: per-token loss ``[B, N]``, or ``[B, 1]`` broadcast over the mask (sequence level).
        mask_BN: 0/1 completion mask ``[B, N]``.
        loss_type: one of :data:`LOSS_TYPES`.
        max_completion_length: the generation limit (used by 'dr_grpo').
        num_items: global active-token count for 'dapo'; ignored by the other types.

    Returns:
        Scalar float32 loss.
    """
    if loss_type not in _AGGREGATORS:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    masked_BN = jnp.where(mask_BN > 0, per_token_loss_BN, 0.0)  # broadcasts a [B, 1] loss over the tokens
    return _AGGREGATORS[loss_type](masked_BN, mask_BN, max_completion_length, num_items)


class LossOutput(NamedTuple):
    """What :func:`policy_loss` returns; every field is a float32 scalar."""

    loss: jax.Array
    """The aggregated objective to minimise."""
    kl: jax.Array
    """Masked mean of the k3 KL against the reference (0 when no reference is given)."""
    clip_low: jax.Array
    """Fraction of active tokens low-clipped (ratio below ``1 - epsilon`` with a negative advantage)."""
    clip_high: jax.Array
    """Fraction of active tokens high-clipped (ratio above ``1 + epsilon_high`` with a positive advantage)."""
    clip_region: jax.Array
    """Fraction of active tokens clipped either way."""


def policy_loss(
    logp_BN: jax.Array,
    old_logp_BN: jax.Array,
    advantages_B: jax.Array,
    mask_BN: jax.Array,
    *,
    ref_logp_BN: jax.Array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    importance_sampling_level: ImportanceLevel = "token",
    max_completion_length: int,
    num_items: float | jax.Array | None = None,
) -> LossOutput:
    """The GRPO-family objective: clipped surrogate plus an optional k3 KL penalty, aggregated per ``loss_type``.

    Per token, ``clipped_surrogate(...) + beta * k3_kl(logp, ref)``, then :func:`aggregate`. Differentiate
    with respect to ``logp_BN``; the result and its gradient are finite for all-zero masks and zero
    advantages.

    Args:
        logp_BN: current policy log-probabilities of the sampled tokens ``[B, N]``.
        old_logp_BN: log-probabilities under the sampling policy ``[B, N]`` (equal to ``logp_BN`` on the
            first step after generation, giving ratio 1).
        advantages_B: advantages ``[B]``.
        mask_BN: 0/1 completion mask ``[B, N]``.
        ref_logp_BN: reference-model log-probabilities ``[B, N]``; required when ``beta != 0``. When given,
            the KL metric is reported even with ``beta == 0``.
        beta: KL coefficient, a Python float (it decides at trace time whether the KL term exists).
        epsilon: lower clip range (and upper one when ``epsilon_high`` is None).
        epsilon_high: upper clip range (DAPO clip-higher); None means ``epsilon``.
        loss_type: aggregation, one of :data:`LOSS_TYPES`.
        importance_sampling_level: 'token' (GRPO / DAPO) or 'sequence' (GSPO).
        max_completion_length: the generation limit (used by 'dr_grpo').
        num_items: global active-token count for 'dapo' under gradient accumulation.

    Returns:
        A :class:`LossOutput` of scalars.

    Raises:
        ValueError: ``beta != 0`` without ``ref_logp_BN``, or an unknown option.
    """
    if beta != 0.0 and ref_logp_BN is None:
        raise ValueError("beta != 0 needs ref_logp_BN (reference-model log-probabilities)")
    mask_BN = jnp.asarray(mask_BN, jnp.float32)
    log_ratio = log_importance_weights(logp_BN, old_logp_BN, mask_BN, importance_sampling_level)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_token_BN, low_clipped, high_clipped = clipped_surrogate(log_ratio, advantages_B, epsilon, eps_high)
    kl = jnp.zeros((), jnp.float32)
    if ref_logp_BN is not None:
        # At padding the reference is replaced by the policy itself, so the difference there is exactly 0.
        kl_BN = k3_kl(logp_BN, jnp.where(mask_BN > 0, ref_logp_BN, logp_BN))
        kl = masked_mean(kl_BN, mask_BN)
        if beta != 0.0:
            per_token_BN = per_token_BN + beta * kl_BN
    return LossOutput(
        loss=aggregate(per_token_BN, mask_BN, loss_type, max_completion_length, num_items),
        kl=kl,
        clip_low=masked_mean(low_clipped.astype(jnp.float32), mask_BN),
        clip_high=masked_mean(high_clipped.astype(jnp.float32), mask_BN),
        clip_region=masked_mean((low_clipped | high_clipped).astype(jnp.float32), mask_BN),
    )
