"""Qwen2 in Flax NNX: config, modules, HF weight loading, jitted forward and KV-cache sampling."""

from saerl_jax.model.forward import bucket_length, forward, forward_fn, left_pad, pad_sequences
from saerl_jax.model.qwen2 import LayerCache, Qwen2, Qwen2Config, causal_mask, positions_from_mask
from saerl_jax.model.sampling import GenerateOutput, SamplingConfig, generate, generate_fn
from saerl_jax.model.weights import load_pretrained, save_pretrained

__all__ = [
    "GenerateOutput",
    "LayerCache",
    "Qwen2",
    "Qwen2Config",
    "SamplingConfig",
    "bucket_length",
    "causal_mask",
    "forward",
    "forward_fn",
    "generate",
    "generate_fn",
    "left_pad",
    "load_pretrained",
    "pad_sequences",
    "positions_from_mask",
    "save_pretrained",
]
