"""Aggregation of per-seed results: steps to a target accuracy, mean and spread over seeds, mean curves, and
paired comparisons of two arms by seed (bootstrap intervals over seeds and held-out problems, the smallest
detectable difference, steps to target as censored observations).

A curve is a list of ``[step, accuracy]`` pairs in step order (step 0 = the base model). A per-seed result
is the dict :func:`saerl_jax.experiments.runs.run_arm` returns (``curve``, ``final_accuracy``, ``avg_at_k``,
``pass_at_k``, ``step_s``, and where present the per-problem vectors ``final_correct`` (0/1 greedy
correctness of the final policy) and ``avg_correct`` (mean correctness over the k samples), in held-out
problem order, the same problems for every arm and seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import NormalDist

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
      that got there) and the spread over the seeds that did (kept for older readers: it leaves out the seeds
      that never got there); ``steps`` (:func:`steps_summary`, censored seeds included); ``curve``
      (:func:`mean_curve`) and ``mean_curve_steps_to_target`` (the step the seed-mean curve first reaches
      the target).
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
        "steps": steps_summary(results, target),
        "curve": curve,
        "mean_curve_steps_to_target": steps_to_target([(c["step"], c["mean"]) for c in curve], target),
    }


def aggregate(results: Mapping[str, Sequence[Mapping]], target: float) -> dict[str, dict]:
    """:func:`aggregate_arm` for every arm of ``{arm: [result per seed]}``, in the same order."""
    return {arm: aggregate_arm(rows, target) for arm, rows in results.items()}


# --- censored steps to target ----------------------------------------------------------------------------


def censored_steps(curve: Sequence[Sequence[float]], target: float, last_step: int) -> dict:
    """Steps to ``target`` as a censored observation: ``step`` (:func:`steps_to_target`, None when never
    reached), ``censored`` (never reached: the steps are only known to exceed ``bound``) and ``bound``
    (``last_step``, the last evaluated step). A censored run is not a number to average."""
    step = steps_to_target(curve, target)
    return {"step": step, "censored": step is None, "bound": int(last_step)}


def steps_summary(results: Sequence[Mapping], target: float) -> dict:
    """Steps to ``target`` over seeds, each seed censored at its curve's last step when it never got there.

    Returns:
      ``per_seed`` (step or None), ``bounds`` (each seed's last evaluated step), ``reached``, ``n``;
      ``median`` over all seeds with censored ones as +infinity (a number only when more than half reached,
      else None with ``median_censored`` True); ``mean_reached`` (the mean over the seeds that reached, for
      information only: it leaves the censored seeds out).
    """
    if not results:
        raise ValueError("no results to summarise")
    obs = [censored_steps(r["curve"], target, r["curve"][-1][0]) for r in results]
    per_seed = [o["step"] for o in obs]
    reached = [s for s in per_seed if s is not None]
    median = float(np.median([np.inf if s is None else s for s in per_seed]))
    return {
        "per_seed": per_seed,
        "bounds": [o["bound"] for o in obs],
        "reached": len(reached),
        "n": len(obs),
        "median": median if np.isfinite(median) else None,
        "median_censored": not np.isfinite(median),
        "mean_reached": float(np.mean(reached)) if reached else None,
    }


STEP_OUTCOMES = ("earlier", "later", "same", "both censored", "only arm reached", "only reference reached")


def _step_outcome(arm_step: int | None, ref_step: int | None) -> str:
    if arm_step is None and ref_step is None:
        return "both censored"
    if ref_step is None:
        return "only arm reached"
    if arm_step is None:
        return "only reference reached"
    return "earlier" if arm_step < ref_step else "later" if arm_step > ref_step else "same"


def _by_seed(results: Sequence[Mapping], name: str) -> dict[int, Mapping]:
    by_seed = {int(r["seed"]): r for r in results}
    if len(by_seed) != len(results):
        raise ValueError(f"{name}: a seed appears more than once")
    return by_seed


def _arm_name(results: Sequence[Mapping], default: str) -> str:
    return str(results[0].get("arm", default)) if results else default


def paired_steps(arm_results: Sequence[Mapping], reference_results: Sequence[Mapping], target: float) -> dict:
    """Steps to ``target`` of an arm against a reference, seed by seed (the seeds both have, sorted).

    Returns:
      ``per_seed``: ``{"seed", "arm_step", "ref_step", "outcome"}`` with the outcome one of
      :data:`STEP_OUTCOMES`; ``counts`` of each outcome, where ``earlier`` includes ``only arm reached``
      and ``later`` includes ``only reference reached`` (so earlier + later + same + both censored is the
      number of paired seeds); ``n``.
    """
    arm, ref = _by_seed(arm_results, "arm"), _by_seed(reference_results, "reference")
    per_seed = []
    for seed in sorted(arm.keys() & ref.keys()):
        arm_step, ref_step = steps_to_target(arm[seed]["curve"], target), steps_to_target(ref[seed]["curve"], target)
        per_seed.append({"seed": seed, "arm_step": arm_step, "ref_step": ref_step})
        per_seed[-1]["outcome"] = _step_outcome(arm_step, ref_step)
    counts = {o: sum(row["outcome"] == o for row in per_seed) for o in STEP_OUTCOMES}
    counts["earlier"] += counts["only arm reached"]
    counts["later"] += counts["only reference reached"]
    return {"per_seed": per_seed, "counts": counts, "n": len(per_seed)}


# --- paired differences with a two-level bootstrap -------------------------------------------------------

SCALAR_KEYS = {"final_correct": "final_accuracy", "avg_correct": "avg_at_k"}


def _bootstrap(d_SxP: np.ndarray, n_boot: int, rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """``n_boot`` means of ``d_SxP`` with seeds (rows) and problems (columns) resampled with replacement, the
    same problems for every seed: with resample counts ``v`` (seeds) and ``w`` (problems) a replicate is
    ``v @ d @ w / (S * P)``, computed ``chunk`` replicates at a time."""
    n_seeds, n_problems = d_SxP.shape
    out_B = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        v_BxS = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b)
        w_BxP = rng.multinomial(n_problems, np.full(n_problems, 1 / n_problems), size=b)
        out_B[start : start + b] = np.einsum("bp,bp->b", v_BxS @ d_SxP, w_BxP) / (n_seeds * n_problems)
    return out_B


def paired_difference(
    arm_results: Sequence[Mapping],
    reference_results: Sequence[Mapping],
    key: str = "final_correct",
    *,
    n_boot: int = 4000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Mean difference arm − reference over the seeds both have, with a paired bootstrap interval.

    With the per-problem vectors ``key`` (``final_correct`` or ``avg_correct``, the same held-out problems
    in the same order everywhere) in every paired result, the statistic is the mean over seeds of (arm's mean
    over problems − reference's), and each bootstrap replicate resamples seeds and problems with replacement
    (``level`` "seeds+problems"). Without them it falls back to the per-seed scalars (``final_accuracy`` or
    ``avg_at_k``) and resamples seeds only (``level`` "seeds").

    Returns:
      ``n_seeds``, ``seeds``, ``level``, ``mean``, ``per_seed`` (per-seed differences); ``ci_low``,
      ``ci_high`` (percentile interval at ``1 - alpha``), ``se`` (bootstrap std), ``mde`` (the smallest true
      difference detected with 80% power at two-sided ``alpha``: ``(z_{1-alpha/2} + z_{0.8}) * se``) and
      ``p_two_sided`` (``2 * min(share <= 0, share >= 0)``, at most 1); these five are None when there is
      nothing to resample (one paired seed and no per-problem vectors).

    Raises:
      ValueError: naming the arm, when no seed is paired, the vectors differ in length or a value is missing.
    """
    if key not in SCALAR_KEYS:
        raise ValueError(f"key must be one of {sorted(SCALAR_KEYS)}, got {key!r}")
    name = _arm_name(arm_results, "arm")
    arm, ref = _by_seed(arm_results, name), _by_seed(reference_results, f"reference of {name}")
    seeds = sorted(arm.keys() & ref.keys())
    if not seeds:
        raise ValueError(f"{name}: no seed in common with the reference")
    pairs = [(arm[s], ref[s]) for s in seeds]
    if all(r.get(key) is not None for pair in pairs for r in pair):
        lengths = {len(r[key]) for pair in pairs for r in pair}
        if len(lengths) != 1:
            raise ValueError(f"{name}: {key} vectors differ in length ({sorted(lengths)})")
        d_SxP = np.asarray([np.asarray(a[key], np.float64) - np.asarray(r[key], np.float64) for a, r in pairs])
        level = "seeds+problems"
    else:
        scalar = SCALAR_KEYS[key]
        missing = [s for s, pair in zip(seeds, pairs, strict=True) if any(r.get(scalar) is None for r in pair)]
        if missing:
            raise ValueError(f"{name}: no {key} and no {scalar} for seeds {missing}")
        d_SxP = np.asarray([[a[scalar] - r[scalar]] for a, r in pairs], np.float64)
        level = "seeds"
    per_seed = d_SxP.mean(axis=1)
    result = {"n_seeds": len(seeds), "seeds": seeds, "level": level, "mean": float(per_seed.mean())}
    result["per_seed"] = [float(d) for d in per_seed]
    if level == "seeds" and len(seeds) < 2:
        return {**result, "ci_low": None, "ci_high": None, "se": None, "mde": None, "p_two_sided": None}
    boot_B = _bootstrap(d_SxP, n_boot, np.random.default_rng(seed))
    low, high = np.quantile(boot_B, [alpha / 2, 1 - alpha / 2])
    se = float(boot_B.std(ddof=1))
    z = NormalDist().inv_cdf
    return {
        **result,
        "ci_low": float(low),
        "ci_high": float(high),
        "se": se,
        "mde": (z(1 - alpha / 2) + z(0.8)) * se,
        "p_two_sided": float(min(1.0, 2 * min(np.mean(boot_B <= 0), np.mean(boot_B >= 0)))),
    }


def paired_summary(results: Mapping[str, Sequence[Mapping]], reference: str, target: float, **boot) -> dict[str, dict]:
    """For every arm of ``{arm: [result per seed]}`` but ``reference`` and ``base``: ``final_correct`` and
    ``avg_correct`` (:func:`paired_difference` with ``boot`` passed on) and ``steps`` (:func:`paired_steps`);
    ``{"missing": ...}`` for an arm with no seed in common with the reference."""
    ref = results.get(reference, [])
    ref_seeds = {r["seed"] for r in ref}
    summary = {}
    for arm, rows in results.items():
        if arm in (reference, "base"):
            continue
        if not ref_seeds & {r["seed"] for r in rows}:
            summary[arm] = {"missing": f"no seed in common with {reference}"}
            continue
        summary[arm] = {
            "final_correct": paired_difference(rows, ref, "final_correct", **boot),
            "avg_correct": paired_difference(rows, ref, "avg_correct", **boot),
            "steps": paired_steps(rows, ref, target),
        }
    return summary
