"""Features: pooled SAE codes per problem (prompt and solution spans, mean and max) and the feature store."""

from saerl_jax.features.extract import ExtractJob, run_extract
from saerl_jax.features.pooling import METADATA_COLUMNS, feature_columns, pool_spans, select_latents, text_metadata
from saerl_jax.features.store import FeatureStore, StoreMismatchError, load_store

__all__ = [
    "METADATA_COLUMNS",
    "ExtractJob",
    "FeatureStore",
    "StoreMismatchError",
    "feature_columns",
    "load_store",
    "pool_spans",
    "run_extract",
    "select_latents",
    "text_metadata",
]
