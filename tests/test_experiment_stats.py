"""Paired comparisons of arms: the two-level bootstrap (seeds and held-out problems) on planted differences,
seed pairing and its errors, the seed-only fallback, steps to target as censored observations, and the
paired table and forest plot."""

from __future__ import annotations

import numpy as np
import pytest

from saerl_jax.experiments.aggregate import (
    aggregate_arm,
    censored_steps,
    paired_difference,
    paired_steps,
    paired_summary,
    steps_summary,
)
from saerl_jax.experiments.report import arms_table, paired_table, plot_paired

PNG = b"\x89PNG\r\n\x1a\n"


def _result(arm, seed, final_correct, avg_correct=None, curve=None):
    final_correct = [float(v) for v in final_correct]
    avg_correct = final_correct if avg_correct is None else [float(v) for v in avg_correct]
    return {
        "arm": arm,
        "seed": seed,
        "curve": curve or [[0, 0.4], [10, float(np.mean(final_correct))]],
        "final_accuracy": float(np.mean(final_correct)),
        "final_correct": final_correct,
        "avg_at_k": float(np.mean(avg_correct)),
        "avg_correct": avg_correct,
    }


def _planted(n_seeds, n_problems, shift, rng):
    """Reference and arm per seed: each problem's solve rate drawn once, then independent 0/1 draws per seed,
    the arm's rate raised by ``shift`` (the true difference in accuracy when no rate passes 1)."""
    rate_P = rng.uniform(0.1, 0.8, n_problems)
    ref = [_result("ref", s, rng.random(n_problems) < rate_P) for s in range(n_seeds)]
    arm = [_result("arm", s, rng.random(n_problems) < rate_P + shift) for s in range(n_seeds)]
    return arm, ref


def _strip(results):
    return [{k: v for k, v in r.items() if k not in ("final_correct", "avg_correct")} for r in results]


# --- paired differences ----------------------------------------------------------------------------------


def test_a_planted_flip_of_five_percent_of_problems_is_found_and_excluded_from_zero():
    rng = np.random.default_rng(0)
    ref, arm = [], []
    for seed in range(5):
        correct = rng.random(400) < 0.4
        flipped = correct.copy()
        flipped[rng.choice(np.flatnonzero(~correct), 20, replace=False)] = True  # 20 / 400 = 5 points
        ref.append(_result("ref", seed, correct))
        arm.append(_result("arm", seed, flipped))
    d = paired_difference(arm, ref)
    assert d["level"] == "seeds+problems" and d["n_seeds"] == 5 and d["seeds"] == [0, 1, 2, 3, 4]
    assert d["mean"] == pytest.approx(0.05) and d["per_seed"] == pytest.approx([0.05] * 5)
    assert 0 < d["ci_low"] < 0.05 < d["ci_high"] < 0.1
    assert d["p_two_sided"] < 0.01


def test_a_noisy_planted_difference_lies_in_the_interval_and_a_null_one_does_not_exclude_zero():
    arm, ref = _planted(5, 500, 0.08, np.random.default_rng(1))
    d = paired_difference(arm, ref)
    assert d["ci_low"] <= 0.08 <= d["ci_high"] and d["ci_low"] > 0
    arm, ref = _planted(5, 500, 0.0, np.random.default_rng(2))
    d = paired_difference(arm, ref)
    assert d["ci_low"] <= 0 <= d["ci_high"] and d["p_two_sided"] > 0.05


def test_identical_arms_give_zero_an_interval_holding_zero_and_p_one():
    _, ref = _planted(3, 200, 0.0, np.random.default_rng(3))
    arm = [{**r, "arm": "copy"} for r in ref]
    for key in ("final_correct", "avg_correct"):
        d = paired_difference(arm, ref, key)
        assert d["mean"] == 0 and d["ci_low"] <= 0 <= d["ci_high"] and d["p_two_sided"] == 1.0


def test_the_interval_shrinks_with_more_problems_and_with_more_seeds():
    def width(n_seeds, n_problems, seed):
        d = paired_difference(*_planted(n_seeds, n_problems, 0.05, np.random.default_rng(seed)))
        return d["ci_high"] - d["ci_low"]

    assert width(3, 1600, 4) < 0.6 * width(3, 100, 4)  # about 1/4 by sqrt(problems)
    # seeds with their own shifts: more seeds narrow the interval over the seed-to-seed spread
    rng = np.random.default_rng(5)
    shifts = rng.normal(0.05, 0.03, 12)
    ref = [{"arm": "ref", "seed": s, "final_accuracy": 0.5} for s in range(12)]
    arm = [{"arm": "arm", "seed": s, "final_accuracy": 0.5 + shifts[s]} for s in range(12)]
    few, many = paired_difference(arm[:3], ref[:3]), paired_difference(arm, ref)
    assert many["ci_high"] - many["ci_low"] < few["ci_high"] - few["ci_low"]


def test_mde_is_2_8_standard_errors_and_the_seed_only_se_is_the_standard_error_of_the_mean():
    rng = np.random.default_rng(6)
    diffs = rng.normal(0.02, 0.04, 8)
    ref = [{"arm": "ref", "seed": s, "final_accuracy": 0.4, "avg_at_k": 0.3} for s in range(8)]
    arm = [{"arm": "arm", "seed": s, "final_accuracy": 0.4 + diffs[s], "avg_at_k": 0.3} for s in range(8)]
    d = paired_difference(arm, ref, n_boot=8000)
    assert d["level"] == "seeds" and d["mean"] == pytest.approx(diffs.mean())
    assert d["se"] == pytest.approx(diffs.std() / np.sqrt(8), rel=0.05)
    assert d["mde"] == pytest.approx(2.8016 * d["se"], rel=1e-3)
    assert paired_difference(arm, ref, "avg_correct")["level"] == "seeds"  # no avg_correct: avg_at_k


def test_seeds_are_paired_by_number_and_unpaired_seeds_left_out():
    ref = [_result("ref", s, [0, 0, 0, 0]) for s in (1, 2, 3, 5)]
    arm = [_result("arm", s, [1] * n + [0] * (4 - n)) for s, n in ((5, 3), (0, 4), (2, 1), (1, 2))]
    d = paired_difference(arm, ref)
    assert d["seeds"] == [1, 2, 5] and d["per_seed"] == pytest.approx([0.5, 0.25, 0.75])
    assert d["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="arm: no seed in common"):
        paired_difference(arm, [_result("ref", 9, [0, 0, 0, 0])])


def test_vectors_of_different_lengths_and_unknown_keys_raise():
    ref = [_result("ref", 0, [0, 1, 0])]
    with pytest.raises(ValueError, match="long_arm: final_correct vectors differ in length"):
        paired_difference([_result("long_arm", 0, [0, 1, 0, 1])], ref)
    with pytest.raises(ValueError, match="key must be one of"):
        paired_difference(ref, ref, "pass_at_k")


def test_without_vectors_only_seeds_are_resampled_and_one_seed_has_no_interval():
    arm, ref = _planted(4, 50, 0.1, np.random.default_rng(7))
    full, seeds_only = paired_difference(arm, ref), paired_difference(_strip(arm), ref)
    assert seeds_only["level"] == "seeds" and seeds_only["mean"] == pytest.approx(full["mean"])
    assert seeds_only["ci_low"] is not None and seeds_only["se"] < full["se"]  # problem noise left out
    one = paired_difference(_strip(arm)[:1], ref)
    assert one["mean"] == pytest.approx(full["per_seed"][0]) and one["n_seeds"] == 1
    assert one["ci_low"] is one["ci_high"] is one["se"] is one["mde"] is one["p_two_sided"] is None
    assert paired_difference(arm[:1], ref)["ci_low"] is not None  # one seed, but problems to resample


def test_the_bootstrap_is_deterministic_under_its_seed():
    arm, ref = _planted(3, 100, 0.05, np.random.default_rng(8))
    assert paired_difference(arm, ref, seed=3) == paired_difference(arm, ref, seed=3)
    assert paired_difference(arm, ref, seed=3)["ci_low"] != paired_difference(arm, ref, seed=4)["ci_low"]


# --- steps to target -------------------------------------------------------------------------------------


def _curve_result(arm, seed, curve):
    return {"arm": arm, "seed": seed, "curve": curve}


def test_a_run_that_never_reaches_is_censored_at_its_last_step():
    assert censored_steps([[0, 0.4], [20, 0.5]], 0.45, 20) == {"step": 20, "censored": False, "bound": 20}
    assert censored_steps([[0, 0.4], [20, 0.42]], 0.45, 20) == {"step": None, "censored": True, "bound": 20}


def test_steps_summary_takes_censored_seeds_as_infinite_and_leaves_them_out_of_the_mean():
    never = [[0, 0.4], [50, 0.41], [100, 0.42]]
    rows = [
        _curve_result("a", 0, [[0, 0.4], [20, 0.5], [100, 0.5]]),
        _curve_result("a", 1, [[0, 0.4], [40, 0.5], [100, 0.5]]),
        _curve_result("a", 2, never),
        _curve_result("a", 3, [[0, 0.4], [60, 0.5], [100, 0.5]]),
        _curve_result("a", 4, [[0, 0.4], [40, 0.5], [100, 0.5]]),
    ]
    s = steps_summary(rows, 0.45)
    assert s["per_seed"] == [20, 40, None, 60, 40] and s["bounds"] == [100] * 5
    assert (s["reached"], s["n"], s["median"], s["median_censored"]) == (4, 5, 40, False)
    assert s["mean_reached"] == 40  # (20 + 40 + 60 + 40) / 4, the censored seed left out
    s = steps_summary([rows[0], _curve_result("a", 1, never), _curve_result("a", 2, never)], 0.45)
    assert s["median"] is None and s["median_censored"] and s["mean_reached"] == 20
    s = steps_summary(rows[:2] + [_curve_result("a", 2, never)] * 2, 0.45)  # 2 of 4: not more than half
    assert s["median"] is None and s["median_censored"]


def test_paired_steps_outcomes_seed_by_seed():
    never = [[0, 0.4], [100, 0.4]]
    at = {step: [[0, 0.4], [step, 0.5], [100, 0.5]] for step in (20, 40)}
    arm = [at[20], at[40], at[20], never, at[20], never]
    ref = [at[40], at[20], at[20], at[20], never, never]
    d = paired_steps(
        [_curve_result("a", s, c) for s, c in enumerate(arm)] + [_curve_result("a", 9, at[20])],
        [_curve_result("ref", s, c) for s, c in enumerate(ref)],
        0.45,
    )
    assert [r["outcome"] for r in d["per_seed"]] == [
        "earlier",
        "later",
        "same",
        "only reference reached",
        "only arm reached",
        "both censored",
    ]
    assert d["per_seed"][0] == {"seed": 0, "arm_step": 20, "ref_step": 40, "outcome": "earlier"}
    assert d["n"] == 6
    assert d["counts"] == {
        "earlier": 2,
        "later": 2,
        "same": 1,
        "both censored": 1,
        "only arm reached": 1,
        "only reference reached": 1,
    }


def test_paired_summary_covers_every_arm_but_base_and_the_reference():
    arm, ref = _planted(3, 60, 0.1, np.random.default_rng(9))
    results = {"base": ref[:1], "ref": ref, "arm": arm, "late": [{**arm[0], "seed": 7}], "empty": []}
    summary = paired_summary(results, "ref", 0.45, n_boot=500)
    assert list(summary) == ["arm", "late", "empty"]
    assert summary["late"] == summary["empty"] == {"missing": "no seed in common with ref"}
    assert set(summary["arm"]) == {"final_correct", "avg_correct", "steps"}
    assert summary["arm"]["final_correct"]["n_seeds"] == 3 and summary["arm"]["steps"]["n"] == 3
    assert paired_summary({"arm": arm}, "ref", 0.45) == {"arm": {"missing": "no seed in common with ref"}}


# --- the table and plot ----------------------------------------------------------------------------------


def _diff(mean, low, high, level="seeds+problems"):
    mde = None if low is None else 0.015
    return {"n_seeds": 5, "level": level, "mean": mean, "ci_low": low, "ci_high": high, "mde": mde}


def _paired():
    counts = {"earlier": 3, "later": 1, "same": 0, "both censored": 1}
    return {
        "better": {
            "final_correct": _diff(0.012, 0.004, 0.029),
            "avg_correct": _diff(0.012, -0.004, 0.029),
            "steps": {"counts": counts},
        },
        "worse": {
            "final_correct": _diff(-0.03, -0.05, -0.01, "seeds"),
            "avg_correct": _diff(-0.01, None, None, "seeds"),
            "steps": {"counts": counts},
        },
        "late": {"missing": "no seed in common with ref"},
    }


def test_paired_table_shows_signed_points_intervals_stars_and_a_note():
    table = paired_table(_paired(), "ref", 8)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "Δ Avg@8 (pts) [95% CI]" in rows["arm"] and "vs ref" in rows["arm"]
    assert "| +1.2 [+0.4, +2.9]* | +1.2 [-0.4, +2.9] |" in rows["better"]
    assert "| 1.5 / 1.5 | 3 / 1 / 0 / 1 |" in rows["better"]
    assert "5 (seeds only)" in rows["worse"] and "-3.0 [-5.0, -1.0]*" in rows["worse"]
    assert "-1.0 (no interval)" in rows["worse"] and "/ n/a |" in rows["worse"]
    assert "no seed in common with ref" in rows["late"]
    assert "`*`" in table and "80% power" in table.splitlines()[-1]


def test_arms_table_shows_censored_seeds_as_beyond_their_last_step():
    never = [[0, 0.40], [50, 0.41], [100, 0.42]]
    rows = [_result("a", s, [1, 0], curve=c) for s, c in enumerate([[[0, 0.4], [20, 0.5], [100, 0.5]], never])]
    rows += [_result("a", 2, [1, 0], curve=[[0, 0.4], [60, 0.5], [100, 0.5]])]
    summary = {
        "budget": {"k": 4},
        "aggregate": {
            "base": aggregate_arm(rows[:1], 0.45),
            "a": aggregate_arm(rows, 0.45),
            "b": aggregate_arm(rows[1:2], 0.45),
        },
    }
    table = arms_table(summary)
    assert "median 60 (2/3 reached: 20, >100, 60)" in table
    assert "median not reached (0/1 reached: >100)" in table


def test_plot_paired_writes_a_png(tmp_path):
    path = tmp_path / "paired.png"
    plot_paired(path, _paired(), "ref", "paired difference to ref")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000


def test_the_weights_trick_matches_resampling_seed_and_problem_indices():
    arm, ref = _planted(4, 300, 0.05, np.random.default_rng(10))
    d_SxP = np.asarray([np.subtract(a["final_correct"], r["final_correct"]) for a, r in zip(arm, ref, strict=True)])
    rng = np.random.default_rng(11)  # the dense formulation: resampled seed rows at resampled problem columns
    boot = [d_SxP[rng.integers(0, 4, 4)][:, rng.integers(0, 300, 300)].mean() for _ in range(4000)]
    d = paired_difference(arm, ref)
    assert d["se"] == pytest.approx(np.std(boot, ddof=1), rel=0.06)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=0.004)
