"""Turning sampler batches into graded rollout batches: a prompt queue over the Grain iterator, rollouts,
rewards (math + optional format + DAPO overlong shaping) and DAPO's dynamic sampling.

Everything here is per host: each host rolls out, grades and filters its own prompts, and its rows
become its part of the global batch of the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rl import losses
from rl.config import GRPOConfig
from rl.rollout import Rollout
from saerl_jax.model import bucket_length, left_pad


class SamplerExhaustedError(RuntimeError):
    """The sampler has no prompts left for another step."""


class NoSignalError(RuntimeError):
    """Dynamic sampling found too few groups with differing rewards within ``max_num_gen_batches``."""


@dataclasses.dataclass
class PromptQueue:
    """Prompts in sampler order, ``count`` at a time whatever the sampler's own batch size.

    Rows left over from a sampler batch are carried to the next step and saved in checkpoints
    (:meth:`state` / :meth:`restore`), so a resumed run takes the same prompts.
    """

    iterator: Iterator[dict]
    length: int
    """Longest prompt kept; longer ones keep their last ``length`` tokens (counted in ``truncated``)."""
    pad_id: int = 0
    fixed: bool = False
    """Pad every batch to ``length`` (equal shapes on every host) instead of to the length bucket of its
    longest prompt (less padding; a few compiles)."""
    pending: list[dict] = dataclasses.field(default_factory=list)
    truncated: int = 0

    def take(self, count: int) -> dict[str, np.ndarray]:
        """The next ``count`` prompts, left-padded: ``input_ids``, ``attention_mask``, ``ids``,
        ``final_answer``."""
        while len(self.pending) < count:
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise SamplerExhaustedError(
                    f"the sampler ran out of prompts ({len(self.pending)} left, {count} needed)"
                ) from None
            for row in range(len(batch["ids"])):
                keep = batch["attention_mask"][row].astype(bool)
                self.pending.append(
                    {
                        "input_ids": [int(t) for t in batch["input_ids"][row][keep]],
                        "id": str(batch["ids"][row]),
                        "final_answer": str(batch["final_answer"][row]),
                    }
                )
        rows, self.pending = self.pending[:count], self.pending[count:]
        prompts = [row["input_ids"][-self.length :] for row in rows]
        self.truncated += sum(len(p) < len(row["input_ids"]) for p, row in zip(prompts, rows, strict=True))
        width = self.length if self.fixed else min(self.length, bucket_length(max(len(p) for p in prompts)))
        ids, mask = left_pad(prompts, width, self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "ids": np.array([r["id"] for r in rows]),
            "final_answer": np.array([r["final_answer"] for r in rows]),
        }

    def state(self) -> list[dict]:
        """The carried-over rows, JSON-able."""
        return list(self.pending)

    def restore(self, pending: list[dict]) -> None:
        """Puts back rows saved by :meth:`state`."""
        self.pending = list(pending)


@dataclasses.dataclass
class GradedBatch:
    """A host's rows of one update: the rollout, rewards and what the metrics need."""

    rollout: Rollout
    rewards_B: np.ndarray
    correct_B: np.ndarray
    sample_ids: list[str]
    stats: dict[str, float]


def shaped_rewards(
    completions: Sequence[str],
    answers: Sequence[str],
    rollout: Rollout,
    cfg: GRPOConfig,
    grade: Callable[[Sequence[str], Sequence[str]], list[float]],
    format_reward: Callable[[str], float],
) -> tuple[np.ndarray, np.ndarray]:
    """``(rewards_B, correct_B)``: math reward, plus the weighted format reward and the overlong
    penalty; ``correct_B`` is the math reward alone (accuracy)."""
    correct_B = np.asarray(grade(completions, answers), np.float32)
    rewards_B = correct_B.copy()
    if cfg.format_reward_weight:
        rewards_B += cfg.format_reward_weight * np.array([format_reward(c) for c in completions], np.float32)
    if cfg.overlong_buffer_len:
        rewards_B += np.asarray(
            losses.overlong_penalty(
                rollout.lengths_B, cfg.max_completion_length, cfg.overlong_buffer_len, cfg.overlong_penalty_factor
            )
        )
    return rewards_B, correct_B


def collect(
    queue: PromptQueue,
    local_batch_size: int,
    cfg: GRPOConfig,
    roll: Callable[[dict[str, np.ndarray], int], Rollout],
    decode: Callable[[np.ndarray], list[str]],
    reward_fn: Callable[..., tuple[np.ndarray, np.ndarray]],
) -> GradedBatch:
    """Rolls out and grades ``local_batch_size`` prompts; with dynamic sampling, keeps drawing batches of
    that size and keeps only groups whose rewards differ until ``local_batch_size`` groups are found.

    Args:
      queue: where prompts come from.
      local_batch_size: prompts (groups) this host contributes.
      cfg: G, dynamic sampling and its draw limit.
      roll: ``(prompts, draw index) -> Rollout`` of ``len(prompts) * G`` rows.
      decode: completion token rows -> texts.
      reward_fn: ``(completions, answers, rollout) -> (rewards_B, correct_B)``.

    Raises:
      NoSignalError: dynamic sampling drew ``max_num_gen_batches`` batches without filling the batch.
    """
    g = cfg.num_generations
    parts: list[tuple[Rollout, np.ndarray, np.ndarray, list[str]]] = []
    kept = drawn = dropped = 0
    stats: dict[str, Any] = {}
    while kept < local_batch_size:
        if drawn == cfg.max_num_gen_batches:
            raise NoSignalError(
                f"dynamic sampling kept {kept} of the {local_batch_size} groups needed after {drawn} batches "
                f"(max_num_gen_batches={cfg.max_num_gen_batches}): every other group had equal rewards; "
                "raise max_num_gen_batches, G, or the temperature, or use easier or harder data"
            )
        prompts = queue.take(local_batch_size)
        rollout = roll(prompts, drawn)
        answers = list(np.repeat(prompts["final_answer"], g))
        rewards_B, correct_B = reward_fn(decode(rollout.completion_ids_BN), answers, rollout)
        if drawn == 0:
            std = np.asarray(losses.group_reward_std(rewards_B, g))
            stats["frac_reward_zero_std"] = float(np.mean(std == 0))
        drawn += 1
        groups = losses.groups_with_signal(rewards_B, g) if cfg.dynamic_sampling else np.ones(local_batch_size, bool)
        dropped += int((~groups).sum())
        groups = np.flatnonzero(groups)[: local_batch_size - kept]
        rows = (groups[:, None] * g + np.arange(g)).ravel()
        ids = [str(i) for i in prompts["ids"][groups]]
        parts.append((rollout.select(rows), rewards_B[rows], correct_B[rows], ids))
        kept += len(groups)
    stats.update(groups_filtered=dropped, gen_batches=drawn)
    return GradedBatch(
        rollout=_concat([p[0] for p in parts]),
        rewards_B=np.concatenate([p[1] for p in parts]),
        correct_B=np.concatenate([p[2] for p in parts]),
        sample_ids=[i for p in parts for i in p[3]],
        stats=stats,
    )


def loss_mask(rollout: Rollout, mask_truncated_completions: bool) -> np.ndarray:
    """The tokens the loss sees, ``[B, N]`` int32: the completion mask, with completions that hit the
    budget without an EOS zeroed when ``mask_truncated_completions`` (DAPO's overlong filtering)."""
    mask_BN = rollout.completion_mask_BN.astype(np.int32)
    if mask_truncated_completions:
        mask_BN = mask_BN * ~rollout.truncated_B[:, None]
    return mask_BN


def _concat(rollouts: list[Rollout]) -> Rollout:
    """Rows of several rollouts in one; prompts are left-padded to the widest."""
    width = max(r.prompt_ids_BP.shape[1] for r in rollouts)

    def widen(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (width - a.shape[1], 0)))

    rollouts = [
        r._replace(prompt_ids_BP=widen(r.prompt_ids_BP), prompt_mask_BP=widen(r.prompt_mask_BP)) for r in rollouts
    ]
    return Rollout(*(np.concatenate(fields) for fields in zip(*rollouts, strict=True)))
