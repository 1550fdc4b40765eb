"""The experiment scripts: aggregation over seeds by hand, and each script end to end on tiny-math with a
tiny budget (2 GRPO steps, 8 held-out problems, feature stores on 200 pool problems), run twice to see the
second invocation skip what the first finished."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sp_stats

from saerl_jax.engineering.planner import CurriculumPlanner, Plan
from saerl_jax.experiments import aggregate, aggregate_arm, mean_curve, spread, steps_to_target
from saerl_jax.experiments.ablate import ABLATIONS, AblateConfig, variants
from saerl_jax.experiments.transfer import TransferConfig, tokenizer_of

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--feature-problems", "200", "--extract-batch-size", "16", "--n-clusters", "4",
    "--steps", "2", "--batch-size", "4", "--generations", "2", "--max-completion-length", "32",
    "--eval-steps", "1", "--eval-limit", "8", "--k", "2", "--reward-workers", "0", "--quiet",
]  # fmt: skip


# --- aggregation ----------------------------------------------------------------------------------------


def test_steps_to_target_is_the_first_step_at_or_above_the_target():
    curve = [[0, 0.40], [10, 0.41], [20, 0.45], [30, 0.43], [40, 0.47]]
    assert steps_to_target(curve, 0.42) == 20
    assert steps_to_target(curve, 0.45) == 20
    assert steps_to_target(curve, 0.46) == 40
    assert steps_to_target(curve, 0.40) == 0  # the base model already counts
    assert steps_to_target(curve, 0.50) is None
    assert steps_to_target([[0, 0.4], [10, None], [20, 0.5]], 0.45) == 20


def test_spread_is_mean_sample_std_min_max_of_the_known_values():
    s = spread([0.1, 0.3, 0.2])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"]) == (0.1, 0.3)
    assert spread([0.25]) == {"n": 1, "mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25}
    assert spread([None, 4, None, 6]) == {"n": 2, "mean": 5.0, "std": pytest.approx(2**0.5), "min": 4.0, "max": 6.0}
    assert spread([None, None]) == {"n": 0, "mean": None, "std": None, "min": None, "max": None}


def test_mean_curve_averages_each_step_over_the_curves_that_have_it():
    curves = [[[0, 0.4], [5, 0.5], [10, 0.6]], [[0, 0.4], [5, 0.3]]]
    rows = mean_curve(curves)
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert [r["n"] for r in rows] == [2, 2, 1]
    assert rows[1]["mean"] == pytest.approx(0.4) and rows[1]["min"] == 0.3 and rows[1]["max"] == 0.5
    assert rows[2]["mean"] == pytest.approx(0.6)


def _result(seed, curve, avg):
    return {
        "seed": seed,
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "avg_at_k": avg,
        "pass_at_k": {"1": avg, "2": avg + 0.1},
        "step_s": 1.0 + seed,
    }


def test_aggregate_over_seeds_with_a_seed_that_never_reaches_the_target():
    seeds = [
        _result(0, [[0, 0.40], [10, 0.44], [20, 0.48]], 0.30),
        _result(1, [[0, 0.40], [10, 0.41], [20, 0.41]], 0.20),
        _result(2, [[0, 0.40], [10, 0.40], [20, 0.43]], 0.40),
    ]
    agg = aggregate_arm(seeds, target=0.42)
    assert agg["seeds"] == [0, 1, 2]
    assert agg["steps_to_target"]["per_seed"] == [10, None, 20]
    assert agg["steps_to_target"]["reached"] == 2
    assert agg["steps_to_target"]["mean"] == 15 and agg["steps_to_target"]["min"] == 10
    assert agg["steps_to_target"]["max"] == 20
    assert agg["final_accuracy"]["mean"] == pytest.approx((0.48 + 0.41 + 0.43) / 3)
    assert agg["final_accuracy"]["std"] == pytest.approx(0.036055512754639855)
    assert (agg["final_accuracy"]["min"], agg["final_accuracy"]["max"]) == (0.41, 0.48)
    assert agg["avg_at_k"]["mean"] == pytest.approx(0.3) and agg["avg_at_k"]["std"] == pytest.approx(0.1)
    assert agg["pass_at_k"]["2"]["mean"] == pytest.approx(0.4)
    assert agg["step_s"]["mean"] == pytest.approx(2.0)
    assert [c["mean"] for c in agg["curve"]] == pytest.approx([0.40, 0.4166666, 0.44])
    assert agg["mean_curve_steps_to_target"] == 20  # the mean curve only gets there at step 20
    never = aggregate({"a": seeds}, target=0.9)["a"]["steps_to_target"]
    assert never["reached"] == 0 and never["per_seed"] == [None] * 3 and never["mean"] is None


def test_ablation_variants_reuse_arms_for_sweep_ratios_that_are_ablations():
    arms, points = variants(0.25, (0.0, 0.1, 0.25, 0.5))
    assert list(arms) == ["saerl", "no_sort", "no_mixing", "no_cluster", "mixing_0.1", "mixing_0.5"]
    assert arms["no_sort"] == {"mixing_ratio": 0.25, "sort": False}
    assert arms["no_cluster"] == {"mixing_ratio": 0.25, "cluster": False}
    assert points == {0.0: "no_mixing", 0.1: "mixing_0.1", 0.25: "saerl", 0.5: "mixing_0.5"}
    pooled, points = variants(0.25, (0.0, 0.25, 1.0), "pooled")
    assert all(options["mixing"] == "pooled" for options in pooled.values())
    assert points == {0.0: "no_mixing", 0.25: "saerl", 1.0: "mixing_1"}
    with pytest.raises(ValueError, match="with mixing='pairs' mixing ratios must be in"):
        AblateConfig(sweep=(0.0, 0.75))
    assert AblateConfig(sweep=(0.0, 0.75, 1.0), mixing="pooled").sweep[-1] == 1.0


def test_each_ablation_arm_removes_what_it_says():
    # The arms' engineer options are planner switches; measure each plan on 1,200 samples in 6 clusters of
    # unequal size whose difficulty does not depend on the cluster, 16 per batch, over 20 planner seeds.
    arms, _ = variants(0.25, (0.0, 0.25))
    assert set(ABLATIONS) == {"saerl", "no_sort", "no_mixing", "no_cluster"} <= set(arms)
    rng = np.random.default_rng(0)
    n, clusters = 1200, rng.choice(6, 1200, p=np.arange(1, 7) / 21)
    inputs = ([f"s{i:04d}" for i in range(n)], rng.normal(size=n), clusters, rng.integers(5, 300, n))
    random_distinct = sum(1 - sp_stats.hypergeom.pmf(0, n, c, 16) for c in np.bincount(clusters))

    def summaries(arm: str) -> list[dict]:
        planners = [CurriculumPlanner(batch_size=16, random_state=seed, **arms[arm]) for seed in range(20)]
        return [planner.plan(*inputs).summary() for planner in planners]

    def mean(arm: str, key: str) -> float:
        return float(np.mean([s[key] for s in summaries(arm)]))

    assert mean("saerl", "difficulty_monotonicity") > 0.9
    assert mean("saerl", "mean_distinct_clusters") < 0.6 * random_distinct
    assert abs(mean("no_sort", "difficulty_monotonicity")) < 0.1  # no easy-to-hard order left at all
    assert abs(mean("no_sort", "mean_distinct_clusters") - mean("saerl", "mean_distinct_clusters")) < 0.3
    assert mean("no_cluster", "mean_distinct_clusters") == pytest.approx(random_distinct, rel=0.05)
    assert mean("no_cluster", "difficulty_monotonicity") > 0.9
    assert mean("no_mixing", "mean_cluster_entropy") < 0.5 * mean("saerl", "mean_cluster_entropy")
    assert mean("no_mixing", "difficulty_monotonicity") > 0.9


# --- the scripts, end to end ----------------------------------------------------------------------------


def run_script(name: str, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"experiment_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _results(out: Path) -> dict:
    for name in ("results.json", "results.md"):
        assert (out / name).is_file()
    return json.loads((out / "results.json").read_text())


def _check_arms(summary: dict, arms: list[str], seeds: list[int]) -> None:
    assert list(summary["aggregate"]) == ["base", *arms]
    assert summary["seeds"] == seeds and summary["budget"]["steps"] == 2
    assert summary["target"] == pytest.approx(summary["base_accuracy"] + 0.02)
    for arm in arms:
        rows = summary["results"][arm]
        assert [r["seed"] for r in rows] == seeds
        for r in rows:
            assert [step for step, _ in r["curve"]] == [0, 1, 2]  # the base model, then every eval step
            assert r["curve"][0][1] == summary["base_accuracy"] and r["final_accuracy"] == r["curve"][-1][1]
            assert 0 <= r["avg_at_k"] <= 1 and set(r["pass_at_k"]) == {"1", "2"} and len(r["reward"]) == 2
            assert Path(r["run_dir"], "result.json").is_file() and Path(r["run_dir"], "hf", "config.json").is_file()
        agg = summary["aggregate"][arm]
        assert agg["seeds"] == seeds and agg["final_accuracy"]["n"] == len(seeds)
        assert set(agg["final_accuracy"]) == {"n", "mean", "std", "min", "max"}
        assert len(agg["steps_to_target"]["per_seed"]) == len(seeds)
        assert [c["step"] for c in agg["curve"]] == [0, 1, 2]


def _result_times(out: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in sorted((out / "runs").glob("*/seed-*/result.json"))}


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """The sampler comparison, built from scratch (stores, plans) for seeds 0 and 1."""
    out = tmp_path_factory.mktemp("compare")
    run_script("compare_samplers", ["--out", str(out), *TINY, "--seeds", "0", "1"])
    return out


@pytest.mark.slow
def test_compare_samplers_end_to_end(compare_run, capsys):
    summary = _results(compare_run)
    _check_arms(summary, ["vanilla", "vanilla_filtered", "difficulty", "saerl", "dense"], [0, 1])
    assert set(summary["plans"]) == {"vanilla_filtered", "saerl", "dense"}
    assert summary["plans"]["saerl"]["n_samples"] <= 200
    kept, shuffled = (
        Plan.load(compare_run / "plans" / arm / "plan.json").ids() for arm in ("saerl", "vanilla_filtered")
    )
    assert set(kept) == set(shuffled) and kept != shuffled  # the filtered pool: the plan's rows, reordered
    assert set(summary["paired"]) == {"vanilla_filtered", "difficulty", "saerl", "dense"}
    assert set(summary["paired_filtered"]) == {"saerl", "dense"}
    for path in ("stores/sae/manifest.json", "stores/dense/manifest.json", "plans/saerl/plan.json", "pool-200.jsonl"):
        assert (compare_run / path).is_file()
    assert (compare_run / "curves.png").read_bytes()[:8] == PNG
    report = (compare_run / "results.md").read_text()
    assert "| saerl | 2 |" in report and "![curves](curves.png)" in report
    assert "## Paired differences to vanilla" in report and (compare_run / "paired.png").read_bytes()[:8] == PNG

    finished = _result_times(compare_run)
    assert len(finished) == 10
    capsys.readouterr()
    run_script("compare_samplers", ["--out", str(compare_run), *TINY, "--seeds", "0", "1"])
    printed = capsys.readouterr().out
    assert printed.count("finished before, read back") == 10 and "training in" not in printed
    assert "built before with these options, reused" in printed
    assert f"wrote {compare_run / 'results.json'}" in printed
    assert _result_times(compare_run) == finished
    assert _results(compare_run)["aggregate"] == summary["aggregate"]


@pytest.mark.slow
def test_compare_samplers_refuses_a_run_directory_of_other_settings(compare_run):
    argv = ["--out", str(compare_run), *TINY, "--seeds", "0", "--arms", "vanilla", "--lr", "1e-3"]
    with pytest.raises(ValueError, match="learning_rate"):
        run_script("compare_samplers", argv)


@pytest.mark.slow
def test_ablate_end_to_end(compare_run, tmp_path, capsys):
    out = tmp_path / "ablate"
    argv = ["--out", str(out), *TINY, "--seeds", "0", "--store", str(compare_run / "stores" / "sae")]
    argv += ["--mixing", "pooled", "--sweep", "0", "0.25", "1"]
    run_script("ablate", argv)
    summary = _results(out)
    _check_arms(summary, ["saerl", "no_sort", "no_mixing", "no_cluster", "mixing_1"], [0])
    assert [p["mixing_ratio"] for p in summary["sweep"]] == [0.0, 0.25, 1.0]
    assert [p["arm"] for p in summary["sweep"]] == ["no_mixing", "saerl", "mixing_1"]
    assert all(options["mixing"] == "pooled" for options in summary["variants"].values())
    for point in summary["sweep"]:
        assert point["cluster_entropy"] == summary["plans"][point["arm"]]["mean_cluster_entropy"]
        assert point["final_accuracy"] == summary["aggregate"][point["arm"]]["final_accuracy"]
    entropy = [summary["plans"][arm]["mean_cluster_entropy"] for arm in ("no_mixing", "saerl", "mixing_1")]
    assert entropy == sorted(entropy) and entropy[0] < entropy[-1]
    assert set(summary["paired"]) == {"no_sort", "no_mixing", "no_cluster", "mixing_1"}
    assert "## Paired differences to the full plan" in (out / "results.md").read_text()
    for name in ("curves.png", "sweep.png", "paired.png"):
        assert (out / name).read_bytes()[:8] == PNG

    capsys.readouterr()
    run_script("ablate", argv)
    printed = capsys.readouterr().out
    assert printed.count("finished before, read back") == 5 and "training in" not in printed


@pytest.mark.slow
def test_transfer_end_to_end_with_a_model_b_trained_here(compare_run, tmp_path, capsys):
    out = tmp_path / "transfer"
    argv = ["--out", str(out), *TINY, "--seeds", "0", "--store", str(compare_run / "stores" / "sae")]
    argv += ["--sft-steps", "3", "--sft-problems", "128", "--b-hidden-size", "32", "--b-intermediate-size", "64"]
    run_script("transfer", argv)
    summary = _results(out)
    _check_arms(summary, ["vanilla", "saerl_plan_from_a"], [0])
    assert summary["model_b"]["path"] == str(out / "model-b") and summary["model_b"]["hidden_size"] == 32
    assert (
        summary["model_a"]["hidden_size"] == 128 and summary["model_b"]["parameters"] < summary["model_a"]["parameters"]
    )
    assert summary["model"] == str(out / "model-b")
    assert (out / "curves.png").read_bytes()[:8] == PNG

    assert summary["direction"] == "down" and summary["model_b"]["vocab_sha256"] == summary["model_a"]["vocab_sha256"]
    assert summary["paired"]["saerl_plan_from_a"]["final_correct"]["n_seeds"] == 1

    capsys.readouterr()
    run_script("transfer", argv)
    printed = capsys.readouterr().out
    assert "small model: trained before with these settings" in printed
    assert printed.count("finished before, read back") == 2 and "training in" not in printed


@pytest.mark.slow
def test_transfer_up_from_a_small_model_of_another_family(tmp_path, capsys):
    """The paper's way round: a small model with a tokenizer of its own and an SAE trained here plans for
    the shipped (larger) model; a rerun trains nothing again."""
    out = tmp_path / "up"
    argv = ["--out", str(out), *TINY, "--seeds", "0", "--direction", "up", "--small-vocab-size", "300"]
    argv += [
        "--sft-steps",
        "3",
        "--sft-problems",
        "128",
        "--small-hidden-size",
        "32",
        "--small-intermediate-size",
        "64",
    ]
    argv += [
        "--small-sae-steps",
        "4",
        "--small-sae-batch-size",
        "256",
        "--small-sae-latents",
        "64",
        "--small-sae-k",
        "4",
    ]
    run_script("transfer", argv)
    summary = _results(out)
    _check_arms(summary, ["vanilla", "saerl_plan_from_a", "saerl_own_plan"], [0])
    assert set(summary["plans"]) == {"saerl_plan_from_a", "saerl_own_plan"}
    assert all((out / "stores" / store / "manifest.json").is_file() for store in ("sae-a", "sae"))
    a, b = summary["model_a"], summary["model_b"]
    assert a["path"] == str(out / "model-a") and a["hidden_size"] == 32 and a["vocab_size"] == 300
    assert b["hidden_size"] == 128 and b["vocab_size"] == 512 and a["vocab_sha256"] != b["vocab_sha256"]
    assert b["parameters"] > a["parameters"] and summary["model"] == b["path"]
    sae_cfg = json.loads((out / "model-a-sae" / "cfg.json").read_text())
    assert sae_cfg["d_in"] == 32 and sae_cfg["d_sae"] == 64
    assert "different tokenizers" in (out / "results.md").read_text()

    capsys.readouterr()
    run_script("transfer", argv)
    printed = capsys.readouterr().out
    assert "small model: trained before" in printed and "small model's SAE: trained before" in printed
    assert printed.count("finished before, read back") == 3 and "training in" not in printed


def test_transfer_config_refuses_a_bad_direction_and_a_given_store_when_going_up(tmp_path):
    with pytest.raises(ValueError, match="direction"):
        TransferConfig(direction="sideways")
    with pytest.raises(ValueError, match="store"):
        TransferConfig(direction="up", store=tmp_path)
    (tmp_path / "model").mkdir()
    assert tokenizer_of(tmp_path / "model", tmp_path / "shared") == tmp_path / "shared"
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    assert tokenizer_of(tmp_path / "model", tmp_path / "shared") == tmp_path / "model"


@pytest.mark.slow
def test_probes_end_to_end(compare_run, tmp_path, capsys):
    out = tmp_path / "probes"
    stores = compare_run / "stores"
    argv = ["--out", str(out), "--feature-problems", "200", "--store", str(stores / "sae")]
    argv += ["--dense-store", str(stores / "dense")]
    run_script("probes", argv)
    summary = _results(out)
    assert set(summary["probes"]) == {"sae", "dense", "metadata"}
    for name in ("sae", "dense", "metadata"):
        assert set(summary["probes"][name]) == {"topic", "difficulty", "noise"}
        assert set(summary["probes"][name]["noise"]["roc_auc"]) == {"mean", "ci_low", "ci_high"}
    assert summary["rows"] == 200 and 0 < summary["majority_baseline"] < 1
    assert summary["probes"]["sae"]["topic"]["accuracy"]["mean"] > summary["majority_baseline"]
    report = (out / "results.md").read_text()
    assert "| sae |" in report and "| dense |" in report and "| metadata |" in report and "n/a" in report
    assert (out / "probes.png").read_bytes()[:8] == PNG

    capsys.readouterr()
    run_script("probes", argv)
    assert "computed before on these stores, read back" in capsys.readouterr().out
    assert _results(out)["probes"] == summary["probes"]
