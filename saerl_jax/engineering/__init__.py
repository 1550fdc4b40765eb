"""SAERL data engineering: quality filter, SAE-space clusters, difficulty proxy with per-cluster
calibration, curriculum planner, probes; scikit-learn estimators throughout."""

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
    "Plan",
    "QualityFilter",
    "batch_diversity",
    "probe_report",
    "probe_store",
    "run_engineer",
]
