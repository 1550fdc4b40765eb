"""Sparse autoencoders in JAX/Flax NNX: model variants, SAELens-format files, training and metrics."""

from sae.io import check_matches_model, from_arrays, load, load_gemma_scope, load_sparsify, save
from sae.model import SAEConfig, SAEMetadata, SAEOutput, SparseAutoencoder

__all__ = [
    "SAEConfig",
    "SAEMetadata",
    "SAEOutput",
    "SparseAutoencoder",
    "check_matches_model",
    "from_arrays",
    "load",
    "load_gemma_scope",
    "load_sparsify",
    "save",
]
