"""Curriculum planner: ordered, full batches of sample ids from difficulty, clusters and lengths.

``CurriculumPlanner.plan`` turns per-sample difficulty (the calibrated SAE proxy or external labels, the
caller chooses), cluster ids and lengths into a :class:`Plan`. Every batch holds exactly ``batch_size``
ids: the trainer trains one plan batch per step with the plan built at its global batch size.

1. stages: the samples, ranked by difficulty (ties by id), are cut into ``n_stages`` equal-count quantile
   stages, easy to hard;
2. inside a (stage, cluster): samples sorted easy to hard and cut into full batches (cluster-first
   grouping); every cluster's remainder (its hardest samples) goes to the stage's leftover pool, which is
   sorted and cut into full mixed batches at the stage's end. The pool's own remainder (fewer than
   ``batch_size`` samples) is carried into the next stage's leftover pool, so a mixed batch can hold the
   hardest leftovers of one stage with the easiest of the next; such a batch is recorded in the later
   stage (the one whose pool it was cut from). With ``cluster=False`` the whole stage is the pool;
3. inside a stage: the clusters' batches are interleaved round-robin, easier clusters (by mean
   difficulty in the stage) first;
4. moderate mixing: disjoint pairs of adjacent cluster batches from different clusters swap
   ``round(mixing_ratio * batch_size)`` samples: the tail of the first batch for the partners in the next
   batch nearest in (difficulty z-score, length z-score), chosen greedily. Each batch swaps at most once,
   so a mixed batch holds ``1 - mixing_ratio`` of its own cluster and ``mixing_ratio`` of one other.
   A pair can swap at most half of each batch, and ratios r and 1 - r give mirrored batches, so this
   ``mixing="pairs"`` mode only spans [0, 0.5]. ``mixing="pooled"`` spans [0, 1]: each cluster batch of a
   stage gives ``round(mixing_ratio * batch_size)`` seeded-random samples to a stage pool, which is shuffled
   and dealt back in their place; 1 makes every batch a random draw from the stage's cluster batches, the
   far end of the diversity axis (stage order kept).

The last stage's remainder is the plan's last batch, topped up to ``batch_size`` with repeats: the
already-planned samples nearest in the ordering key (difficulty; the random key with ``sort=False``) to the
remainder's mean key, each repeated at most once (ties: the earlier rank). Its stats record how many in
``n_repeated``; every other batch has ``n_repeated`` 0 and no id twice, and every id appears at least once.

Ablations. ``sort=False`` replaces difficulty by a seeded random key in every ordering step (stages,
order inside clusters and batches, order of the clusters), so nothing goes easy to hard, not even by stage;
clustering and mixing are kept (mixing still pairs partners by difficulty and length). ``cluster=False``
cuts each stage's pool directly (no cluster batches, so no mixing either). ``mixing_ratio=0`` swaps
nothing, so cluster batches hold a single cluster. ``order="random"`` is vanilla GRPO on the same pool:
one seeded permutation cut into batches, the last topped up by wrapping around to the permutation's start.

A pool smaller than ``batch_size`` cannot fill one batch and is an error. The inputs are put in id order
first, so a plan does not depend on the order of the rows it is given; the same inputs and seed give the
same plan.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sp_stats
from sklearn.base import BaseEstimator

from saerl_jax.engineering.diversity import counts_entropy, mean_pairwise_distance
from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write

PLAN_FORMAT = 1
MIXING_MODES = {"pairs": 0.5, "pooled": 1.0}
"""Mixing modes and the largest ratio each takes."""
DECIMALS = 6


def _round(obj: Any) -> Any:
    """Floats rounded to :data:`DECIMALS` places, tuples as lists, numpy scalars as Python ones."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return round(obj, DECIMALS)
    if isinstance(obj, dict):
        return {key: _round(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(value) for value in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class Plan:
    """Ordered batches of sample ids with per-batch statistics; what a sampler walks through."""

    batches: list[list[str]]
    """Sample ids per batch, in training order; every batch has the planner's ``batch_size`` ids."""
    stats: list[dict]
    """Per batch: ``stage``, ``cluster_hist`` {cluster: count}, ``dominant_cluster``, ``mean_difficulty``,
    ``mean_length``, ``n_clusters``, ``diversity`` (mean pairwise feature distance, or None) and
    ``n_repeated`` (ids already planned in an earlier batch, only ever non-zero in the last batch); counts
    and means are over the batch's positions, repeats included."""
    config: dict
    """The planner's parameters."""
    meta: dict
    """Whatever the caller recorded (seed, input hashes, ...): JSON values (lists, not tuples), floats
    with at most 6 decimals if ``Plan.load(path) == plan`` should hold after :meth:`save`."""

    def ids(self) -> list[str]:
        """All ids in plan order."""
        return [sample_id for batch in self.batches for sample_id in batch]

    def summary(self) -> dict:
        """Plan-level numbers: batch count, distinct samples, repeated positions (``n_batches * batch_size
        = n_samples + n_repeated``), mean distinct clusters and cluster entropy (nats) per batch, mean
        diversity (None without features), and difficulty monotonicity: the Spearman rho of batch index vs
        batch mean difficulty (None with fewer than two batches or constant means)."""
        entropies = [counts_entropy(list(stat["cluster_hist"].values())) for stat in self.stats]
        diversity = [s["diversity"] for s in self.stats if s["diversity"] is not None]
        means = np.array([s["mean_difficulty"] for s in self.stats])
        rho = None
        if len(means) > 1 and np.ptp(means) > 0:
            rho = float(sp_stats.spearmanr(np.arange(len(means)), means).statistic)
        return _round(
            {
                "n_batches": len(self.batches),
                "n_samples": len(set(self.ids())),
                "n_repeated": sum(s.get("n_repeated", 0) for s in self.stats),
                "mean_distinct_clusters": float(np.mean([s["n_clusters"] for s in self.stats])),
                "mean_cluster_entropy": float(np.mean(entropies)),
                "mean_diversity": float(np.mean(diversity)) if diversity else None,
                "difficulty_monotonicity": rho,
            }
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the plan as one JSON file, atomically: sorted keys, floats rounded to 6 places, so the
        same plan always gives the same bytes."""
        doc = {"format": PLAN_FORMAT, **dataclasses.asdict(self)}
        text = json.dumps(_round(doc), sort_keys=True, indent=1, allow_nan=False) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Reads a file written by :meth:`save`.

        Raises:
            UserError: the file is not valid JSON or not a plan of this format (names the file).
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err}); write it again with saerl engineer") from None
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise UserError(f"{path} is not a plan file of format {PLAN_FORMAT}")
        try:
            stats = [{**s, "cluster_hist": {int(c): n for c, n in s["cluster_hist"].items()}} for s in doc["stats"]]
            return cls(batches=doc["batches"], stats=stats, config=doc["config"], meta=doc["meta"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise UserError(f"{path}: a plan file without a valid {err} field") from None


def _column(name: str, values: Any, n: int, *, ndim: int = 1) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if len(array) != n:
        raise ValueError(f"{name} has {len(array)} rows, expected {n} (one per id)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    return array


def _inputs(ids, difficulty, clusters, lengths, features):
    """Validated inputs, rows put in id order: ``(ids, d_N, c_N, len_N, f_NxC or None)``."""
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
        raise ValueError("ids must be a sequence of strings")
    if len(ids) == 0:
        raise ValueError("ids is empty")
    ids_N = np.array(ids, dtype=object)
    order = np.argsort(ids_N, kind="stable")
    ids_N = ids_N[order]
    duplicate = ids_N[1:][ids_N[1:] == ids_N[:-1]]
    if len(duplicate):
        raise ValueError(f"ids are not unique: {duplicate[0]!r} appears more than once")
    n = len(ids_N)
    clusters = _column("clusters", clusters, n)
    if not np.issubdtype(clusters.dtype, np.integer):
        raise ValueError(f"clusters must be integers, got dtype {clusters.dtype}")
    columns = (
        _column("difficulty", difficulty, n).astype(np.float64)[order],
        clusters.astype(np.int64)[order],
        _column("lengths", lengths, n).astype(np.float64)[order],
        None if features is None else _column("features", features, n, ndim=2).astype(np.float64)[order],
    )
    return (ids_N.tolist(), *columns)


def _zscore(x_N: np.ndarray) -> np.ndarray:
    std = x_N.std()
    return (x_N - x_N.mean()) / (std if std > 0 else 1.0)


def _cut(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[start : start + size] for start in range(0, len(idx), size)]


def _stage_batches(idx, carry, rank_N, key_N, clusters_N, batch_size, cluster):
    """One stage's full batches as ``(source cluster or None for mixed, indices)`` in training order, and
    the leftover pool's remainder (fewer than ``batch_size`` indices) to carry into the next stage."""
    idx = idx[np.argsort(rank_N[idx])]
    full, pool, order = {}, [carry], []
    if cluster:
        groups = {int(c): idx[clusters_N[idx] == c] for c in np.unique(clusters_N[idx])}
        order = sorted(groups, key=lambda c: (float(key_N[groups[c]].mean()), c))
        for c in order:
            n_full = len(groups[c]) // batch_size * batch_size
            full[c] = _cut(groups[c][:n_full], batch_size)
            pool.append(groups[c][n_full:])
    else:
        pool.append(idx)
    leftover = np.concatenate(pool)
    leftover = leftover[np.argsort(rank_N[leftover])]
    n_full = len(leftover) // batch_size * batch_size
    batches = []
    for round_ in range(max((len(b) for b in full.values()), default=0)):
        batches += [(c, full[c][round_]) for c in order if round_ < len(full[c])]
    return batches + [(None, batch) for batch in _cut(leftover[:n_full], batch_size)], leftover[n_full:]


def _top_up(short: np.ndarray, planned: np.ndarray, key_N: np.ndarray, batch_size: int) -> np.ndarray:
    """The ``batch_size - len(short)`` indices of ``planned`` (distinct, in rank order) nearest in key to
    ``short``'s mean key, ties to the earlier rank."""
    distance = np.abs(key_N[planned] - key_N[short].mean())
    return planned[np.sort(np.argsort(distance, kind="stable")[: batch_size - len(short)])]


def _swap_tail(a: np.ndarray, b: np.ndarray, n_swap: int, x_Nx2: np.ndarray) -> None:
    """Swaps the last ``n_swap`` samples of ``a`` in place, each for the still-unswapped sample of ``b``
    nearest to it in ``x`` (ties: the first)."""
    free = np.ones(len(b), bool)
    for pos in range(len(a) - n_swap, len(a)):
        dist = np.linalg.norm(x_Nx2[b] - x_Nx2[a[pos]], axis=1)
        dist[~free] = np.inf
        j = int(np.argmin(dist))
        free[j] = False
        a[pos], b[j] = b[j], a[pos]


def _mix(batches, n_swap, x_Nx2):
    """Swaps ``n_swap`` samples within disjoint pairs of adjacent batches from different clusters."""
    batches = [(source, batch.copy()) for source, batch in batches]
    i = 0
    while i + 1 < len(batches):
        (source_a, a), (source_b, b) = batches[i], batches[i + 1]
        if source_a is None or source_b is None or source_a == source_b:
            i += 1
            continue
        _swap_tail(a, b, min(n_swap, len(a), len(b)), x_Nx2)
        i += 2
    return [batch for _, batch in batches]


def _pool_mix(batches, n_pool: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each cluster batch gives ``n_pool`` random samples to a pool that is shuffled and dealt back in their
    place; batches cut from the leftover pool (already mixed) are left as they are."""
    batches = [(source, batch.copy()) for source, batch in batches]
    givers = [batch for source, batch in batches if source is not None]
    if len(givers) > 1:
        slots = [rng.choice(len(batch), min(n_pool, len(batch)), replace=False) for batch in givers]
        pool = rng.permutation(np.concatenate([batch[s] for batch, s in zip(givers, slots, strict=True)]))
        start = 0
        for batch, s in zip(givers, slots, strict=True):
            batch[s] = pool[start : start + len(s)]
            start += len(s)
    return [batch for _, batch in batches]


def _batch_stats(idx, stage, n_repeated, difficulty_N, clusters_N, lengths_N, features_NxC) -> dict:
    values, counts = np.unique(clusters_N[idx], return_counts=True)
    return _round(
        {
            "stage": stage,
            "cluster_hist": {int(c): int(n) for c, n in zip(values, counts, strict=True)},
            "dominant_cluster": int(values[np.argmax(counts)]),
            "mean_difficulty": float(difficulty_N[idx].mean()),
            "mean_length": float(lengths_N[idx].mean()),
            "n_clusters": len(values),
            "diversity": None if features_NxC is None else mean_pairwise_distance(features_NxC[idx]),
            "n_repeated": n_repeated,
        }
    )


class CurriculumPlanner(BaseEstimator):
    """Builds a :class:`Plan` (see the module docstring for the four steps).

    Args:
        batch_size: ids in every batch: the trainer's global batch (prompts per RL step over all hosts).
        n_stages: number of equal-count stages (by difficulty; by the random key with ``sort=False``).
        mixing_ratio: fraction of each cluster batch mixed, in [0, 0.5] for ``mixing="pairs"`` and [0, 1]
            for ``"pooled"``; 0 is the no-mixing ablation (cluster batches hold one cluster each).
        mixing: "pairs" (swap with the neighbouring cluster batch, matched in difficulty and length) or
            "pooled" (a stage-wide pool dealt back at random; 1 = stage-random batches).
        sort: the easy-to-hard order. False (ablation) removes it entirely: a seeded random key replaces
            difficulty in the stages, in the order inside clusters and batches and in the clusters'
            order, so neither batches nor stages go easy to hard; clusters and mixing stay.
        cluster: group batches by cluster. False (ablation) removes the clusters: each stage is cut
            directly in difficulty order (no cluster batches, so no mixing either); stages stay.
        order: "curriculum", or "random" for the vanilla GRPO baseline, which removes everything: one
            seeded permutation cut into batches, every batch in stage 0 (``n_stages``, ``sort``,
            ``cluster`` and mixing unused).
        random_state: seed of the permutations (``order="random"`` or ``sort=False``).
    """

    def __init__(
        self,
        batch_size: int = 128,
        n_stages: int = 4,
        mixing_ratio: float = 0.25,
        mixing: str = "pairs",
        sort: bool = True,
        cluster: bool = True,
        order: str = "curriculum",
        random_state: int = 0,
    ):
        self.batch_size = batch_size
        self.n_stages = n_stages
        self.mixing_ratio = mixing_ratio
        self.mixing = mixing
        self.sort = sort
        self.cluster = cluster
        self.order = order
        self.random_state = random_state

    def _validate_params(self) -> None:
        for name, low in (("batch_size", 1), ("n_stages", 1), ("random_state", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"mixing must be one of {tuple(MIXING_MODES)}, got {self.mixing!r}")
        top = MIXING_MODES[self.mixing]
        if isinstance(self.mixing_ratio, bool) or not isinstance(self.mixing_ratio, numbers.Real):
            raise ValueError(f"mixing_ratio must be a number in [0, {top}], got {self.mixing_ratio!r}")
        if not 0 <= self.mixing_ratio <= top:
            raise ValueError(
                f"mixing_ratio must be in [0, {top}] with mixing={self.mixing!r}, got {self.mixing_ratio!r}"
            )
        for name in ("sort", "cluster"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.order not in ("curriculum", "random"):
            raise ValueError(f"order must be 'curriculum' or 'random', got {self.order!r}")

    def plan(
        self,
        ids: Sequence[str],
        difficulty: Any,
        clusters: Any,
        lengths: Any,
        features: Any = None,
        *,
        meta: dict | None = None,
    ) -> Plan:
        """Plans the batches.

        Args:
            ids: ``[N]`` unique sample ids.
            difficulty: ``[N]`` float, higher is harder.
            clusters: ``[N]`` int cluster ids.
            lengths: ``[N]`` sample lengths (tokens or characters).
            features: optional ``[N, C]`` rows for the per-batch diversity statistic.
            meta: JSON-serialisable record of what made the inputs (seed, hashes, ...).

        Returns:
            The plan; ``Plan.config`` holds this planner's parameters.

        Raises:
            ValueError: bad parameters or inputs, or fewer samples than ``batch_size``.
        """
        self._validate_params()
        ids, difficulty_N, clusters_N, lengths_N, features_NxC = _inputs(ids, difficulty, clusters, lengths, features)
        n, rng = len(ids), np.random.default_rng(self.random_state)
        if n < self.batch_size:
            raise ValueError(f"the pool has {n} samples, fewer than batch_size={self.batch_size}: not one full batch")
        if self.order == "random":
            staged = _random_order(rng.permutation(n), self.batch_size)
        else:
            staged = self._curriculum(difficulty_N, clusters_N, lengths_N, rng)
        stats = [_batch_stats(b, s, r, difficulty_N, clusters_N, lengths_N, features_NxC) for s, b, r in staged]
        return Plan(
            batches=[[ids[i] for i in batch] for _, batch, _ in staged],
            stats=stats,
            config=_round(self.get_params()),
            meta=dict(meta or {}),
        )

    def _curriculum(self, difficulty_N, clusters_N, lengths_N, rng) -> list[tuple[int, np.ndarray, int]]:
        """``(stage, indices, n_repeated)`` per batch in training order (indices into the id-ordered rows)."""
        n = len(difficulty_N)
        key_N = difficulty_N if self.sort else rng.permutation(n).astype(np.float64)
        by_key = np.argsort(key_N, kind="stable")  # rows are in id order: ties go by id
        stage_N = np.empty(n, np.int64)
        stage_N[by_key] = np.arange(n) * self.n_stages // n
        rank_N = np.empty(n, np.int64)
        rank_N[by_key] = np.arange(n)
        n_swap = round(self.mixing_ratio * self.batch_size)
        x_Nx2 = np.stack([_zscore(difficulty_N), _zscore(lengths_N)], axis=1)
        staged, carry = [], np.empty(0, np.int64)
        for stage in np.unique(stage_N):
            idx = np.flatnonzero(stage_N == stage)
            batches, carry = _stage_batches(idx, carry, rank_N, key_N, clusters_N, self.batch_size, self.cluster)
            if not n_swap:
                batches = [batch for _, batch in batches]
            elif self.mixing == "pairs":
                batches = _mix(batches, n_swap, x_Nx2)
            else:
                batches = _pool_mix(batches, n_swap, rng)
            staged += [(int(stage), batch[np.argsort(rank_N[batch])], 0) for batch in batches]
        if len(carry):
            planned = np.setdiff1d(np.arange(n), carry)
            planned = planned[np.argsort(rank_N[planned])]
            last = np.concatenate([carry, _top_up(carry, planned, key_N, self.batch_size)])
            staged.append((int(stage_N.max()), last[np.argsort(rank_N[last])], self.batch_size - len(carry)))
        return staged


def _random_order(perm_N: np.ndarray, batch_size: int) -> list[tuple[int, np.ndarray, int]]:
    """The vanilla baseline: ``perm_N`` cut into batches, the last topped up from the permutation's start."""
    n_repeated = -len(perm_N) % batch_size
    batches = _cut(np.concatenate([perm_N, perm_N[:n_repeated]]), batch_size)
    return [(0, batch, n_repeated if i + 1 == len(batches) else 0) for i, batch in enumerate(batches)]
