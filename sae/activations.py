"""Activation sources for SAE training: in-memory or cached shards, or streamed from a Qwen2 model.

A source yields ``(x_ND, position)`` from ``iterate(position)``, where ``position`` is a small JSON-able
list saying where the next batch comes from. Batches are a pure function of the seed and the position,
so a run resumed from a checkpointed position sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from saerl_jax.errors import UserError
from saerl_jax.model import Qwen2, forward, pad_sequences


class ArraySource:
    """Shuffled batches from activations ``[N, D]`` held in memory (or memory-mapped), epoch after epoch."""

    def __init__(self, acts_ND: np.ndarray, batch_size: int, seed: int = 0):
        if acts_ND.ndim != 2 or acts_ND.shape[0] < batch_size:
            raise UserError(f"need a [N, D] array with N >= batch_size={batch_size}, got shape {acts_ND.shape}")
        self.acts_ND, self.batch_size, self.seed = acts_ND, batch_size, seed
        self.d_in = acts_ND.shape[1]

    def iterate(self, position: Sequence[int] = (0, 0)) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Yields batches from ``position = [epoch, batch index]`` on."""
        epoch, index = position
        per_epoch = self.acts_ND.shape[0] // self.batch_size
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.acts_ND.shape[0])
            for i in range(index, per_epoch):
                rows = np.sort(order[i * self.batch_size : (i + 1) * self.batch_size])
                yield (
                    np.asarray(self.acts_ND[rows], np.float32),
                    [epoch, i + 1] if i + 1 < per_epoch else [epoch + 1, 0],
                )
            epoch, index = epoch + 1, 0


def load_activation_shards(directory: str | os.PathLike) -> np.ndarray:
    """Concatenates the ``*.npy`` activation shards ``[n_i, D]`` of a directory, in name order."""
    files = sorted(Path(directory).glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.npy activation shards")
    shards = [np.load(f, mmap_mode="r") for f in files]
    widths = {s.shape[1] if s.ndim == 2 else None for s in shards}
    if len(widths) != 1 or None in widths:
        bad = next(f for f, s in zip(files, shards, strict=True) if s.ndim != 2 or s.shape[1] != shards[0].shape[1])
        raise UserError(f"{bad}: shard shape {np.load(bad, mmap_mode='r').shape} does not match {shards[0].shape}")
    return np.concatenate(shards, axis=0)


def token_mask(ids_BT: np.ndarray, mask_BT: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
    """Real, non-special tokens: the positions whose activations an SAE should see."""
    return mask_BT.astype(bool) & ~np.isin(ids_BT, np.asarray(list(special_ids), dtype=ids_BT.dtype))


def drop_outlier_norms(acts_ND: np.ndarray, factor: float = 10.0) -> np.ndarray:
    """Removes rows whose norm exceeds ``factor`` times the median (attention-sink tokens)."""
    norms = np.linalg.norm(acts_ND, axis=-1)
    return acts_ND[norms <= factor * np.median(norms)]


class ModelSource:
    """Activations of a Qwen2 model at ``layer``, streamed over token sequences through a shuffle buffer.

    The sequences are cut into rounds of ``sequences_per_round``; a round is encoded with the jitted,
    length-bucketed forward, its special and padding tokens masked and outlier-norm tokens dropped, then
    shuffled with a generator seeded by ``(seed, round)`` and served as batches. A position is
    ``[round, batch index]``; rounds wrap around the sequences (epochs).
    """

    def __init__(
        self,
        model: Qwen2,
        layer: int,
        sequences: Sequence[np.ndarray],
        *,
        batch_size: int,
        special_ids: Sequence[int] = (),
        sequences_per_round: int = 256,
        forward_batch: int = 16,
        seed: int = 0,
    ):
        if not sequences:
            raise UserError("no token sequences to stream activations from")
        self.model, self.layer, self.sequences = model, layer, list(sequences)
        self.batch_size, self.special_ids, self.seed = batch_size, tuple(special_ids), seed
        self.sequences_per_round, self.forward_batch = sequences_per_round, forward_batch
        self.d_in = model.config.hidden_size

    def round_activations(self, round_index: int) -> np.ndarray:
        """The shuffled activations ``[n, D]`` of one round."""
        n = len(self.sequences)
        picked = [
            self.sequences[(round_index * self.sequences_per_round + i) % n] for i in range(self.sequences_per_round)
        ]
        chunks = []
        for start in range(0, len(picked), self.forward_batch):
            batch = picked[start : start + self.forward_batch]
            ids_BT, mask_BT = pad_sequences(batch)
            acts_BTD = np.asarray(forward(self.model, ids_BT, mask_BT, capture_layer=self.layer), np.float32)
            chunks.append(acts_BTD[token_mask(ids_BT, mask_BT, self.special_ids)])
        acts_ND = drop_outlier_norms(np.concatenate(chunks, axis=0))
        return acts_ND[np.random.default_rng([self.seed, round_index]).permutation(acts_ND.shape[0])]

    def iterate(self, position: Sequence[int] = (0, 0)) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Yields batches from ``position = [round, batch index]`` on."""
        round_index, index = position
        while True:
            acts_ND = self.round_activations(round_index)
            per_round = acts_ND.shape[0] // self.batch_size
            if per_round == 0:
                raise UserError(
                    f"a round of {self.sequences_per_round} sequences gives {acts_ND.shape[0]} activations, fewer "
                    f"than batch_size={self.batch_size}: raise sequences_per_round"
                )
            for i in range(index, per_round):
                nxt = [round_index, i + 1] if i + 1 < per_round else [round_index + 1, 0]
                yield acts_ND[i * self.batch_size : (i + 1) * self.batch_size], nxt
            round_index, index = round_index + 1, 0
