"""Grain samplers that serve whole training batches in plan order (or a baseline order), split across
data-parallel hosts.

A record is one host's slice of one batch: record ``b * S + h`` holds ids ``batch_b[h::S]`` for host h of
S. Grain's ``DataLoader`` with ``ShardOptions(shard_index=h, shard_count=S)`` reads records
``h, h + S, h + 2S, ...``, so every host gets its slice of the same global batch, in the same order.
Epochs repeat the order (curriculum, external difficulty) or draw a new seeded one (shuffle).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from grain import python as grain

from saerl_jax.engineering.planner import Plan


class BatchSampler:
    """Grain's sampler protocol over a table of batches (lists of sample ids), ``num_epochs`` times.

    Args:
      epoch_batches: the batches of each epoch, ``epoch -> list of id lists``.
      num_epochs: epochs served.
      seed: seeds the per-record ``rng`` grain hands to random transforms.
      shard_options: data-parallel hosts; each gets ``batch[h::S]`` of every batch.
    """

    def __init__(self, epoch_batches, num_epochs: int, seed: int, shard_options: grain.ShardOptions | None):
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        self.shard_options = shard_options or grain.NoSharding()
        self.shard_count = self.shard_options.shard_count
        self.seed = seed
        self.table: list[list[str]] = [list(b) for epoch in range(num_epochs) for b in epoch_batches(epoch)]
        if not self.table:
            raise ValueError("no batches to serve")
        smallest = min(len(b) for b in self.table)
        if smallest < self.shard_count:
            raise ValueError(f"a batch of {smallest} ids cannot be split over {self.shard_count} hosts")

    def __len__(self) -> int:
        return len(self.table) * self.shard_count

    def __repr__(self) -> str:
        # Grain stores this in the iterator state and refuses to restore into a sampler that differs.
        digest = hashlib.sha256(json.dumps(self.table).encode()).hexdigest()[:16]
        return (
            f"{type(self).__name__}(batches={len(self.table)}, table={digest}, seed={self.seed}, "
            f"shard={self.shard_options.shard_index}/{self.shard_count})"
        )

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        rng = np.random.Generator(np.random.Philox(key=self.seed + index))
        return grain.RecordMetadata(index=index, record_key=index, rng=rng)

    def ids(self, record_key: int) -> list[str]:
        """The sample ids of a record: host ``h``'s slice of batch ``b``."""
        batch, host = divmod(record_key, self.shard_count)
        return self.table[batch][host :: self.shard_count]


class CurriculumSampler(BatchSampler):
    """Batches in the plan's order, the same each epoch."""

    def __init__(self, plan: Plan, num_epochs: int = 1, seed: int = 0, shard_options=None):
        super().__init__(lambda epoch: plan.batches, num_epochs, seed, shard_options)


class ShuffleSampler(BatchSampler):
    """Vanilla GRPO: every epoch a new seeded permutation of the ids, cut into ``batch_size`` batches."""

    def __init__(self, ids: Sequence[str], batch_size: int, num_epochs: int = 1, seed: int = 0, shard_options=None):
        ids = list(ids)

        def epoch_batches(epoch: int) -> list[list[str]]:
            order = np.random.default_rng([seed, epoch]).permutation(len(ids))
            return [[ids[i] for i in order[s : s + batch_size]] for s in range(0, len(ids), batch_size)]

        super().__init__(epoch_batches, num_epochs, seed, shard_options)


class ExternalDifficultySampler(BatchSampler):
    """A plain curriculum from the dataset's own difficulty labels: easy to hard, ties by id."""

    def __init__(
        self,
        ids: Sequence[str],
        difficulty: Sequence[float],
        batch_size: int,
        num_epochs: int = 1,
        seed: int = 0,
        shard_options=None,
    ):
        if len(ids) != len(difficulty):
            raise ValueError(f"{len(ids)} ids but {len(difficulty)} difficulty labels")
        order = sorted(range(len(ids)), key=lambda i: (difficulty[i], ids[i]))
        batches = [[ids[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        super().__init__(lambda epoch: batches, num_epochs, seed, shard_options)
