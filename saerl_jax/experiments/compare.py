"""Vanilla GRPO vs an external-difficulty curriculum vs the SAERL plan vs a dense-hidden-state plan, on the
same budget over seeds (``scripts/compare_samplers.py``)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from saerl_jax.engineering.planner import Plan
from saerl_jax.experiments.aggregate import paired_summary
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.inputs import build_store, training_pool
from saerl_jax.experiments.report import (
    SEED_NOTE,
    arms_table,
    budget_line,
    paired_table,
    plans_table,
    plot_curves,
    plot_paired,
    write_results,
)
from saerl_jax.experiments.runs import Arm, run_arms

ARMS = ("vanilla", "vanilla_filtered", "difficulty", "saerl", "dense")
"""shuffle over the whole pool; shuffle over the rows the SAERL quality filter kept (the engineer's
``order="random"``: filtering without ordering); the dataset's difficulty labels easy to hard; ``run_engineer``
on the SAE store; on the dense store."""
REFERENCE = "vanilla"
"""The arm every other is paired against."""
FILTERED = "vanilla_filtered"
"""The second reference: the plan arms against shuffled training on the same kept rows isolate the order
(and grouping) from the filtering."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareConfig(StudyConfig):
    """Options of the sampler comparison."""

    out: Path = Path("runs/compare_samplers")
    arms: tuple[str, ...] = ARMS
    """Arms to run, a subset of :data:`ARMS`."""
    dense_store: Path | None = None
    """Dense feature store of the training pool; built under ``out/stores/dense`` when None."""
    plan: Path | None = None
    """The SAERL plan; built from the SAE store under ``out/plans/saerl`` when None."""
    dense_plan: Path | None = None
    """The dense-state plan; built from the dense store under ``out/plans/dense`` when None."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names from {ARMS}, got {self.arms}")


def _plan(cfg: CompareConfig, data: Path, name: str) -> tuple[Path, dict]:
    """The plan of arm ``name`` (``saerl``, ``vanilla_filtered`` or ``dense``): given, or built once."""
    given = {"saerl": cfg.plan, "dense": cfg.dense_plan}.get(name)
    if given is not None:
        return given, Plan.load(given / "plan.json" if given.is_dir() else given).summary()
    if name == "dense":
        store = cfg.dense_store or build_store(
            cfg.sources, data, cfg.out / "stores" / "dense", dense=True, seed=cfg.plan_seed, progress=cfg.progress
        )
        return cfg.make_plan(store, data, name)
    options = {"order": "random"} if name == "vanilla_filtered" else {}
    return cfg.make_plan(cfg.sae_store(data), data, name, **options)


def _markdown(summary: dict) -> str:
    lines = [
        "# Sampler comparison: vanilla vs external difficulty vs SAERL plan vs dense-state plan",
        "",
        budget_line(summary),
        "",
        SEED_NOTE,
        "The vanilla and difficulty arms draw from the whole training pool (noisy problems included); the plan "
        "arms draw only what the engineer's quality filter kept, as in the paper; `vanilla_filtered` shuffles "
        "those kept rows (filtering without ordering).",
        "",
        arms_table(summary),
        "Steps to target: the mean over the seeds that reached it, then how many did and each seed's step "
        "(— = not within the budget).",
        "",
    ]
    if summary.get("paired"):
        lines += [
            f"## Paired differences to {REFERENCE}",
            "",
            paired_table(summary["paired"], REFERENCE, summary["budget"]["k"]),
            "![paired](paired.png)",
            "",
        ]
    if summary.get("paired_filtered"):
        lines += [
            f"## The plans against `{FILTERED}` (the same kept rows, shuffled): ordering apart from filtering",
            "",
            paired_table(summary["paired_filtered"], FILTERED, summary["budget"]["k"]),
        ]
    if summary["plans"]:
        lines += ["## Plans", "", plans_table(summary["plans"])]
    lines += ["![curves](curves.png)", ""]
    return "\n".join(lines)


def run_compare(cfg: CompareConfig) -> dict:
    """Builds what the arms need (pool, stores, plans), runs every arm over the seeds, writes the results."""
    data = training_pool(cfg.sources, cfg.out)
    arms, plans = [], {}
    for name in cfg.arms:
        if name in ("saerl", "vanilla_filtered", "dense"):
            path, plans[name] = _plan(cfg, data, name)
            arms.append(Arm(name=name, sampler="plan", plan=path))
        else:
            arms.append(Arm(name=name, sampler="shuffle" if name == "vanilla" else "difficulty"))
    summary = run_arms(cfg.experiment(cfg.sources.model_dir, data), arms, target=cfg.target)
    summary["plans"] = plans
    plots = {
        "curves.png": functools.partial(
            plot_curves, summary=summary, title="held-out accuracy by sampler (mean, min-max)"
        )
    }
    if REFERENCE in cfg.arms and len(cfg.arms) > 1:
        summary["paired"] = paired_summary(summary["results"], REFERENCE, summary["target"])
        plots["paired.png"] = functools.partial(
            plot_paired, paired=summary["paired"], reference=REFERENCE, title=f"paired difference to {REFERENCE}"
        )
    plan_arms = {arm: rows for arm, rows in summary["results"].items() if arm in ("saerl", "dense", FILTERED)}
    if FILTERED in plan_arms and len(plan_arms) > 1:
        summary["paired_filtered"] = paired_summary(plan_arms, FILTERED, summary["target"])
    write_results(cfg.out, summary, _markdown(summary), plots)
    return summary
