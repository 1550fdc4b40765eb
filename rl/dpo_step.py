"""The DPO update as a module-level pure function ``(state, batch) -> (state, metrics)``.

The batch holds K pairs (rows of a host's pairs contiguous, padding pairs weighing 0): ``prompt_ids_KP``,
``prompt_mask_KP``, ``chosen_ids_KN`` / ``chosen_mask_KN``, ``rejected_ids_KN`` / ``rejected_mask_KN``,
``ref_chosen_K`` / ``ref_rejected_K`` (the reference's summed log-probs, computed once per pair before the
update) and ``pair_mask_K``. Chosen and rejected completions go through the model in one forward of 2K
rows. The mean over pairs uses the batch's real pair count, so micro-batches add up to the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl import dpo
from rl.config import DPOConfig
from rl.losses import masked_mean
from rl.rollout import completion_logprobs, logprobs_fn
from rl.step import Batch, TrainState, finish_update, learning_rate
from saerl_jax.precision import cast_floating, resolve_compute_dtype


def pair_rows(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The 2K model rows of K pairs, chosen first: prompt ids and mask, completion ids and mask."""
    twice = lambda x: jnp.concatenate([x, x])  # noqa: E731
    return (
        twice(batch["prompt_ids_KP"]),
        twice(batch["prompt_mask_KP"]),
        jnp.concatenate([batch["chosen_ids_KN"], batch["rejected_ids_KN"]]),
        jnp.concatenate([batch["chosen_mask_KN"], batch["rejected_mask_KN"]]),
    )


def reference_logps(graphdef: nnx.GraphDef, ref_params: nnx.State, batch: Batch, cfg: DPOConfig):
    """``(ref_chosen_K, ref_rejected_K)``: the reference's log-probs of each completion, summed over its tokens."""
    rows = pair_rows(batch)
    logp_BN = logprobs_fn(
        graphdef,
        ref_params,
        *rows,
        temperature=cfg.temperature,
        chunk=cfg.logprob_chunk,
        compute_dtype=cfg.compute_dtype,
        attention_chunk=cfg.attention_chunk,
    )
    sums_B = jnp.sum(jnp.where(rows[3] > 0, logp_BN, 0.0), axis=1)
    k = batch["pair_mask_K"].shape[0]
    return sums_B[:k], sums_B[k:]


def _micro_loss(params, graphdef: nnx.GraphDef, cfg: DPOConfig, micro: Batch, num_pairs):
    model = nnx.merge(graphdef, cast_floating(params, resolve_compute_dtype(cfg.compute_dtype)))
    rows = pair_rows(micro)
    logp_BN, entropy_BN = completion_logprobs(
        model,
        *rows,
        temperature=cfg.temperature,
        chunk=cfg.logprob_chunk,
        remat=cfg.remat,
        attention_chunk=cfg.attention_chunk,
    )
    mask_BN = rows[3]
    sums_B = jnp.sum(jnp.where(mask_BN > 0, logp_BN, 0.0), axis=1)
    tokens_B = jnp.sum(mask_BN, axis=1)
    k = micro["pair_mask_K"].shape[0]
    out = dpo.dpo_loss(
        sums_B[:k],
        sums_B[k:],
        micro["ref_chosen_K"],
        micro["ref_rejected_K"],
        micro["pair_mask_K"],
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        chosen_tokens_K=tokens_B[:k],
        rejected_tokens_K=tokens_B[k:],
        num_pairs=num_pairs,
    )
    entropy = masked_mean(jax.lax.stop_gradient(entropy_BN), mask_BN)
    return out.loss, {**out._asdict(), "entropy": entropy}


def train_step(
    graphdef: nnx.GraphDef,
    cfg: DPOConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a batch of pairs, accumulated over ``gradient_accumulation_steps`` (pair r
    in micro-batch ``r % A``). A batch without a real pair leaves the parameters as they were (its loss
    and gradient are 0; AdamW's moments still decay). Metrics: the loss, implicit rewards and their
    accuracy over the real pairs, the entropy, gradient norm and learning rate."""
    a = cfg.gradient_accumulation_steps
    num_pairs = jnp.sum(batch["pair_mask_K"].astype(jnp.float32))
    micro = jax.tree.map(lambda x: x.reshape(-1, a, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def accumulate(grads, mb):
        (loss, aux), g = grad_fn(state.params, graphdef, cfg, mb, num_pairs)
        weight = jnp.sum(mb["pair_mask_K"].astype(jnp.float32)) / jnp.maximum(num_pairs, 1.0)
        return jax.tree.map(jnp.add, grads, g), {**aux, "loss": loss, "weight": weight}

    grads, per_micro = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, state.params), micro)
    weights = per_micro.pop("weight")
    metrics = {name: jnp.sum(weights * values) for name, values in per_micro.items() if name != "loss"}
    metrics["loss"] = jnp.sum(per_micro["loss"])
    metrics["pairs"] = num_pairs
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if_pairs = lambda new, old: jnp.where(num_pairs > 0, new, old)  # noqa: E731
    params, opt_state = jax.tree.map(if_pairs, (params, opt_state), (state.params, state.opt_state))
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = learning_rate(cfg)(state.step)
    return finish_update(cfg, state, params, opt_state, 1, metrics)
