"""The Grain data pipeline: problems by id as a random-access source, chat-template tokenization and
left padding as Grain transforms, and Orbax checkpointing of the iterator state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from grain import python as grain

from saerl_jax.data.problems import Problem
from saerl_jax.data.prompt import format_example
from saerl_jax.model import bucket_length, left_pad
from saerl_jax.pipeline.sampler import BatchSampler


class BatchSource:
    """Grain ``RandomAccessDataSource``: record key -> the ``Problem`` rows of that host's batch slice."""

    def __init__(self, sampler: BatchSampler, problems: Mapping[str, Problem]):
        missing = sorted(set(sampler.sample_ids) - set(problems))
        if missing:
            raise ValueError(f"{len(missing)} planned ids have no problem (first: {missing[0]})")
        self.sampler, self.problems = sampler, problems

    def __len__(self) -> int:
        return len(self.sampler)

    def __repr__(self) -> str:
        return f"BatchSource({self.sampler!r}, problems={len(self.problems)})"

    def __getitem__(self, record_key: int) -> list[Problem]:
        return [self.problems[i] for i in self.sampler.ids(record_key)]


@dataclasses.dataclass(frozen=True)
class TokenizePrompts(grain.MapTransform):
    """Problems -> left-padded chat prompts ``[B, T]`` (T a length bucket) with their ids and answers."""

    tokenizer: object
    min_bucket: int = 32

    def map(self, rows: list[Problem]) -> dict:
        prompts = [format_example(self.tokenizer, row.question).input_ids for row in rows]
        length = bucket_length(max(len(p) for p in prompts), self.min_bucket)
        ids, mask = left_pad(prompts, length, self.tokenizer.pad_token_id or 0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "ids": np.array([row.id for row in rows]),
            "final_answer": np.array([row.final_answer for row in rows]),
        }


def make_loader(sampler: BatchSampler, problems: Mapping[str, Problem], tokenizer) -> grain.DataLoader:
    """A ``grain.DataLoader`` yielding one tokenized host batch per step, in the sampler's order."""
    return grain.DataLoader(
        data_source=BatchSource(sampler, problems),
        sampler=sampler,
        operations=[TokenizePrompts(tokenizer)],
        worker_count=0,
        shard_options=sampler.shard_options,
    )
