"""DPO maths as pure JAX functions, and preference pairs from graded rollouts (host numpy).

A pair is (prompt, chosen completion, rejected completion); ``logp`` below is the sum of a completion's
token log-probs under the policy, ``ref`` the same under the frozen reference. With log-ratios
``c = logp_chosen - ref_chosen`` and ``r = logp_rejected - ref_rejected``:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * (c - r))``.
- ``ipo`` (IPO, Azar et al. 2023, Eq. 17): ``(c / n_c - r / n_r - 1 / (2 * beta))^2`` with the log-ratios
  averaged over each completion's tokens (``n``), as TRL does.

Option names follow TRL's ``DPOConfig`` (``beta``, ``loss_type``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DPOLossType = Literal["sigmoid", "ipo"]


class DPOLoss(NamedTuple):
    """What :func:`dpo_loss` returns; every field is a float32 scalar over the real pairs."""

    loss: jax.Array
    """Mean per-pair loss."""
    chosen_rewards: jax.Array
    """Mean implicit reward of the chosen completions, ``beta * c``."""
    rejected_rewards: jax.Array
    """Mean implicit reward of the rejected completions, ``beta * r``."""
    reward_accuracy: jax.Array
    """Share of pairs whose chosen completion has the larger implicit reward."""


def pair_losses(
    chosen_logp_K: jax.Array,
    rejected_logp_K: jax.Array,
    ref_chosen_K: jax.Array,
    ref_rejected_K: jax.Array,
    *,
    beta: float,
    loss_type: DPOLossType,
    chosen_tokens_K: jax.Array | None = None,
    rejected_tokens_K: jax.Array | None = None,
) -> jax.Array:
    """Per-pair losses ``[K]`` (float32) from summed log-probs ``[K]``; ``ipo`` needs the token counts."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    chosen_K = f32(chosen_logp_K) - f32(ref_chosen_K)
    rejected_K = f32(rejected_logp_K) - f32(ref_rejected_K)
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * (chosen_K - rejected_K))
    if loss_type == "ipo":
        if chosen_tokens_K is None or rejected_tokens_K is None:
            raise ValueError("loss_type='ipo' needs the token counts of the chosen and rejected completions")
        delta_K = chosen_K / jnp.maximum(f32(chosen_tokens_K), 1.0) - rejected_K / jnp.maximum(
            f32(rejected_tokens_K), 1.0
        )
        return (delta_K - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


def dpo_loss(
    chosen_logp_K: jax.Array,
    rejected_logp_K: jax.Array,
    ref_chosen_K: jax.Array,
    ref_rejected_K: jax.Array,
    pair_mask_K: jax.Array,
    *,
    beta: float,
    loss_type: DPOLossType,
    chosen_tokens_K: jax.Array | None = None,
    rejected_tokens_K: jax.Array | None = None,
    num_pairs: jax.Array | float | None = None,
) -> DPOLoss:
    """The DPO / IPO objective over the real pairs of a batch (``pair_mask_K`` 1; padding pairs weigh 0).

    Args:
        chosen_logp_K, rejected_logp_K: policy log-probs summed over each completion ``[K]``.
        ref_chosen_K, ref_rejected_K: the reference's ``[K]``.
        pair_mask_K: 1 for a real pair, 0 for padding ``[K]``.
        beta, loss_type: as in :class:`rl.config.DPOConfig`.
        chosen_tokens_K, rejected_tokens_K: completion lengths (``ipo``).
        num_pairs: the denominator of the mean (default: this batch's real pairs); pass the whole batch's
            count to every micro-batch to make micro-batch losses add up to the batch's.

    Returns:
        A :class:`DPOLoss`; the metrics are means over this batch's real pairs.
    """
    mask_K = jnp.asarray(pair_mask_K, jnp.float32)
    # Padding pairs' values never reach the maths (a NaN there would poison the gradient through a ``where``).
    chosen_logp_K, rejected_logp_K, ref_chosen_K, ref_rejected_K = (
        jnp.where(mask_K > 0, jnp.asarray(x, jnp.float32), 0.0)
        for x in (chosen_logp_K, rejected_logp_K, ref_chosen_K, ref_rejected_K)
    )
    per_pair_K = pair_losses(
        chosen_logp_K,
        rejected_logp_K,
        ref_chosen_K,
        ref_rejected_K,
        beta=beta,
        loss_type=loss_type,
        chosen_tokens_K=chosen_tokens_K,
        rejected_tokens_K=rejected_tokens_K,
    )
    real = jnp.maximum(jnp.sum(mask_K), 1.0)
    denominator = real if num_pairs is None else jnp.maximum(jnp.asarray(num_pairs, jnp.float32), 1.0)
    chosen_K = beta * (jnp.asarray(chosen_logp_K, jnp.float32) - jnp.asarray(ref_chosen_K, jnp.float32))
    rejected_K = beta * (jnp.asarray(rejected_logp_K, jnp.float32) - jnp.asarray(ref_rejected_K, jnp.float32))

    def mean(x_K):
        return jnp.sum(jnp.where(mask_K > 0, x_K, 0.0)) / real

    return DPOLoss(
        loss=jnp.sum(jnp.where(mask_K > 0, per_pair_K, 0.0)) / denominator,
        chosen_rewards=mean(chosen_K),
        rejected_rewards=mean(rejected_K),
        reward_accuracy=mean((chosen_K > rejected_K).astype(jnp.float32)),
    )


class Pairs(NamedTuple):
    """Preference pairs of a host batch: for prompt k, ``chosen_K[k]`` and ``rejected_K[k]`` are row
    indices into its rollout (rows ``k * G .. k * G + G - 1``); ``valid_K`` is False where the prompt had
    no correct or no incorrect completion (its indices are then 0 and it weighs nothing)."""

    chosen_K: np.ndarray
    rejected_K: np.ndarray
    valid_K: np.ndarray


def build_pairs(correct_B: np.ndarray, num_generations: int) -> Pairs:
    """The first correct and the first incorrect completion of each prompt, in generation order.

    Args:
        correct_B: math reward of each completion ``[K * G]`` (1 correct, 0 not), prompts contiguous.
        num_generations: G.

    Returns:
        :class:`Pairs` over the K prompts.
    """
    correct_KG = np.asarray(correct_B).reshape(-1, num_generations) > 0.5
    valid_K = correct_KG.any(axis=1) & ~correct_KG.all(axis=1)
    offsets_K = np.arange(correct_KG.shape[0]) * num_generations
    chosen_K = np.where(valid_K, offsets_K + np.argmax(correct_KG, axis=1), 0)
    rejected_K = np.where(valid_K, offsets_K + np.argmax(~correct_KG, axis=1), 0)
    return Pairs(chosen_K, rejected_K, valid_K)


def pair_batch(
    prompt_ids_BP: np.ndarray,
    prompt_mask_BP: np.ndarray,
    completion_ids_BN: np.ndarray,
    completion_mask_BN: np.ndarray,
    pairs: Pairs,
) -> dict[str, np.ndarray]:
    """Host arrays of the pairs of a rollout batch (K prompts x G rows), one per prompt: the update's batch
    (see :mod:`rl.dpo_step`) less the reference log-probs. A prompt without a pair keeps a padding pair
    (``pair_mask_K`` 0), so every host's batch has K rows."""
    g = len(prompt_ids_BP) // len(pairs.valid_K)
    valid_K1 = pairs.valid_K[:, None]
    return {
        "prompt_ids_KP": prompt_ids_BP[::g],
        "prompt_mask_KP": prompt_mask_BP[::g],
        "chosen_ids_KN": completion_ids_BN[pairs.chosen_K],
        "chosen_mask_KN": completion_mask_BN[pairs.chosen_K] * valid_K1,
        "rejected_ids_KN": completion_ids_BN[pairs.rejected_K],
        "rejected_mask_KN": completion_mask_BN[pairs.rejected_K] * valid_K1,
        "pair_mask_K": pairs.valid_K.astype(np.int32),
    }
