"""The PPO update as a module-level pure function ``(state, batch) -> (state, metrics)``, and its value model.

The state's params are ``{"policy": ..., "value_head": {"kernel", "bias"}}`` plus ``"critic"`` (a Qwen2
trunk initialised from the policy) with ``value_model='separate'``; one AdamW updates all of them, the
loss being ``pg_loss + vf_coef * vf_loss`` (as TRL's policy-and-value wrapper). The value of completion
token t is the head applied to the trunk's final-norm hidden state at position ``P - 1 + t``.

Inside one jitted step: per-token rewards (KL penalty + score), GAE, whitened advantages, then
``num_ppo_epochs`` passes over the batch in a fresh random order (keyed by seed and update count, so a
resumed run reshuffles the same way), each split into ``num_mini_batches`` updates of
``gradient_accumulation_steps`` micro-batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rl import ppo
from rl.config import PPOConfig
from rl.losses import masked_mean
from rl.rollout import completion_hidden, hidden_logprobs, map_micro_batches
from rl.step import Batch, TrainState, finish_update, learning_rate
from saerl_jax.model import Qwen2
from saerl_jax.precision import cast_floating, resolve_compute_dtype


def init_params(policy: nnx.State, hidden_size: int, value_model: str) -> dict:
    """PPO's trainable tree from the initial policy: the policy, a zero value head and, for a separate
    critic, a copy of the policy's trunk."""
    params = {
        "policy": policy,
        "value_head": {"kernel": jnp.zeros((hidden_size, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)},
    }
    if value_model == "separate":
        params["critic"] = jax.tree.map(jnp.copy, policy)
    return params


def head_values(x_BND: jax.Array, head: dict) -> jax.Array:
    """The value head on hidden states: ``[B, N]`` float32."""
    x_BND = x_BND.astype(jnp.float32)
    return (x_BND @ head["kernel"].astype(jnp.float32))[..., 0] + head["bias"].astype(jnp.float32)[0]


def _trunk(graphdef: nnx.GraphDef, params: dict, compute_dtype: str | None) -> tuple[Qwen2, Qwen2]:
    """(policy, critic) models in the compute dtype; the critic is the policy with a shared trunk."""
    cast = (lambda p: p) if compute_dtype is None else functools.partial(cast_floating, dtype=compute_dtype)
    policy = nnx.merge(graphdef, cast(params["policy"]))
    critic = nnx.merge(graphdef, cast(params["critic"])) if "critic" in params else policy
    return policy, critic


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype", "micro_batches", "attention_chunk"))
def values_fn(
    graphdef: nnx.GraphDef,
    params: dict,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    completion_ids_BN: jax.Array,
    completion_mask_BN: jax.Array,
    compute_dtype: str | None = None,
    micro_batches: int = 1,
    attention_chunk: int = 0,
) -> jax.Array:
    """The value model's predictions ``[B, N]`` (float32) for a rollout batch, ``micro_batches`` passes
    (row r in pass ``r % micro_batches``, as :func:`rl.rollout.logprobs_fn`)."""
    _, critic = _trunk(graphdef, params, compute_dtype)

    def one(rows):
        return head_values(completion_hidden(critic, *rows, attention_chunk=attention_chunk), params["value_head"])

    return map_micro_batches(one, (prompt_ids_BP, prompt_mask_BP, completion_ids_BN, completion_mask_BN), micro_batches)


def _micro_loss(params: dict, graphdef: nnx.GraphDef, cfg: PPOConfig, micro: Batch):
    policy, critic = _trunk(graphdef, params, resolve_compute_dtype(cfg.compute_dtype))
    rows = (micro["prompt_ids_BP"], micro["prompt_mask_BP"], micro["completion_ids_BN"], micro["loss_mask_BN"])
    x_BND = completion_hidden(policy, *rows, remat=cfg.remat, attention_chunk=cfg.attention_chunk)
    logp_BN, entropy_BN = hidden_logprobs(
        policy, x_BND, micro["completion_ids_BN"], temperature=cfg.temperature, chunk=cfg.logprob_chunk
    )
    if critic is not policy:
        x_BND = completion_hidden(critic, *rows, remat=cfg.remat, attention_chunk=cfg.attention_chunk)
    out = ppo.ppo_loss(
        logp_BN,
        micro["old_logp_BN"],
        micro["advantages_BN"],
        head_values(x_BND, params["value_head"]),
        micro["old_values_BN"],
        micro["returns_BN"],
        micro["loss_mask_BN"],
        cliprange=cfg.cliprange,
        cliprange_value=cfg.cliprange_value,
        vf_coef=cfg.vf_coef,
    )
    entropy = masked_mean(jax.lax.stop_gradient(entropy_BN), micro["loss_mask_BN"])
    return out.loss, {**out._asdict(), "entropy": entropy}


def advantages(cfg: PPOConfig, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(advantages_BN, returns_BN, kl_BN)`` of a rollout batch: the per-token KL to the reference of the
    sampling policy, the rewards it shapes, GAE on the rollout's values, advantages whitened."""
    mask_BN = batch["loss_mask_BN"]
    kl_BN = jnp.zeros(mask_BN.shape, jnp.float32)
    if cfg.keeps_reference:
        kl_BN = ppo.kl_penalty(batch["old_logp_BN"], batch["ref_logp_BN"], mask_BN, cfg.kl_estimator)
    rewards_BN = ppo.token_rewards(batch["rewards_B"], kl_BN, mask_BN, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards_BN = ppo.masked_whiten(rewards_BN, mask_BN, shift_mean=False)
    advantages_BN, returns_BN = ppo.gae(rewards_BN, batch["old_values_BN"], mask_BN, cfg.gamma, cfg.lam)
    return ppo.masked_whiten(advantages_BN, mask_BN), returns_BN, kl_BN


def train_step(
    graphdef: nnx.GraphDef,
    cfg: PPOConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """All ``num_ppo_epochs * num_mini_batches`` updates of one rollout batch.

    The batch holds ``prompt_ids_BP``, ``prompt_mask_BP``, ``completion_ids_BN``, ``loss_mask_BN``,
    ``rewards_B`` (the shaped score), ``old_logp_BN`` and ``old_values_BN`` (the rollout's policy and value
    model) and, with ``kl_coef > 0``, ``ref_logp_BN``. Metrics are means over the updates, plus the
    rollout's mean KL, value and return, and the last update's gradient norm and learning rate.
    """
    advantages_BN, returns_BN, kl_BN = advantages(cfg, batch)
    rows = {k: v for k, v in batch.items() if k not in ("rewards_B", "ref_logp_BN")}
    rows |= {"advantages_BN": advantages_BN, "returns_BN": returns_BN}
    b, m, a = batch["rewards_B"].shape[0], cfg.num_mini_batches, cfg.gradient_accumulation_steps
    key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    order_EB = jax.vmap(lambda k: jax.random.permutation(k, b))(jax.random.split(key, cfg.num_ppo_epochs))
    order_UAb = order_EB.reshape(cfg.num_ppo_epochs * m, a, b // (m * a))  # update, micro-batch, rows
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def update(carry, index_Ab):
        params, opt_state = carry

        def accumulate(grads, index_b):
            micro = jax.tree.map(lambda x: x[index_b], rows)
            (_, aux), g = grad_fn(params, graphdef, cfg, micro)
            return jax.tree.map(lambda acc, new: acc + new / a, grads, g), aux

        grads, per_micro = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), index_Ab)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {name: jnp.mean(v) for name, v in per_micro.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), per_update = jax.lax.scan(update, (state.params, state.opt_state), order_UAb)
    metrics = {name: jnp.mean(v) for name, v in per_update.items()}
    metrics["grad_norm"] = per_update["grad_norm"][-1]
    steps = cfg.updates_per_step
    metrics["learning_rate"] = learning_rate(cfg)(state.step + steps - 1)
    mask_BN = batch["loss_mask_BN"]
    metrics["kl"] = masked_mean(kl_BN, mask_BN)
    metrics["value_mean"] = masked_mean(batch["old_values_BN"], mask_BN)
    metrics["return_mean"] = masked_mean(returns_BN, mask_BN)
    return finish_update(cfg, state, params, opt_state, steps, metrics)
