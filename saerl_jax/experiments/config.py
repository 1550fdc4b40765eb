"""Options the GRPO experiments share (sampler comparison, ablations, transfer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saerl_jax.experiments.inputs import N_CLUSTERS, Sources, build_plan, build_store, plan_job
from saerl_jax.experiments.runs import Budget, Experiment


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """An experiment's directory, inputs, GRPO budget and seeds."""

    out: Path
    """Experiment directory: stores/, plans/, base/, runs/ARM/seed-S/, results.json, results.md, PNGs."""
    sources: Sources = dataclasses.field(default_factory=Sources)
    """Model, SAE, tokenizer and problems."""
    budget: Budget = dataclasses.field(default_factory=Budget)
    """GRPO budget and evaluation, the same for every arm."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """GRPO seeds."""
    target: float | None = None
    """Held-out accuracy whose first step is reported; None takes base accuracy + 0.02."""
    store: Path | None = None
    """SAE feature store of the training pool; built under ``out/stores/sae`` when None."""
    n_clusters: int = N_CLUSTERS
    """Clusters of the plans' data engineering."""
    plan_seed: int = 0
    """Seed of the feature extraction and data engineering (every plan), fixed across GRPO seeds."""
    reward_workers: int = 1
    """Grading processes of the trainer; 0 grades in this process."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.target is not None and not 0 <= self.target <= 1:
            raise ValueError(f"target is an accuracy in [0, 1], got {self.target}")

    def experiment(self, model: Path, data: Path) -> Experiment:
        """The shared settings of every arm trained from ``model`` on ``data``."""
        return Experiment(
            model=model,
            tokenizer=self.sources.tokenizer_dir,
            data=data,
            eval_data=self.sources.eval_file,
            out=self.out,
            budget=self.budget,
            seeds=self.seeds,
            reward_workers=self.reward_workers,
            progress=self.progress,
        )

    def sae_store(self, data: Path) -> Path:
        """The given SAE store, or the one built (once) from ``data``."""
        if self.store is not None:
            return self.store
        return build_store(
            self.sources, data, self.out / "stores" / "sae", dense=False, seed=self.plan_seed, progress=self.progress
        )

    def make_plan(self, store: Path, data: Path, name: str, **options) -> tuple[Path, dict]:
        """The plan ``out/plans/NAME`` from ``store`` (batch = the GRPO batch size), built once."""
        job = plan_job(
            store,
            data,
            self.out / "plans" / name,
            batch_size=self.budget.batch_size,
            n_clusters=self.n_clusters,
            seed=self.plan_seed,
            **options,
        )
        return build_plan(job)
