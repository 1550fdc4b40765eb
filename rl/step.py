"""The GRPO / DAPO update as a module-level pure function ``(state, batch) -> (state, metrics)``.

The batch holds B = prompts x G completions (rows of a prompt contiguous) and their rewards; advantages,
the token count of the DAPO denominator and the micro-batch split are all computed inside, on the global
batch, so the same step runs on one device or on a mesh (see :mod:`rl.sharding`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl import losses
from rl.config import GRPOConfig
from rl.rollout import completion_logprobs
from saerl_jax.precision import cast_floating, resolve_compute_dtype

Batch = dict[str, jax.Array]
"""``prompt_ids_BP``, ``prompt_mask_BP``, ``completion_ids_BN``, ``loss_mask_BN`` (completion mask, with
truncated rows zeroed when they are masked out), ``rewards_B``, and ``old_logp_BN`` (when
``num_iterations > 1``) / ``ref_logp_BN`` (when ``beta > 0``)."""


class TrainState(NamedTuple):
    """Everything the update changes, and what a checkpoint must hold besides."""

    params: nnx.State
    """The trained parameters: the policy's, or for PPO ``{"policy", "value_head", "critic"}``."""
    opt_state: optax.OptState
    step: jax.Array
    """Optimizer updates so far."""
    frozen: Any = None
    """Parameters the update passes through unchanged (online DPO's pair-sampling snapshot), or None."""


def learning_rate(cfg: GRPOConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` to ``learning_rate``, then constant."""
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.linear_schedule(cfg.learning_rate / (cfg.warmup_steps + 1), cfg.learning_rate, cfg.warmup_steps)


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless ``max_grad_norm == 0``) then AdamW with :func:`learning_rate`."""
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.adam_beta1, b2=cfg.adam_beta2, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def init_state(params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: the given params and a fresh optimizer state."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def _micro_loss(params, graphdef, cfg: GRPOConfig, micro: Batch, advantages_B, num_items):
    # The model computes in its params' dtype: the cast to compute_dtype is differentiated through, so the
    # gradients reach the master params in their own dtype (float32), and the lm-head matmul, log-probs,
    # loss and advantages are float32 either way.
    model = nnx.merge(graphdef, cast_floating(params, resolve_compute_dtype(cfg.compute_dtype)))
    logp_BN, entropy_BN = completion_logprobs(
        model,
        micro["prompt_ids_BP"],
        micro["prompt_mask_BP"],
        micro["completion_ids_BN"],
        micro["loss_mask_BN"],
        temperature=cfg.temperature,
        chunk=cfg.logprob_chunk,
        remat=cfg.remat,
        attention_chunk=cfg.attention_chunk,
    )
    old_logp_BN = jax.lax.stop_gradient(logp_BN) if cfg.num_iterations == 1 else micro["old_logp_BN"]
    out = losses.policy_loss(
        logp_BN,
        old_logp_BN,
        advantages_B,
        micro["loss_mask_BN"],
        ref_logp_BN=micro["ref_logp_BN"] if cfg.beta > 0 else None,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        max_completion_length=cfg.max_completion_length,
        num_items=num_items,
    )
    entropy = losses.masked_mean(jax.lax.stop_gradient(entropy_BN), micro["loss_mask_BN"])
    return out.loss, {**out._asdict(), "entropy": entropy}


def train_step(
    graphdef: nnx.GraphDef,
    cfg: GRPOConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a rollout batch, accumulated over ``gradient_accumulation_steps``.

    The forward and backward passes run in ``cfg.compute_dtype`` (None: see
    :func:`~saerl_jax.precision.resolve_compute_dtype`); gradients, optimizer state and the update are in
    the dtype of ``state.params`` (the float32 master weights).

    The metric ``nonfinite`` is 1 when the loss or the new parameters / optimizer state hold a non-finite
    value; with ``skip_nonfinite_steps`` such an update is dropped (``skipped_nonfinite``), the state kept.

    Row r goes to micro-batch ``r % A``, so a row-sharded batch splits without moving data. Each micro
    loss is weighted so that the micro losses add up to the loss of the whole batch: by 1 for ``dapo``
    (whose denominator is already the global token count), by ``1 / A`` otherwise.
    """
    a = cfg.gradient_accumulation_steps
    advantages_B = losses.group_advantages(batch["rewards_B"], cfg.num_generations, cfg.scale_rewards)
    num_items = jnp.maximum(jnp.sum(batch["loss_mask_BN"]), 1.0)
    rows = {**{k: v for k, v in batch.items() if k != "rewards_B"}, "advantages_B": advantages_B}
    micro = jax.tree.map(lambda x: x.reshape(-1, a, *x.shape[1:]).swapaxes(0, 1), rows)
    weight = 1.0 if cfg.loss_type == "dapo" else 1.0 / a
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def accumulate(grads, mb):
        (loss, aux), g = grad_fn(state.params, graphdef, cfg, mb, mb["advantages_B"], num_items)
        grads = jax.tree.map(lambda acc, new: acc + weight * new, grads, g)
        return grads, {**aux, "loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, per_micro = jax.lax.scan(accumulate, zeros, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: jnp.mean(values) for name, values in per_micro.items()}
    metrics["loss"] = weight * jnp.sum(per_micro["loss"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = learning_rate(cfg)(state.step)
    return finish_update(cfg, state, params, opt_state, 1, metrics)


def finish_update(
    cfg: GRPOConfig, state: TrainState, params, opt_state, updates: int, metrics: dict[str, jax.Array]
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The new state after ``updates`` optimizer updates, and the ``nonfinite`` metric (1 when the loss or the
    new parameters / optimizer state hold a non-finite value); with ``skip_nonfinite_steps`` such a step is
    dropped (the state stays as it was) and counted in ``skipped_nonfinite``. Every algorithm's step ends here."""
    finite = jnp.isfinite(metrics["loss"]) & all_finite((params, opt_state))
    metrics["nonfinite"] = 1.0 - finite
    new = state._replace(params=params, opt_state=opt_state, step=state.step + updates)
    if cfg.skip_nonfinite_steps:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics["skipped_nonfinite"] = 1.0 - finite
    return new, metrics


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite (a scalar bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def jit_train_step(
    graphdef: nnx.GraphDef,
    cfg: GRPOConfig,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    step: Callable = train_step,
):
    """``step`` (:func:`train_step`, or PPO's / DPO's) jitted once for this model, config and optimizer;
    with shardings when given (then the state is laid out by ``state_shardings`` on the way in and out,
    and donated)."""
    fn = functools.partial(step, graphdef, cfg, optimizer)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
