"""SAERL data engineering: quality filter, SAE-space clusters, difficulty proxy with per-cluster
calibration, curriculum planner, probes; scikit-learn estimators throughout. Beside them, the baselines the
paper compares with: a rollout-accuracy curriculum and hidden-state-compression selection."""

from saerl_jax.engineering.baselines import (
    PassRates,
    compressed_selection,
    extraction_cost,
    rollout_difficulty,
    rollout_pass_rates,
    select_from_store,
    write_rollout_pool,
    write_selected_pool,
)
from saerl_jax.engineering.difficulty import DifficultyModel
from saerl_jax.engineering.diversity import Diversity, batch_diversity
from saerl_jax.engineering.planner import CurriculumPlanner, Plan
from saerl_jax.engineering.probes import probe_report
from saerl_jax.engineering.quality import QualityFilter
from saerl_jax.engineering.run import EngineerJob, probe_store, run_engineer

__all__ = [
    "CurriculumPlanner",
    "DifficultyModel",
    "Diversity",
    "EngineerJob",
    "PassRates",
    "Plan",
    "QualityFilter",
    "batch_diversity",
    "compressed_selection",
    "extraction_cost",
    "probe_report",
    "probe_store",
    "rollout_difficulty",
    "rollout_pass_rates",
    "run_engineer",
    "select_from_store",
    "write_rollout_pool",
    "write_selected_pool",
]
