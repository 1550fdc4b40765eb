"""The positive control (``scripts/positive_control.py``): the SAERL mechanisms against vanilla GRPO and the
paper's baselines in a world built so that they must help if they work (:mod:`saerl_jax.data.control`).

Steps, each built once under ``OUT`` and reused (so a rerun resumes where it stopped):

1. The world: ``world/problems.jsonl`` (the pool) and ``world/eval.jsonl`` (clean held-out problems).
2. The planted conditions, checked before any training and reported (``conditions.json``): the base policy's
   pass rate over k samples per pool row by kind (the rollout baseline's signal, computed once), the share
   of zero-variance groups this predicts, and base greedy accuracy per rung on the held-out set.
3. Inputs of the arms: the SAE and dense feature stores, the SAERL plan and its variants, the clean pool,
   the rollout-ordered pool and the compressed-state selection.
4. Every arm over the seeds, seed by seed; tables after every run (which seeds and arms are done), paired
   differences to vanilla with bootstrap intervals, plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from saerl_jax.data import control
from saerl_jax.data.problems import load_problems, write_problems_jsonl
from saerl_jax.data.prompt import load_tokenizer
from saerl_jax.data.tinymath import write_jsonl
from saerl_jax.engineering.baselines import (
    extraction_cost,
    rollout_pass_rates,
    select_from_store,
    write_rollout_pool,
)
from saerl_jax.engineering.planner import Plan
from saerl_jax.errors import UserError
from saerl_jax.experiments.aggregate import paired_summary
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.inputs import Sources, build_store
from saerl_jax.experiments.replan import Replanner, replan_cost
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
from saerl_jax.io import atomic_write
from saerl_jax.model import load_pretrained

ARMS = {
    "vanilla": "GRPO on the whole pool (noise included), shuffled",
    "vanilla_clean": "shuffled, only the clean rows (an oracle filter): against vanilla, the accuracy cost of "
    "the noise",
    "vanilla_filtered": "shuffled, only the rows the SAERL quality filter kept (the engineer's order=random): "
    "filtering without ordering",
    "saerl": "the SAERL plan: quality filter, clusters, calibrated SAE difficulty easy to hard, mixing 0.25",
    "no_sort": "the SAERL plan without the easy-to-hard order (stages and order by a random key)",
    "rollout": "the whole pool easiest first by the base policy's pass rate over k samples (the external "
    "signal SAERL replaces)",
    "compressed": "dense hidden states, PCA to 32 dimensions, a k-center subset of steps x batch problems, "
    "shuffled (the hidden-state-compression baseline, as read here)",
    "oracle_order": "only the clean rows, easy to hard by their true rung (random within a rung): the best "
    "order this world allows; against vanilla_clean, what ordering can do here at all",
    "replan": "the SAERL plan, rebuilt every N steps from the current policy's SAE features over the kept "
    "rows not yet trained (beyond the paper)",
}
"""Arms and what each one is."""
REFERENCE = "vanilla"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlConfig(StudyConfig):
    """Options of the positive control."""

    out: Path = Path("runs/positive_control")
    n_problems: int = 2000
    """Pool rows (noise included)."""
    n_eval: int = 1000
    """Clean held-out problems."""
    world_seed: int = 0
    """Generator seed of the world (held-out: seed + 1)."""
    arms: tuple[str, ...] = tuple(ARMS)
    """Arms to run, names from :data:`ARMS` (the reference always runs)."""
    reference: str = REFERENCE
    """The arm every other one is paired with (default vanilla)."""
    rollout_k: int = 4
    """Samples per pool problem for the base pass rates (rollout baseline and the planted conditions)."""
    rollout_temperature: float = 1.0
    """Sampling temperature of those samples (the training temperature)."""
    replan_steps: int = 50
    """Steps between re-plans of the ``replan`` arm."""
    dense_components: int = 32
    """PCA dimensions of the compressed-state baseline."""
    check: bool = True
    """Stop before training when a planted condition does not hold (:func:`check_conditions`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must be distinct names from {tuple(ARMS)}, got {self.arms}")
        if self.reference not in ARMS:
            raise ValueError(f"reference must be one of {tuple(ARMS)}, got {self.reference!r}")
        if self.reference not in self.arms:
            object.__setattr__(self, "arms", (self.reference, *self.arms))


def write_world(cfg: ControlConfig) -> tuple[Path, Path]:
    """``OUT/world/problems.jsonl`` and ``eval.jsonl`` (left alone when they already hold the same rows)."""
    world = cfg.out / "world"
    pool = control.generate(cfg.n_problems, seed=cfg.world_seed)
    files = {
        world / "problems.jsonl": pool,
        world / "eval.jsonl": control.generate_eval(cfg.n_eval, seed=cfg.world_seed, pool=pool),
    }
    for path, rows in files.items():
        if not path.is_file() or [json.loads(line) for line in path.read_text().splitlines()] != rows:
            write_jsonl(rows, path)
    return tuple(files)


def _by(keys, values) -> dict[str, dict]:
    groups = defaultdict(list)
    for key, value in zip(keys, values, strict=True):
        groups[key].append(value)
    return {key: {"n": len(v), "mean": float(np.mean(v))} for key, v in sorted(groups.items())}


def planted_conditions(pool: Path, eval_file: Path, rates, base_correct: list[float], group_size: int) -> dict:
    """What the world plants, measured on the base policy: pass rate and zero-variance share per row kind,
    greedy accuracy per rung, and the shares of the pool."""
    problems = load_problems(pool).problems
    kind = {p.id: p.source for p in problems}
    by_id = dict(zip(rates.ids, rates.pass_rate, strict=True))
    sources = [kind[i] for i in rates.ids]
    k = rates.k
    correct = np.rint(np.asarray([by_id[i] for i in rates.ids]) * k)
    zero_var = ((correct == 0) | (correct == k)).astype(float)
    held = load_problems(eval_file).problems
    out = {
        "pool": {source: sum(s == source for s in sources) / len(sources) for source in sorted(set(sources))},
        "pass_rate": _by(sources, [by_id[i] for i in rates.ids]),
        "zero_variance": _by(sources, zero_var),
        "zero_variance_pool": float(zero_var.mean()),
        "zero_variance_clean": float(zero_var[[control.is_clean({"source": s}) for s in sources]].mean()),
        "k": k,
        "group_size": group_size,
        "base_greedy": _by([p.source for p in held][: len(base_correct)], base_correct),
    }
    return out


CHECKS = {
    "hard rung starves GRPO: base pass rate <= 0.15": ("control/hard", "pass_rate", "<=", 0.15),
    "hard rung groups without reward variance >= 70%": ("control/hard", "zero_variance", ">=", 0.7),
    "medium rung learnable: base pass rate >= 0.2": ("control/medium", "pass_rate", ">=", 0.2),
    "medium rung not solved: base pass rate <= 0.8": ("control/medium", "pass_rate", "<=", 0.8),
    "wrong answers rarely rewarded: base pass rate <= 0.1": ("noise/wrong_answer", "pass_rate", "<=", 0.1),
    "wrong answers >= 20% of the pool": ("noise/wrong_answer", "pool", ">=", 0.2),
}
"""What makes the world a positive control, as (row kind, measure, comparison, bound)."""


def check_conditions(c: dict) -> dict[str, dict]:
    """Each of :data:`CHECKS` on measured conditions ``c``: ``{name: {value, ok}}``."""
    out = {}
    for name, (kind, measure, op, bound) in CHECKS.items():
        value = c[measure][kind] if measure == "pool" else c[measure][kind]["mean"]
        out[name] = {"value": float(value), "ok": bool(value <= bound if op == "<=" else value >= bound)}
    return out


def conditions_table(c: dict) -> str:
    """Markdown: per row kind, its pool share, base pass rate and share of all-equal sample groups."""
    lines = [
        f"| rows | share of pool | base pass rate (k={c['k']}, T=1) | groups with no reward variance | "
        "base greedy acc. (held-out) |",
        "|---|---:|---:|---:|---:|",
    ]
    for source, share in c["pool"].items():
        greedy = c["base_greedy"].get(source)
        lines.append(
            f"| {source} | {100 * share:.1f}% | {c['pass_rate'][source]['mean']:.3f} | "
            f"{100 * c['zero_variance'][source]['mean']:.0f}% | "
            + ("" if greedy is None else f"{100 * greedy['mean']:.1f}% (n={greedy['n']})")
            + " |"
        )
    lines.append(
        f"\nGroups with no reward variance at the base policy: {100 * c['zero_variance_pool']:.0f}% of the "
        f"pool, {100 * c['zero_variance_clean']:.0f}% of its clean rows (the k samples of a row stand for "
        "one GRPO group)."
    )
    if "checks" in c:
        lines += ["", "| planted condition | measured | holds |", "|---|---:|---|"]
        lines += [f"| {name} | {v['value']:.3f} | {'yes' if v['ok'] else 'NO'} |" for name, v in c["checks"].items()]
    return "\n".join(lines) + "\n"


def _rates(cfg: ControlConfig, pool: Path):
    problems = load_problems(pool).problems
    return rollout_pass_rates(
        load_pretrained(cfg.sources.model_dir),
        load_tokenizer(cfg.sources.tokenizer_dir),
        problems,
        k=cfg.rollout_k,
        temperature=cfg.rollout_temperature,
        max_new_tokens=cfg.budget.max_completion_length,
        seed=cfg.plan_seed,
        progress=cfg.progress,
        out=cfg.out / "rollout" / "pass_rates.json",
        model_name=str(cfg.sources.model_dir),
    )


def _write_if_changed(problems, path: Path) -> Path:
    if not path.is_file() or load_problems(path).problems != list(problems):
        write_problems_jsonl(list(problems), path)
    return path


def build_arms(cfg: ControlConfig, pool: Path, rates) -> tuple[list[Arm], dict, dict]:
    """The arms of ``cfg.arms`` with their inputs (built once), their plans' summaries and costs."""
    store = cfg.sae_store(pool)
    plans, costs, arms = {}, {"saerl_extraction": extraction_cost(store)}, []
    problems = load_problems(pool).problems
    inputs = cfg.out / "inputs"
    saerl_path, plans["saerl"] = cfg.make_plan(store, pool, "saerl")
    for name in cfg.arms:
        if name == "vanilla":
            arms.append(Arm(name=name, sampler="shuffle"))
        elif name == "vanilla_clean":
            clean = _write_if_changed(
                [p for p in problems if control.is_clean({"source": p.source})], inputs / "clean.jsonl"
            )
            arms.append(Arm(name=name, sampler="shuffle", data=clean))
        elif name == "vanilla_filtered":
            path, plans[name] = cfg.make_plan(store, pool, name, order="random")
            arms.append(Arm(name=name, sampler="plan", plan=path))
        elif name == "saerl":
            arms.append(Arm(name=name, sampler="plan", plan=saerl_path))
        elif name == "no_sort":
            path, plans[name] = cfg.make_plan(store, pool, name, sort=False)
            arms.append(Arm(name=name, sampler="plan", plan=path))
        elif name == "oracle_order":
            data = _write_if_changed(control.rung_curriculum(problems, seed=cfg.plan_seed), inputs / "rungs.jsonl")
            arms.append(Arm(name=name, sampler="difficulty", data=data))
        elif name == "rollout":
            data = inputs / "rollout.jsonl"
            write_rollout_pool(problems, rates, data)
            arms.append(Arm(name=name, sampler="difficulty", data=data))
            costs["rollout"] = rates.cost
        elif name == "compressed":
            dense = build_store(
                cfg.sources, pool, cfg.out / "stores" / "dense", dense=True, seed=cfg.plan_seed, progress=cfg.progress
            )
            budget = min(len(problems), cfg.budget.steps * cfg.budget.batch_size)
            chosen = select_from_store(dense, problems, budget, n_components=cfg.dense_components, seed=cfg.plan_seed)
            data = _write_if_changed(chosen, inputs / "compressed.jsonl")
            arms.append(Arm(name=name, sampler="shuffle", data=data))
            costs["compressed_extraction"] = extraction_cost(dense)
        elif name == "replan":
            replanner = Replanner(
                sources=cfg.sources,
                pool=pool,
                keep=tuple(sorted(set(Plan.load(saerl_path).ids()))),
                batch_size=cfg.budget.batch_size,
                n_clusters=cfg.n_clusters,
                seed=cfg.plan_seed,
            )
            arms.append(
                Arm(
                    name=name,
                    sampler="plan",
                    plan=saerl_path,
                    replan=replanner,
                    replan_steps=cfg.replan_steps,
                    replan_name="kept rows not trained yet; SAE features of the current policy; no filter refit",
                )
            )
    return arms, plans, costs


def _kinds_trained(summary: dict, pool: Path) -> dict:
    """Per arm, the share of trained prompts of each row kind (over its finished seeds)."""
    kind = {p.id: p.source for p in load_problems(pool).problems}
    out = {}
    for arm, rows in summary["results"].items():
        if arm == "base" or not rows:
            continue
        counts = defaultdict(int)
        for row in rows:
            path = Path(row["run_dir"]) / "batches.jsonl"
            for line in path.read_text().splitlines():
                for i in json.loads(line)["ids"]:
                    counts[kind.get(i, "?")] += 1
        total = sum(counts.values())
        out[arm] = {k: v / total for k, v in sorted(counts.items())}
    return out


def _markdown(summary: dict) -> str:
    k = summary["budget"]["k"]
    done = summary["done"]
    status = (
        "complete"
        if summary["complete"]
        else "**partial**: "
        + "; ".join(f"{arm} seeds {', '.join(map(str, seeds)) or 'none'}" for arm, seeds in done.items())
    )
    kinds = summary.get("kinds_trained", {})
    kind_names = sorted({k for shares in kinds.values() for k in shares})
    kind_rows = [
        f"| {arm} | " + " | ".join(f"{100 * shares.get(n, 0):.0f}%" for n in kind_names) + " |"
        for arm, shares in kinds.items()
    ]
    zero = [
        f"| {arm} | {100 * float(np.mean([np.mean(r['zero_std']) for r in rows])):.0f}% |"
        for arm, rows in summary["results"].items()
        if arm != "base" and rows and all("zero_std" in r for r in rows)
    ]
    replans = summary.get("replan_cost") or {}
    lines = [
        "# Positive control: SAERL against vanilla GRPO and the paper's baselines",
        "",
        f"Status: {status}.",
        "",
        budget_line(summary),
        "",
        SEED_NOTE,
        "",
        "## Arms",
        "",
        *(f"- `{arm}`: {ARMS[arm]}" for arm in summary["arms"]),
        "",
        "## Planted conditions (base policy, before training)",
        "",
        conditions_table(summary["conditions"]),
        "## Results",
        "",
        arms_table(summary),
        f"## Paired differences to {summary['reference']}",
        "",
        paired_table(summary["paired"], summary["reference"], k),
        "![paired](paired.png)",
        "",
        "![curves](curves.png)",
        "",
        "## What each arm trained on (share of trained prompts by row kind)",
        "",
        "| arm | " + " | ".join(kind_names) + " |",
        "|---|" + "---:|" * len(kind_names),
        *kind_rows,
        "",
        "| arm | GRPO groups with no reward variance (mean over steps) |",
        "|---|---:|",
        *zero,
        "",
        "## Costs of the signals",
        "",
        "```json",
        json.dumps({**summary["costs"], "replan": replans}, indent=1),
        "```",
        "",
    ]
    if summary["plans"]:
        lines += ["## Plans", "", plans_table(summary["plans"])]
    return "\n".join(lines)


def run_control(cfg: ControlConfig) -> dict:
    """Builds the world and every arm's inputs, checks the planted conditions, runs the arms seed by seed and
    writes ``results.json``, ``results.md``, ``conditions.json``, ``curves.png`` and ``paired.png`` (after
    every run, so a partial run's tables say which seeds and arms are done)."""
    pool, eval_file = write_world(cfg)
    cfg = dataclasses.replace(cfg, sources=dataclasses.replace(cfg.sources, problems=pool, eval_data=eval_file))
    rates = _rates(cfg, pool)
    conditions = planted_conditions(pool, eval_file, rates, [], cfg.budget.num_generations)
    conditions["checks"] = check_conditions(conditions)
    failed = [name for name, v in conditions["checks"].items() if not v["ok"]]
    print("planted conditions: " + ("all hold" if not failed else f"{len(failed)} do not hold: {failed}"))
    atomic_write(cfg.out / "conditions.json", lambda tmp: Path(tmp).write_text(json.dumps(conditions, indent=1)))
    if failed and cfg.check:
        raise UserError(
            f"{pool}: the world is not a positive control for this model ({'; '.join(failed)}); the measured "
            f"conditions are in {cfg.out / 'conditions.json'}; --no-check trains anyway"
        )
    arms, plans, costs = build_arms(cfg, pool, rates)
    exp = dataclasses.replace(cfg.experiment(cfg.sources.model_dir, pool))
    state = {}

    def write(summary: dict) -> None:
        base = summary["results"]["base"][0]
        summary["conditions"] = planted_conditions(
            pool, eval_file, rates, base["final_correct"], cfg.budget.num_generations
        )
        summary["conditions"]["checks"] = conditions["checks"]
        atomic_write(
            cfg.out / "conditions.json", lambda tmp: Path(tmp).write_text(json.dumps(summary["conditions"], indent=1))
        )
        summary["plans"], summary["costs"] = plans, costs
        summary["reference"] = cfg.reference
        summary["paired"] = paired_summary(summary["results"], cfg.reference, summary["target"])
        summary["kinds_trained"] = _kinds_trained(summary, pool)
        summary["replan_cost"] = {
            str(r["seed"]): replan_cost(Path(r["run_dir"])) for r in summary["results"].get("replan", [])
        }
        curves = functools.partial(plot_curves, summary=summary, title="held-out greedy accuracy (mean, min-max)")
        paired = functools.partial(
            plot_paired,
            paired=summary["paired"],
            reference=cfg.reference,
            title=f"paired difference to {cfg.reference}",
        )
        write_results(cfg.out, summary, _markdown(summary), {"curves.png": curves, "paired.png": paired})
        state["summary"] = summary

    summary = run_arms(exp, arms, target=cfg.target, after_each=write)
    write(summary)
    return state["summary"]


__all__ = [
    "ARMS",
    "CHECKS",
    "ControlConfig",
    "Sources",
    "build_arms",
    "check_conditions",
    "planted_conditions",
    "run_control",
    "write_world",
]
