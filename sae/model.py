"""Sparse autoencoders in Flax NNX: TopK, BatchTopK, ReLU (L1) and JumpReLU behind one interface.

Shapes: ``...`` any leading axes (usually tokens N), D = ``d_in``, F = ``d_sae``, K = ``k``.
Weights use the SAELens layout: ``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]``, ``b_dec [D]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sae.sparse import top_k

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]
Normalization = Literal["none", "expected_average_only_in"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEMetadata:
    """Where the SAE reads its activations (SAELens ``meta``)."""

    model_name: str | None = None
    """Path or name of the model whose activations were encoded."""
    hook_name: str | None = None
    """Activation site, e.g. ``model.layers.27`` (the residual stream after 27 blocks)."""
    hook_layer: int | None = None
    """The capture layer L."""
    dataset_path: str | None = None
    """Data the SAE was trained on."""
    context_size: int | None = None
    """Longest token sequence seen in training."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Architecture of a sparse autoencoder (the fields of SAELens' ``cfg.json``)."""

    d_in: int
    """Width D of the encoded activations (the model's hidden size)."""
    d_sae: int
    """Number of latents F."""
    architecture: Architecture = "topk"
    """Activation rule: per-sample top-k, batch top-k (a threshold at inference), ReLU, JumpReLU."""
    k: int = 32
    """Active latents per sample for topk; average per sample for batchtopk."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding."""
    normalize_activations: Normalization = "none"
    """``expected_average_only_in`` scales inputs by a constant so their mean squared norm is D."""
    dtype: str = "float32"
    """Parameter dtype."""
    metadata: SAEMetadata = dataclasses.field(default_factory=SAEMetadata)
    """Provenance: model, layer, data."""

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture not in ("topk", "batchtopk", "relu", "jumprelu"):
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError(f"unsupported normalize_activations {self.normalize_activations!r}")


class Threshold(nnx.Variable):
    """A per-latent threshold estimated during training, not trained by gradient (BatchTopK)."""


class NormScale(nnx.Variable):
    """The constant input scale of ``expected_average_only_in`` normalisation."""


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.__call__` returns."""

    x_hat: jax.Array
    """Reconstruction ``[..., D]`` in the input's (un-normalised) units."""
    codes: jax.Array
    """Dense latent activations ``[..., F]`` (zeros where inactive)."""


def topk_codes(pre_NF: jax.Array, k: int) -> jax.Array:
    """Dense codes keeping each row's k largest pre-activations, then ReLU (SAELens' TopK)."""
    values_NK, indices_NK = top_k(pre_NF, k)
    rows = jnp.arange(pre_NF.shape[0])[:, None]
    return jnp.zeros_like(pre_NF).at[rows, indices_NK].set(jax.nn.relu(values_NK))


def batch_topk_codes(pre_NF: jax.Array, k: int) -> jax.Array:
    """Dense codes keeping the ``k * N`` largest ReLU'd pre-activations of the whole batch."""
    acts_NF = jax.nn.relu(pre_NF)
    flat = acts_NF.reshape(-1)
    kth = jax.lax.top_k(flat, k * pre_NF.shape[0])[0][-1]
    return jnp.where(acts_NF >= jnp.maximum(kth, jnp.finfo(acts_NF.dtype).tiny), acts_NF, 0.0)


def jumprelu_codes(pre_NF: jax.Array, threshold_F: jax.Array) -> jax.Array:
    """``relu(pre) * (pre > threshold)`` (SAELens' and Gemma Scope's JumpReLU)."""
    return jnp.where(pre_NF > threshold_F, jax.nn.relu(pre_NF), 0.0)


class SparseAutoencoder(nnx.Module):
    """``encode(x) -> codes``, ``decode(codes) -> x_hat``; ``__call__`` returns both."""

    def __init__(self, config: SAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        # Decoder rows are random unit vectors and the encoder starts as their transpose.
        w_dec = jax.random.normal(rngs.params(), (config.d_sae, config.d_in), jnp.float32)
        w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
        self.W_dec = nnx.Param(w_dec.astype(dtype))
        self.W_enc = nnx.Param(w_dec.T.astype(dtype))
        self.b_enc = nnx.Param(jnp.zeros((config.d_sae,), dtype))
        self.b_dec = nnx.Param(jnp.zeros((config.d_in,), dtype))
        if config.architecture == "jumprelu":
            self.threshold = nnx.Param(jnp.zeros((config.d_sae,), dtype))
        elif config.architecture == "batchtopk":
            self.threshold = Threshold(jnp.zeros((config.d_sae,), dtype))
        else:
            self.threshold = None
        self.norm_scale = NormScale(jnp.ones((), jnp.float32))

    def normalize(self, x: jax.Array) -> jax.Array:
        """Applies the input normalisation (identity unless ``expected_average_only_in``)."""
        return x * self.norm_scale[...].astype(x.dtype)

    def encoder_bias(self) -> jax.Array:
        """The bias ``[F]`` added to ``normalize(x) W_enc``, with ``b_dec`` folded in.

        With ``apply_b_dec_to_input``, ``(x - b_dec) W + b = x W + (b - b_dec W)``: one ``[N, D]`` pass fewer.
        ``b_dec W`` is computed as ``W.T b_dec``: training holds ``W_enc`` as ``[F, D]`` (:mod:`sae.train`), and
        this way neither the product nor its gradient needs a transposed copy of it.
        """
        if self.config.apply_b_dec_to_input:
            return self.b_enc[...] - self.W_enc[...].T @ self.b_dec[...]
        return self.b_enc[...]

    def pre_acts(self, x: jax.Array) -> jax.Array:
        """Encoder pre-activations ``[..., F]`` of raw inputs ``[..., D]``."""
        return self.normalize(x.astype(self.W_enc.dtype)) @ self.W_enc[...] + self.encoder_bias()

    def activate(self, pre_NF: jax.Array) -> jax.Array:
        """Inference activation rule for ``[N, F]`` pre-activations."""
        arch = self.config.architecture
        if arch == "topk":
            return topk_codes(pre_NF, self.config.k)
        if arch == "relu":
            return jax.nn.relu(pre_NF)
        return jumprelu_codes(pre_NF, self.threshold[...])

    def encode(self, x: jax.Array) -> jax.Array:
        """Sparse codes ``[..., F]`` of raw activations ``[..., D]`` (per sample, deterministic)."""
        pre = self.pre_acts(x)
        return self.activate(pre.reshape(-1, pre.shape[-1])).reshape(pre.shape)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Reconstruction ``[..., D]`` in raw (un-normalised) units."""
        x_hat = codes.astype(self.W_dec.dtype) @ self.W_dec[...] + self.b_dec[...]
        return x_hat / self.norm_scale[...].astype(x_hat.dtype)

    def __call__(self, x: jax.Array) -> SAEOutput:
        codes = self.encode(x)
        return SAEOutput(self.decode(codes), codes)
