"""Turning sampler batches into graded rollout batches: a prompt queue over the Grain iterator, rollouts,
rewards (math + optional format + DAPO overlong shaping) and DAPO's dynamic sampling.

Everything here is per host: each host rolls out, grades and filters its own prompts, and its rows
become its part of the global batch of the update.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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
    """Sampler batches as rollout prompts: each :meth:`take` is exactly one of this host's sampler records
    (its slice of one global batch), so a step trains the batches the sampler (the plan) lists, in order.

    ``taken`` and ``truncated`` go into checkpoints with the Grain iterator's state.
    """

    iterator: Iterator[dict]
    length: int
    """Longest prompt kept; longer ones keep their last ``length`` tokens (counted in ``truncated``)."""
    pad_id: int = 0
    fixed: bool = False
    """Pad every batch to ``length`` (equal shapes on every host) instead of to the length bucket of its
    longest prompt (less padding; a few compiles)."""
    taken: int = 0
    """Sampler batches taken so far: the stream index of the next one."""
    truncated: int = 0

    def take(self) -> dict[str, np.ndarray]:
        """The next sampler batch, left-padded: ``input_ids``, ``attention_mask``, ``ids``, ``final_answer``,
        and ``index`` (its position in the sampler's stream of batches)."""
        try:
            batch = next(self.iterator)
        except StopIteration:
            raise SamplerExhaustedError(f"the sampler ran out of batches after {self.taken}") from None
        masks = batch["attention_mask"].astype(bool)
        rows = [[int(t) for t in ids[keep]] for ids, keep in zip(batch["input_ids"], masks, strict=True)]
        prompts = [row[-self.length :] for row in rows]
        self.truncated += sum(len(p) < len(row) for p, row in zip(prompts, rows, strict=True))
        width = self.length if self.fixed else min(self.length, bucket_length(max(len(p) for p in prompts)))
        ids, mask = left_pad(prompts, width, self.pad_id)
        self.taken += 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "ids": np.array([str(i) for i in batch["ids"]]),
            "final_answer": np.array([str(a) for a in batch["final_answer"]]),
            "index": self.taken - 1,
        }

    def state(self) -> dict[str, int]:
        """The counters, JSON-able."""
        return {"taken": self.taken, "truncated": self.truncated}

    def restore(self, state: dict[str, int]) -> None:
        """Puts back counters saved by :meth:`state`."""
        self.taken, self.truncated = int(state["taken"]), int(state["truncated"])


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
    if cfg.overlong_buffer_tokens:
        rewards_B += np.asarray(
            losses.overlong_penalty(
                rollout.lengths_B, cfg.max_completion_length, cfg.overlong_buffer_tokens, cfg.overlong_penalty_factor
            )
        )
    return rewards_B, correct_B


def collect(
    queue: PromptQueue,
    cfg: GRPOConfig,
    roll: Callable[[dict[str, np.ndarray], int], Rollout],
    decode: Callable[[np.ndarray], list[str]],
    reward_fn: Callable[..., tuple[np.ndarray, np.ndarray]],
    full: Callable[[int, int], bool] = lambda kept, need: kept >= need,
) -> GradedBatch:
    """Rolls out and grades the next sampler batch (this host's slice of the step's planned batch).

    With dynamic sampling (DAPO), groups whose ``cfg.filter_groups_metric`` (accuracy by default, as in
    the DAPO paper and verl; or the shaped reward) is equal across all G completions are dropped, and the
    step refills from the batches that follow the planned one in the sampler's order (for a plan: its
    neighbours, same stage and nearby clusters), one whole batch per draw: groups with signal are taken in
    batch order until the step holds as many groups as the planned batch; the rest of the last draw is
    discarded (as in verl), so the next step starts at the next unused batch.

    Args:
      queue: where sampler batches come from.
      cfg: G, dynamic sampling, its metric and its draw limit.
      roll: ``(prompts, draw index) -> Rollout`` of ``len(prompts) * G`` rows.
      decode: completion token rows -> texts.
      reward_fn: ``(completions, answers, rollout) -> (rewards_B, correct_B)``.
      full: ``(kept, needed) -> whether the step is full``; on several hosts it must be true on every host
        at once (each host then draws the same batches of the stream).

    Returns:
      The graded batch; its ``stats`` hold ``batch_index`` (the planned batch's place in the stream),
      ``gen_batches`` (batches drawn), ``planned_share`` (share of the kept groups from the planned batch),
      ``groups_filtered`` and ``frac_reward_zero_std`` (of the planned batch).

    Raises:
      NoSignalError: dynamic sampling drew ``max_num_gen_batches`` batches without filling the step.
    """
    g = cfg.num_generations
    parts: list[tuple[Rollout, np.ndarray, np.ndarray, list[str]]] = []
    kept = drawn = dropped = need = 0
    stats: dict[str, Any] = {}
    while drawn == 0 or not full(kept, need):
        if drawn == cfg.max_num_gen_batches:
            raise NoSignalError(
                f"dynamic sampling kept {kept} of the {need} groups needed after {drawn} batches "
                f"(max_num_gen_batches={cfg.max_num_gen_batches}): every other group had equal "
                f"{cfg.filter_groups_metric}; raise max_num_gen_batches, G, or the temperature, or use easier or "
                "harder data"
            )
        prompts = queue.take()
        rollout = roll(prompts, drawn)
        answers = list(np.repeat(prompts["final_answer"], g))
        rewards_B, correct_B = reward_fn(decode(rollout.completion_ids_BN), answers, rollout)
        if drawn == 0:
            need = len(prompts["ids"])
            std = np.asarray(losses.group_reward_std(rewards_B, g))
            stats.update(batch_index=prompts["index"], frac_reward_zero_std=float(np.mean(std == 0)))
        drawn += 1
        signal_B = correct_B if cfg.filter_groups_metric == "accuracy" else rewards_B
        groups = losses.groups_with_signal(signal_B, g) if cfg.dynamic_sampling else np.ones(len(prompts["ids"]), bool)
        dropped += int((~groups).sum())
        groups = np.flatnonzero(groups)[: need - kept]
        rows = (groups[:, None] * g + np.arange(g)).ravel()
        ids = [str(i) for i in prompts["ids"][groups]]
        parts.append((rollout.select(rows), rewards_B[rows], correct_B[rows], ids))
        kept += len(groups)
    stats.update(groups_filtered=dropped, gen_batches=drawn, planned_share=len(parts[0][3]) / max(kept, 1))
    return GradedBatch(
        rollout=_concat([p[0] for p in parts if len(p[3])]),
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


class RolloutStore:
    """Completions sampled once per prompt and kept in a JSONL file (offline DPO: the initial policy's
    rollouts), one line per prompt id, appended and flushed as they are sampled. A torn last line (a run
    killed mid-write) is dropped on load: the prompt is sampled again, to the same tokens."""

    def __init__(self, path: Path, width: int, pad_id: int):
        self.path, self.width, self.pad_id = path, width, pad_id
        self.rows: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.rows[row["id"]] = row

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.rows

    def add(self, sample_id: str, rollout: Rollout) -> None:
        """Keeps the G completions of one prompt (``rollout``'s rows)."""
        row = {
            "id": sample_id,
            "completions": [ids[mask == 1].tolist() for ids, mask in zip(*rollout[2:4], strict=True)],
            "truncated": rollout.truncated_B.tolist(),
        }
        self.rows[sample_id] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rollout(self, sample_ids: Sequence[str], prompt_ids_BP: np.ndarray, prompt_mask_BP: np.ndarray) -> Rollout:
        """The stored completions of ``sample_ids`` (each repeated G times in the prompt arrays), as a rollout
        (sampler log-probs 0: they are not kept)."""
        completions = [c for i in sample_ids for c in self.rows[i]["completions"]]
        ids_BN = np.full((len(completions), self.width), self.pad_id, np.int32)
        mask_BN = np.zeros((len(completions), self.width), np.int32)
        for row, tokens in enumerate(completions):
            ids_BN[row, : len(tokens)], mask_BN[row, : len(tokens)] = tokens, 1
        truncated_B = np.array([t for i in sample_ids for t in self.rows[i]["truncated"]], bool)
        return Rollout(prompt_ids_BP, prompt_mask_BP, ids_BN, mask_BN, np.zeros(ids_BN.shape, np.float32), truncated_B)
