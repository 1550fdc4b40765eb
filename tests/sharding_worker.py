"""Runs two jitted train steps of a small random Qwen2 on several meshes and saves what they produced.

Run by ``tests/test_sharding.py`` in a fresh process with 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``)::

    python tests/sharding_worker.py OUT.npz [MESH ...] [loss=LOSS ...]
    # MESH: 1x1x1, 8x1x1, 2x2x2, 1x4x2 (default all); LOSS: grpo, dapo, ppo, dpo (default all)

For each loss (grpo with a KL term, dapo with an older policy, ppo with a separate critic and a KL penalty,
dpo on pairs with a padding pair) and mesh, writes ``{loss}/{mesh}/loss``,
``.../grad_norm``... (one value per step), ``{loss}/{mesh}/param/{path}`` (final params) and how ``q_proj``
and the embedding are laid out after the steps; and ``{loss}/initial/{path}``.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from rl import dpo_step, ppo_step
from rl.config import DAPOConfig, DPOConfig, GRPOConfig, PPOConfig
from rl.rollout import logprobs_fn
from rl.sharding import batch_sharding, make_mesh, path_name, shard_batch, tree_shardings
from rl.step import init_state, jit_train_step, make_optimizer, train_step
from saerl_jax.model import Qwen2, Qwen2Config

MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}
STEPS = 2
PROMPTS, G, P, N = 4, 4, 8, 12
WATCHED = ("layers/0/self_attn/q_proj/kernel", "embed_tokens/embedding")
LOSSES = ("grpo", "dapo", "ppo", "dpo")
STEP_FNS = {"grpo": train_step, "dapo": train_step, "ppo": ppo_step.train_step, "dpo": dpo_step.train_step}


def make_config(loss_type: str) -> GRPOConfig:
    common = dict(
        batch_size=PROMPTS,
        num_generations=G,
        gradient_accumulation_steps=2,
        max_prompt_length=P,
        max_completion_length=N,
        learning_rate=1e-4,
        logprob_chunk=5,
    )
    if loss_type == "grpo":  # remat (a scan over the blocks) and chunked attention under every mesh too
        return GRPOConfig(beta=0.04, remat=True, attention_chunk=8, **common)
    if loss_type == "ppo":
        return PPOConfig(**{**common, "num_generations": G}, kl_coef=0.1, num_ppo_epochs=2, num_mini_batches=2)
    if loss_type == "dpo":
        return DPOConfig(**{**common, "num_generations": G, "gradient_accumulation_steps": 2})
    return DAPOConfig(num_iterations=2, overlong_buffer_len=4, **common)


def make_model(loss_type: str) -> Qwen2:
    """Untied LM head for grpo, tied for dapo (the embedding then doubles as the head)."""
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=loss_type in ("dapo", "dpo"),
    )
    return Qwen2(config, rngs=nnx.Rngs(0))


def make_batch(graphdef, params, cfg: GRPOConfig) -> dict[str, np.ndarray]:
    """Left-padded prompts, ragged completions, mixed groups (one with equal rewards, one full-length row),
    and perturbed reference / old-policy log-probs where the config uses them."""
    rng = np.random.default_rng(0)
    b = PROMPTS * G
    prompt_lengths = np.repeat([8, 5, 3, 6], G)
    prompt_mask_BP = (np.arange(P) >= P - prompt_lengths[:, None]).astype(np.int32)
    prompt_ids_BP = rng.integers(1, 256, (b, P)).astype(np.int32) * prompt_mask_BP
    lengths = rng.integers(1, N, b)
    lengths[3] = N
    loss_mask_BN = (np.arange(N) < lengths[:, None]).astype(np.int32)
    completion_ids_BN = rng.integers(1, 256, (b, N)).astype(np.int32) * loss_mask_BN
    rewards_B = rng.integers(0, 2, b).astype(np.float32)
    rewards_B[:G] = 1.0
    rewards_B[G : 2 * G] = [0, 1, 0, 0]
    batch = {
        "prompt_ids_BP": prompt_ids_BP,
        "prompt_mask_BP": prompt_mask_BP,
        "completion_ids_BN": completion_ids_BN,
        "loss_mask_BN": loss_mask_BN,
        "rewards_B": rewards_B,
    }
    args = (prompt_ids_BP, prompt_mask_BP, completion_ids_BN, loss_mask_BN)
    logp_BN = np.asarray(logprobs_fn(graphdef, params, *args, temperature=cfg.temperature))
    if cfg.beta > 0:
        batch["ref_logp_BN"] = (logp_BN + 0.1 * rng.standard_normal(logp_BN.shape)).astype(np.float32)
    if cfg.num_iterations > 1 or isinstance(cfg, PPOConfig):  # an older policy, far enough for some ratios to clip
        batch["old_logp_BN"] = (logp_BN + 0.3 * rng.standard_normal(logp_BN.shape)).astype(np.float32)
    if isinstance(cfg, PPOConfig):
        batch["ref_logp_BN"] = (logp_BN + 0.1 * rng.standard_normal(logp_BN.shape)).astype(np.float32)
        batch["old_values_BN"] = rng.standard_normal(logp_BN.shape).astype(np.float32) * loss_mask_BN
    if isinstance(cfg, DPOConfig):  # rows (0, 1) and (2, 3) of each group as (chosen, rejected), two padding
        chosen = (np.arange(PROMPTS)[:, None] * G + np.array([0, 2])).ravel()  # 8 pairs: any mesh splits them
        rejected = chosen + 1
        pair_mask_K = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.int32)
        return {
            "prompt_ids_KP": prompt_ids_BP[chosen],
            "prompt_mask_KP": prompt_mask_BP[chosen],
            "chosen_ids_KN": completion_ids_BN[chosen],
            "chosen_mask_KN": loss_mask_BN[chosen] * pair_mask_K[:, None],
            "rejected_ids_KN": completion_ids_BN[rejected],
            "rejected_mask_KN": loss_mask_BN[rejected] * pair_mask_K[:, None],
            "pair_mask_K": pair_mask_K,
            "ref_chosen_K": -rng.uniform(20, 40, len(chosen)).astype(np.float32),
            "ref_rejected_K": -rng.uniform(20, 40, len(chosen)).astype(np.float32),
        }
    return batch


def run(loss_type: str, name: str, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    cfg = make_config(loss_type)
    model = make_model(loss_type)
    graphdef, params = nnx.split(model)
    batch = make_batch(graphdef, params, cfg)
    if loss_type == "ppo":
        params = ppo_step.init_params(params, model.config.hidden_size, "separate")
    initial = {path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = make_mesh(*shape, devices=devices)
    optimizer = make_optimizer(cfg)
    state = init_state(params, optimizer)
    shardings = tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step_fn = jit_train_step(
        graphdef,
        cfg,
        optimizer,
        state_shardings=shardings,
        batch_shardings=batch_sharding(mesh),
        step=STEP_FNS[loss_type],
    )
    out: dict[str, np.ndarray] = {}
    history: dict[str, list[float]] = {}
    for _ in range(STEPS):
        state, metrics = step_fn(state, shard_batch(batch, mesh))
        for key, value in metrics.items():
            history.setdefault(key, []).append(float(value))
    out.update({f"{name}/{key}": np.array(values) for key, values in history.items()})
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        param = path_name(path)
        out[f"{name}/param/{param}"] = np.asarray(leaf)
        watched = param.removeprefix("policy/")  # PPO's policy; its critic follows the same rules
        if watched in WATCHED:
            out[f"{name}/spec/{watched}"] = np.array(str(leaf.sharding.spec))
            out[f"{name}/shards/{watched}"] = np.array([s.data.shape for s in leaf.addressable_shards])
            out[f"{name}/devices/{watched}"] = np.array(len(leaf.sharding.device_set))
    out.update({f"initial/{param}": value for param, value in initial.items()})
    return out


def main(path: str, *names: str) -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), have {jax.devices()}")
    losses = [n.removeprefix("loss=") for n in names if n.startswith("loss=")] or LOSSES
    meshes = [n for n in names if not n.startswith("loss=")]
    unknown = (set(meshes) - set(MESHES)) | (set(losses) - set(LOSSES))
    if unknown:
        raise SystemExit(f"unknown mesh(es) or loss(es) {sorted(unknown)}: choose from {sorted(MESHES)}, {LOSSES}")
    out: dict[str, np.ndarray] = {}
    for loss_type in losses:
        for name in meshes or MESHES:
            shape = MESHES[name]
            out.update({f"{loss_type}/{key}": value for key, value in run(loss_type, name, shape).items()})
    np.savez(path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
