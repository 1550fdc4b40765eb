"""Grain pipeline: samplers over a Plan (and the baselines), the problem source and tokenizing transforms."""

from saerl_jax.pipeline.loader import BatchSource, TokenizePrompts, make_loader
from saerl_jax.pipeline.sampler import BatchSampler, CurriculumSampler, ExternalDifficultySampler, ShuffleSampler

__all__ = [
    "BatchSampler",
    "BatchSource",
    "CurriculumSampler",
    "ExternalDifficultySampler",
    "ShuffleSampler",
    "TokenizePrompts",
    "make_loader",
]
