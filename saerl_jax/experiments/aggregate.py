"""Aggregation of per-seed results: steps to a target accuracy, mean and spread over seeds, mean curves.

A curve is a list of ``[step, accuracy]`` pairs in step order (step 0 = the base model). A per-seed result
is the dict :func:`saerl_jax.experiments.runs.run_arm` returns (``curve``, ``final_accuracy``, ``avg_at_k``,
``pass_at_k``, ``step_s``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> int | None:
    """The first step whose accuracy is at least ``target``; None when the curve never gets there."""
    for step, accuracy in curve:
        if accuracy is not None and accuracy >= target:
            return int(step)
    return None


def spread(values: Sequence[float | None]) -> dict:
    """``n``, ``mean``, ``std`` (sample std, ddof=1; 0 for one value), ``min`` and ``max`` of the values
    that are not None; all but ``n`` are None when there are none."""
    kept = np.asarray([v for v in values if v is not None], np.float64)
    if not len(kept):
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(kept),
        "mean": float(kept.mean()),
        "std": float(kept.std(ddof=1)) if len(kept) > 1 else 0.0,
        "min": float(kept.min()),
        "max": float(kept.max()),
    }


def mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[dict]:
    """Per step that any curve has: ``{"step", **spread}`` over the curves holding that step."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, accuracy in curve:
            by_step.setdefault(int(step), []).append(accuracy)
    return [{"step": step, **spread(by_step[step])} for step in sorted(by_step)]


def aggregate_arm(results: Sequence[Mapping], target: float) -> dict:
    """One arm over its seeds.

    Returns:
      ``seeds``; ``final_accuracy``, ``avg_at_k``, ``step_s`` and each ``pass_at_k`` entry as
      :func:`spread`; ``steps_to_target`` with ``per_seed`` (None where not reached), ``reached`` (seeds
      that got there) and the spread over the seeds that did; ``curve`` (:func:`mean_curve`) and
      ``mean_curve_steps_to_target`` (the step the seed-mean curve first reaches the target).
    """
    if not results:
        raise ValueError("no results to aggregate")
    per_seed = [steps_to_target(r["curve"], target) for r in results]
    curve = mean_curve([r["curve"] for r in results])
    pass_keys = sorted({j for r in results for j in r.get("pass_at_k", {})}, key=int)
    return {
        "seeds": [r["seed"] for r in results],
        "final_accuracy": spread([r["final_accuracy"] for r in results]),
        "avg_at_k": spread([r.get("avg_at_k") for r in results]),
        "pass_at_k": {j: spread([r.get("pass_at_k", {}).get(j) for r in results]) for j in pass_keys},
        "step_s": spread([r.get("step_s") for r in results]),
        "steps_to_target": {
            "per_seed": per_seed,
            "reached": sum(s is not None for s in per_seed),
            **spread(per_seed),
        },
        "curve": curve,
        "mean_curve_steps_to_target": steps_to_target([(c["step"], c["mean"]) for c in curve], target),
    }


def aggregate(results: Mapping[str, Sequence[Mapping]], target: float) -> dict[str, dict]:
    """:func:`aggregate_arm` for every arm of ``{arm: [result per seed]}``, in the same order."""
    return {arm: aggregate_arm(rows, target) for arm, rows in results.items()}
