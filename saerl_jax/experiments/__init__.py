"""Experiments that re-run the SAERL paper's comparisons on equal budgets over seeds: samplers, ablations,
cross-model transfer and feature probes (``scripts/compare_samplers.py``, ``ablate.py``, ``transfer.py``,
``probes.py``) and the positive control (``positive_control.py``)."""

from saerl_jax.experiments.ablate import POOLED_SWEEP, SWEEP, AblateConfig, run_ablate
from saerl_jax.experiments.aggregate import (
    aggregate,
    aggregate_arm,
    mean_curve,
    paired_difference,
    paired_summary,
    spread,
    steps_to_target,
)
from saerl_jax.experiments.compare import ARMS, CompareConfig, run_compare
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.control import ControlConfig, run_control
from saerl_jax.experiments.inputs import Sources
from saerl_jax.experiments.probe_table import ProbesConfig, run_probes
from saerl_jax.experiments.replan import Replanner
from saerl_jax.experiments.runs import Arm, Budget, Experiment, run_arm, run_arms
from saerl_jax.experiments.transfer import SmallModel, SmallSAE, TransferConfig, run_transfer

__all__ = [
    "ARMS",
    "POOLED_SWEEP",
    "SWEEP",
    "AblateConfig",
    "Arm",
    "Budget",
    "CompareConfig",
    "ControlConfig",
    "Experiment",
    "ProbesConfig",
    "Replanner",
    "SmallModel",
    "SmallSAE",
    "Sources",
    "StudyConfig",
    "TransferConfig",
    "aggregate",
    "aggregate_arm",
    "mean_curve",
    "paired_difference",
    "paired_summary",
    "run_ablate",
    "run_arm",
    "run_arms",
    "run_compare",
    "run_control",
    "run_probes",
    "run_transfer",
    "spread",
    "steps_to_target",
]
