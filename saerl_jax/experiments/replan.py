"""Adaptive re-planning, beyond the paper: every N steps the rows of the plan not trained yet are featurised
again with the *current* policy (the same SAE), difficulty and clusters are refitted, and the plan for the
rest of the run is rebuilt (:attr:`rl.trainer.TrainJob.replan` calls a :class:`Replanner`).

The quality filter's decisions are kept from the static plan (the re-plan covers the rows it kept, not
refitted: a refit would spend labels the static arm does not get). When every kept row has been trained,
the re-plan covers all of them again (a new epoch). Everything a re-plan builds sits under the run's
``replan/step-S/`` (the exported policy, ``pool.jsonl``, ``store/``, ``plan/``, ``cost.json``) and is reused
when built before, so a resumed run gets the same plan.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from saerl_jax.data.problems import load_problems, write_problems_jsonl
from saerl_jax.experiments.inputs import Sources, build_plan, build_store, plan_job
from saerl_jax.io import atomic_write

COST = "cost.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Replanner:
    """Builds the plan of the kept rows not yet trained, from the policy exported at a step."""

    sources: Sources
    """The SAE, tokenizer and extraction settings (the model is the exported policy)."""
    pool: Path
    """The problems file the arm trains on."""
    keep: tuple[str, ...]
    """Ids the static plan's quality filter kept: the rows re-plans cover."""
    batch_size: int
    """Plan batch size (= the GRPO batch)."""
    n_clusters: int
    """Clusters of each re-plan."""
    seed: int = 0
    """Extraction and engineer seed."""
    options: tuple[tuple[str, object], ...] = ()
    """Further engineer options of the static plan (e.g. mixing ratio), as pairs."""

    def __call__(self, step: int, hf: Path, seen: list[str]) -> Path:
        directory = hf.parent
        started = time.perf_counter()
        kept, trained = set(self.keep), set(seen)
        problems = [p for p in load_problems(self.pool).problems if p.id in kept]
        rest = [p for p in problems if p.id not in trained]
        if len(rest) < max(self.batch_size, self.n_clusters):  # the kept rows are used up: a new epoch
            rest = problems
        data = directory / "pool.jsonl"
        if not data.is_file() or [p.id for p in load_problems(data).problems] != [p.id for p in rest]:
            write_problems_jsonl(rest, data)
        store = build_store(dataclasses.replace(self.sources, model=hf), data, directory / "store", dense=False)
        job = plan_job(
            store,
            data,
            directory / "plan",
            batch_size=self.batch_size,
            n_clusters=self.n_clusters,
            seed=self.seed,
            quality=False,
            **dict(self.options),
        )
        plan, _ = build_plan(job)
        cost = directory / COST
        if not cost.is_file():  # the first build's time (a resumed run reuses what it built)
            text = json.dumps({"step": step, "problems": len(rest), "seconds": time.perf_counter() - started})
            atomic_write(cost, lambda tmp: Path(tmp).write_text(text + "\n"))
        return plan


def replan_cost(run_dir: Path) -> dict:
    """The re-plans of a run: how many, and their total seconds and problems featurised."""
    costs = [json.loads(path.read_text()) for path in sorted(run_dir.glob(f"replan/step-*/{COST}"))]
    return {
        "replans": len(costs),
        "seconds": sum(c["seconds"] for c in costs),
        "problems": sum(c["problems"] for c in costs),
    }
