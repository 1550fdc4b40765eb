"""Supervised fine-tuning of the Flax Qwen2 on chat-formatted problems, and greedy answer accuracy.

Used to make the tiny-math model (``scripts/train_tinymath_sft.py``); the loss covers the solution tokens
and the closing ``<|im_end|>`` only. Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from rl.rewards import math_reward
from saerl_jax.data import tinymath
from saerl_jax.data.prompt import format_example
from saerl_jax.model import Qwen2, Qwen2Config, SamplingConfig, bucket_length, generate, left_pad
from saerl_jax.model.engine import EngineConfig, generate_continuous
from saerl_jax.precision import DType, Precision, cast_floating, check_dtype, resolve_compute_dtype


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Optimiser and batch settings."""

    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 64
    """Sequences per step."""
    seq_len: int = 128
    """Sequences are right-padded (or cut) to this many tokens."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, linear warm-up then cosine decay to 10%)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    clip_norm: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Batch order seed."""
    param_dtype: DType = "float32"
    """Master weights and optimizer state (the model's parameters are cast to it, in place)."""
    compute_dtype: DType | None = None
    """Matmuls and activations of the forward and backward passes (the loss stays float32); None: bfloat16 on
    accelerators, float32 on CPU."""

    def __post_init__(self) -> None:
        check_dtype("param_dtype", self.param_dtype, optional=False)
        check_dtype("compute_dtype", self.compute_dtype)


def tinymath_sft_rows(n: int) -> list[dict]:
    """``n`` tiny-math problems for SFT: seed ``tinymath.SFT_SEED``, no noise, ids from ``SFT_ID_OFFSET``.

    Disjoint from the RL pool and the held-out set by seed and ids; the tiny-math model and the transfer
    study's model B both learn from these.
    """
    return tinymath.generate(n, seed=tinymath.SFT_SEED, noise_fraction=0.0, id_offset=tinymath.SFT_ID_OFFSET)


def small_qwen2_config(
    vocab_size: int, *, hidden_size: int, intermediate_size: int, layers: int, heads: int, kv_heads: int
) -> Qwen2Config:
    """A small Qwen2 of the tiny-math kind: tied input and output embeddings, 512 positions."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class SFTData:
    """Tokenized training sequences: ids, attention mask and loss mask, each ``[N, T]`` int32."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray


def tokenize_sft(tokenizer, rows: Sequence[dict], seq_len: int, solution_field: str = "r1_solution_1") -> SFTData:
    """Formats each row as prompt + solution + ``<|im_end|>``; the loss mask covers solution and end token."""
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id or 0
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    attention = np.zeros((len(rows), seq_len), np.int32)
    loss = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        example = format_example(tokenizer, row["question"], row[solution_field])
        tokens = np.append(example.input_ids, end_id)[:seq_len]
        ids[i, : len(tokens)] = tokens
        attention[i, : len(tokens)] = 1
        loss[i, example.solution_span[0] : len(tokens)] = 1
    return SFTData(ids, attention, loss)


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, end_value=cfg.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def token_loss(model: Qwen2, ids_BT: jax.Array, attention_BT: jax.Array, loss_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the positions whose target has ``loss_BT == 1``."""
    logits_BTV = model(ids_BT, attention_BT).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], ids_BT[:, 1:])
    weights = loss_BT[:, 1:].astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@nnx.jit(donate_argnums=(0, 1), static_argnames=("compute_dtype",))
def train_step(
    model: Qwen2, optimizer: nnx.Optimizer, ids_BT, attention_BT, loss_BT, compute_dtype: str = "float32"
) -> jax.Array:
    """One AdamW step on a batch, forward and backward in ``compute_dtype`` (the parameters are cast to it
    inside the differentiated function, so the gradients and the update keep their dtype); returns the loss."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        return token_loss(
            nnx.merge(graphdef, cast_floating(params, compute_dtype), rest), ids_BT, attention_BT, loss_BT
        )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    optimizer.update(model, grads)
    return loss


def batches(data: SFTData, cfg: SFTConfig, start_step: int = 0):
    """Yields ``(step, ids, attention, loss)`` for steps ``start_step..cfg.steps-1``: epochs of seeded shuffles."""
    n = len(data.input_ids)
    per_epoch = max(n // cfg.batch_size, 1)
    for step in range(start_step, cfg.steps):
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        pick = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
        yield step, data.input_ids[pick], data.attention_mask[pick], data.loss_mask[pick]


def train(model: Qwen2, data: SFTData, cfg: SFTConfig, *, evaluate=None, eval_every: int = 0, progress=True):
    """Trains ``model`` in place; calls ``evaluate(model, step)`` every ``eval_every`` steps.

    Returns:
      ``(losses, evaluations)``: the loss of every step and the values ``evaluate`` returned, by step.
      ``evaluate`` may return ``"stop"`` to end training early.
    """
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype)
    print(Precision(params=cfg.param_dtype, compute=compute_dtype).describe(), flush=True)
    nnx.update(model, cast_floating(nnx.state(model, nnx.Param), cfg.param_dtype))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    losses, evaluations = [], {}
    bar = tqdm(total=cfg.steps, desc="sft", unit="step", disable=not progress)
    for step, ids, attention, loss_mask in batches(data, cfg):
        loss = train_step(
            model, optimizer, jnp.asarray(ids), jnp.asarray(attention), jnp.asarray(loss_mask), compute_dtype
        )
        losses.append(loss)
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
            evaluations[step + 1] = evaluate(model, step + 1)
            if evaluations[step + 1] == "stop":
                break
    bar.close()
    return [float(x) for x in losses], evaluations


def greedy_completions(
    model: Qwen2,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    engine: str = "continuous",
    progress: bool = False,
) -> list[str]:
    """Greedy completions of the chat prompts of ``questions``, decoded up to ``<|im_end|>``.

    ``engine="continuous"`` (default) keeps ``batch_size`` cache slots busy (:mod:`saerl_jax.model.engine`);
    ``"static"`` decodes ``batch_size`` prompts at a time, each batch until its longest completion ends (the
    reference). The same completions either way."""
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id or 0
    prompts = [format_example(tokenizer, q).input_ids for q in questions]
    if engine == "continuous":
        tokens_BN, valid_BN = _greedy_continuous(model, prompts, max_new_tokens, batch_size, end_id, pad_id, progress)
    else:
        tokens_BN, valid_BN = _greedy_static(model, prompts, max_new_tokens, batch_size, end_id, pad_id, progress)
    return [
        tokenizer.decode(tokens[valid.astype(bool) & (tokens != end_id)].tolist(), skip_special_tokens=True)
        for tokens, valid in zip(tokens_BN, valid_BN, strict=True)
    ]


def _greedy_static(model, prompts, max_new_tokens, batch_size, end_id, pad_id, progress):
    tokens, valid = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        # a fixed batch size: one compile
        ids, mask = left_pad(batch, max(len(p) for p in batch), pad_id, rows=batch_size)
        mask[len(batch) :, -1] = 1  # filler rows
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_token_id=end_id,
            rng=jax.random.key(0),
            pad_token_id=pad_id,
        )
        tokens.append(np.asarray(out.tokens_BN)[: len(batch)])
        valid.append(np.asarray(out.mask_BN)[: len(batch)])
    return np.concatenate(tokens), np.concatenate(valid)


def _greedy_continuous(model, prompts, max_new_tokens, batch_size, end_id, pad_id, progress):
    ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)))
    graphdef, params = nnx.split(model)
    bar = tqdm(total=len(prompts), desc="generate", unit="completion", disable=not progress)
    out, _ = generate_continuous(
        graphdef,
        params,
        ids,
        mask,
        jax.random.split(jax.random.key(0), len(prompts)),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
        eos_ids=[end_id],
        pad_id=pad_id,
        engine=EngineConfig(slots=batch_size),
        on_done=bar.update,
    )
    bar.close()
    return out.tokens_BN, out.mask_BN


def greedy_accuracy(model: Qwen2, tokenizer, rows: Sequence[dict], **kwargs) -> tuple[float, list[float]]:
    """Fraction of rows whose greedy completion's boxed answer is right (math-verify), and per-row rewards."""
    completions = greedy_completions(model, tokenizer, [row["question"] for row in rows], **kwargs)
    rewards = [math_reward(c, row["final_answer"]) for c, row in zip(completions, rows, strict=True)]
    return float(np.mean(rewards)) if rewards else 0.0, rewards
