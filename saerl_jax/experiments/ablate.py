"""Ablations of the SAERL plan on the same GRPO budget over seeds (``scripts/ablate.py``): no difficulty sort,
no mixing, no clustering (each removes one thing, :data:`ABLATIONS` says what), and a mixing-ratio sweep that
sets the plan's diversity against held-out accuracy."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from saerl_jax.engineering.planner import MIXING_MODES, Plan
from saerl_jax.experiments.aggregate import paired_summary
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.inputs import training_pool
from saerl_jax.experiments.report import (
    SEED_NOTE,
    arms_table,
    budget_line,
    paired_table,
    plans_table,
    plot_curves,
    plot_paired,
    spread_cell,
    write_results,
)
from saerl_jax.experiments.runs import Arm, run_arms

REFERENCE = "saerl"
"""The arm every other is paired against: the full plan."""
SWEEP = (0.0, 0.1, 0.25, 0.5)
"""Default mixing ratios of the sweep (``mixing="pairs"``, which tops out at 0.5)."""
POOLED_SWEEP = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
"""Default mixing ratios of the sweep with ``mixing="pooled"``: up to stage-random batches."""

ABLATIONS = {
    "saerl": "the full plan: difficulty stages easy to hard, cluster-first batches, mixing",
    "no_sort": "removes the easy-to-hard order entirely (stages and order by a seeded random key, not "
    "difficulty); clusters and mixing stay",
    "no_mixing": "removes mixing (ratio 0): every cluster batch holds one cluster; stages and order stay",
    "no_cluster": "removes the clusters: each difficulty stage is cut directly in difficulty order, so "
    "batches mix clusters as random batches do (and there is nothing to swap); stages and order stay",
}
"""What each arm of :func:`variants` removes from the full plan (the planner switches it sets are in
:class:`~saerl_jax.engineering.planner.CurriculumPlanner`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblateConfig(StudyConfig):
    """Options of the ablation study."""

    out: Path = Path("runs/ablate")
    mixing_ratio: float = 0.25
    """Mixing ratio of the full SAERL plan (and of the sort and cluster ablations)."""
    sweep: tuple[float, ...] = SWEEP
    """Mixing ratios of the sweep (plans otherwise as the full SAERL plan)."""
    mixing: str = "pairs"
    """Mixing mode of every plan (see :class:`~saerl_jax.engineering.planner.CurriculumPlanner`): ``pairs``
    takes ratios up to 0.5, ``pooled`` up to 1 (stage-random batches)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"mixing must be one of {tuple(MIXING_MODES)}, got {self.mixing!r}")
        top = MIXING_MODES[self.mixing]
        if not 0 < self.mixing_ratio <= top or not all(0 <= m <= top for m in self.sweep):
            raise ValueError(
                f"with mixing={self.mixing!r} mixing ratios must be in [0, {top}] (the plan's in (0, {top}]), "
                f"got {self.mixing_ratio} and sweep {self.sweep}"
            )


def variants(
    mixing_ratio: float, sweep: tuple[float, ...], mixing: str = "pairs"
) -> tuple[dict[str, dict], dict[float, str]]:
    """``({arm: engineer options}, {sweep ratio: arm})``: the plan and its ablations (see :data:`ABLATIONS`:
    ``no_sort`` sets ``sort=False``, ``no_mixing`` ``mixing_ratio=0``, ``no_cluster`` ``cluster=False``), plus
    one arm per sweep ratio that no ablation already is (``mixing_0.1``, ...: the full plan at that ratio).
    Every arm gets ``mixing`` (left out when it is the default, so pairs plans keep their options)."""
    mode = {} if mixing == "pairs" else {"mixing": mixing}
    arms = {
        "saerl": {**mode, "mixing_ratio": mixing_ratio},
        "no_sort": {**mode, "mixing_ratio": mixing_ratio, "sort": False},
        "no_mixing": {**mode, "mixing_ratio": 0.0},
        "no_cluster": {**mode, "mixing_ratio": mixing_ratio, "cluster": False},
    }
    points = {}
    for ratio in sweep:
        options = {**mode, "mixing_ratio": ratio}
        same = [name for name, existing in arms.items() if existing == options]
        points[ratio] = same[0] if same else f"mixing_{ratio:g}"
        arms.setdefault(points[ratio], options)
    return arms, points


def plot_sweep(path: Path, summary: dict) -> None:
    """Final held-out accuracy (seed mean ± std) against the plan's mean cluster entropy and diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["sweep"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in (
        (axes[0], "cluster_entropy", "mean cluster entropy per batch (nats)"),
        (axes[1], "diversity", "mean diversity per batch"),
    ):
        shown = [p for p in points if p[key] is not None]
        for name, metric, marker in (("final greedy", "final_accuracy", "o"), ("Avg@k", "avg_at_k", "s")):
            ax.errorbar(
                [p[key] for p in shown],
                [100 * p[metric]["mean"] for p in shown],
                yerr=[100 * p[metric]["std"] for p in shown],
                marker=marker,
                capsize=3,
                label=name,
            )
        for p in shown:
            ax.annotate(f"m={p['mixing_ratio']:g}", (p[key], 100 * p["final_accuracy"]["mean"]), fontsize=7)
        ax.set(xlabel=label, ylabel="held-out accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle("mixing-ratio sweep: diversity vs accuracy (seed mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _markdown(summary: dict) -> str:
    rows = [
        f"| {p['mixing_ratio']:g} | {p['arm']} | {p['cluster_entropy']:.3f} | "
        + ("n/a" if p["diversity"] is None else f"{p['diversity']:.3f}")
        + f" | {spread_cell(p['final_accuracy'])} | {spread_cell(p['avg_at_k'])} |"
        for p in summary["sweep"]
    ]
    k = summary["budget"]["k"]
    return "\n".join(
        [
            "# Ablations of the SAERL plan",
            "",
            budget_line(summary),
            "",
            SEED_NOTE,
            "",
            arms_table(summary),
            *(f"- `{arm}`: {ABLATIONS[arm]}" for arm in summary["variants"] if arm in ABLATIONS),
            "",
            *(
                f"Plan `{a}` has the same batches as `{b}` and shares its runs."
                for a, b in summary["same_batches_as"].items()
            ),
            "",
            f"## Paired differences to the full plan (`{REFERENCE}`)",
            "",
            paired_table(summary["paired"], REFERENCE, k),
            "![paired](paired.png)",
            "",
            "## Plans",
            "",
            plans_table(summary["plans"]),
            "## Mixing-ratio sweep",
            "",
            f"| mixing ratio | arm | cluster entropy | diversity | final greedy acc. % | Avg@{k} % |",
            "|---:|---|---:|---:|---:|---:|",
            *rows,
            "",
            "![curves](curves.png)",
            "",
            "![sweep](sweep.png)",
            "",
        ]
    )


def run_ablate(cfg: AblateConfig) -> dict:
    """Builds the SAE store (unless given) and one plan per variant, runs every arm over the seeds, writes
    the results with the sweep's diversity-vs-accuracy points."""
    data = training_pool(cfg.sources, cfg.out)
    store = cfg.sae_store(data)
    options, points = variants(cfg.mixing_ratio, cfg.sweep, cfg.mixing)
    arms, plans, batches, same_as = [], {}, {}, {}
    for name, opts in options.items():
        path, plans[name] = cfg.make_plan(store, data, name, **opts)
        batches[name] = Plan.load(path).batches
        twins = [arm.name for arm in arms if batches[arm.name] == batches[name]]
        if twins:  # e.g. a ratio whose round(ratio * batch) swaps nothing: the same batches, the same runs
            same_as[name] = twins[0]
            print(f"plan {name}: the same batches as {twins[0]}, whose runs it shares")
        else:
            arms.append(Arm(name=name, sampler="plan", plan=path))
    points = {ratio: same_as.get(arm, arm) for ratio, arm in points.items()}
    summary = run_arms(cfg.experiment(cfg.sources.model_dir, data), arms, target=cfg.target)
    summary["plans"] = plans
    summary["variants"] = options
    summary["same_batches_as"] = same_as
    summary["paired"] = paired_summary(summary["results"], REFERENCE, summary["target"])
    summary["sweep"] = [
        {
            "mixing_ratio": ratio,
            "arm": arm,
            "cluster_entropy": plans[arm]["mean_cluster_entropy"],
            "diversity": plans[arm]["mean_diversity"],
            "final_accuracy": summary["aggregate"][arm]["final_accuracy"],
            "avg_at_k": summary["aggregate"][arm]["avg_at_k"],
        }
        for ratio, arm in points.items()
    ]
    draw = functools.partial(plot_curves, summary=summary, title="held-out accuracy by plan variant (mean, min-max)")
    sweep = functools.partial(plot_sweep, summary=summary)
    paired = functools.partial(
        plot_paired, paired=summary["paired"], reference=REFERENCE, title=f"paired difference to {REFERENCE}"
    )
    write_results(cfg.out, summary, _markdown(summary), {"curves.png": draw, "sweep.png": sweep, "paired.png": paired})
    return summary
