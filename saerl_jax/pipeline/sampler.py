"""Grain samplers that serve full training batches in plan order (or a baseline order), split across
data-parallel hosts.

Each sampler has an epoch order of its N sample ids (the plan's ids in plan order, a seeded permutation,
ids by difficulty). Epoch after epoch these orders form one endless stream, which is cut into batches of
exactly ``batch_size`` ids: batch b holds stream positions ``[b * B, (b + 1) * B)``. A plan's batches are
all full, so its batches come back exactly, in order, epoch after epoch; the baselines' last batch of an
epoch runs on into the next epoch's order (the same id can then appear twice in one batch).

A record is one host's slice of one batch: record ``b * S + h`` holds ids ``batch_b[h::S]`` for host h of
S, and ``batch_size`` must divide by S, so every host gets the same number of ids. Grain's ``DataLoader``
with ``ShardOptions(shard_index=h, shard_count=S)`` reads records ``h, h + S, h + 2S, ...``.

The stream is endless by default (``num_epochs=None``); a finite ``num_epochs`` serves its first
``ceil(num_epochs * N / B)`` batches. Either way the sampler's identity (its ``repr``, which Grain stores in
the iterator state and checks on restore) does not depend on the length, so a run can be resumed with
more steps than it was started with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence

import numpy as np
from grain import python as grain

from saerl_jax.engineering.planner import Plan

ENDLESS_BATCHES = 2**40
"""Batches of an endless stream (a length Grain can hold; no run gets near it)."""


class BatchSampler:
    """Grain's sampler protocol over full batches cut from a stream of epoch orders.

    Args:
      epoch_order: ``epoch -> the N sample ids of that epoch, in order`` (the same N ids every epoch).
      batch_size: ids per batch (the global batch, over all hosts).
      num_epochs: epochs served (the last batch may run into the next epoch); None: an endless stream.
      seed: seeds the per-record ``rng`` grain hands to random transforms.
      shard_options: data-parallel hosts; each gets ``batch[h::S]`` of every batch.
      identity: what determines the order (hashed into ``repr``).
    """

    def __init__(
        self,
        epoch_order: Callable[[int], list[str]],
        batch_size: int,
        num_epochs: int | None,
        seed: int,
        shard_options: grain.ShardOptions | None,
        identity: object,
    ):
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 (or None for an endless stream), got {num_epochs}")
        self.shard_options = shard_options or grain.NoSharding()
        self.shard_count = self.shard_options.shard_count
        if batch_size < 1 or batch_size % self.shard_count:
            raise ValueError(f"a batch of {batch_size} ids cannot be split evenly over {self.shard_count} hosts")
        self.epoch_order = functools.lru_cache(maxsize=4)(lambda epoch: list(epoch_order(epoch)))
        self.sample_ids = sorted(set(self.epoch_order(0)))
        if not self.sample_ids:
            raise ValueError("no sample ids to serve")
        self.epoch_size = len(self.epoch_order(0))
        self.batch_size, self.seed = batch_size, seed
        self.num_batches = ENDLESS_BATCHES
        if num_epochs is not None:
            self.num_batches = math.ceil(num_epochs * self.epoch_size / batch_size)
        self._digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_batches * self.shard_count

    def __repr__(self) -> str:
        # Grain stores this in the iterator state and refuses to restore into a sampler that differs.
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, order={self._digest}, seed={self.seed}, "
            f"shard={self.shard_options.shard_index}/{self.shard_count})"
        )

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range [0, {len(self)})")
        rng = np.random.Generator(np.random.Philox(key=self.seed + index))
        return grain.RecordMetadata(index=index, record_key=index, rng=rng)

    def batch(self, index: int) -> list[str]:
        """The ``batch_size`` ids of global batch ``index`` (stream positions ``[index * B, (index + 1) * B)``)."""
        start = index * self.batch_size
        ids = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.epoch_size)
            ids.append(self.epoch_order(epoch)[offset])
        return ids

    def ids(self, record_key: int) -> list[str]:
        """The sample ids of a record: host ``h``'s slice of batch ``b``."""
        batch, host = divmod(record_key, self.shard_count)
        return self.batch(batch)[host :: self.shard_count]


class CurriculumSampler(BatchSampler):
    """The plan's batches in order, the same each epoch. Every batch must hold the same number of ids (the
    trainer's global batch size; ``saerl engineer`` plans full batches)."""

    def __init__(self, plan: Plan, num_epochs: int | None = None, seed: int = 0, shard_options=None):
        sizes = sorted({len(batch) for batch in plan.batches})
        if len(sizes) != 1:
            raise ValueError(
                f"the plan's batches hold {sizes[0]} to {sizes[-1]} ids; every batch must be full "
                "(re-plan with saerl engineer --batch-size equal to the training batch size)"
            )
        order = plan.ids()
        super().__init__(lambda epoch: order, sizes[0], num_epochs, seed, shard_options, identity=plan.batches)


class ShuffleSampler(BatchSampler):
    """Vanilla GRPO: every epoch a new seeded permutation of the ids, the stream cut into full batches."""

    def __init__(
        self, ids: Sequence[str], batch_size: int, num_epochs: int | None = None, seed: int = 0, shard_options=None
    ):
        ids = list(ids)

        def epoch_order(epoch: int) -> list[str]:
            return [ids[i] for i in np.random.default_rng([seed, epoch]).permutation(len(ids))]

        super().__init__(epoch_order, batch_size, num_epochs, seed, shard_options, identity=["shuffle", seed, ids])


class ExternalDifficultySampler(BatchSampler):
    """A plain curriculum from the dataset's own difficulty labels: easy to hard, ties by id, every epoch."""

    def __init__(
        self,
        ids: Sequence[str],
        difficulty: Sequence[float],
        batch_size: int,
        num_epochs: int | None = None,
        seed: int = 0,
        shard_options=None,
    ):
        if len(ids) != len(difficulty):
            raise ValueError(f"{len(ids)} ids but {len(difficulty)} difficulty labels")
        order = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (difficulty[i], ids[i]))]
        super().__init__(lambda epoch: order, batch_size, num_epochs, seed, shard_options, identity=order)
