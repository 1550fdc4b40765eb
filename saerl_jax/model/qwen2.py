"""Qwen2 decoder (the Qwen2.5 / Qwen2.5-Math architecture) in Flax NNX.

Module attributes keep the Hugging Face names (``embed_tokens``, ``q_proj``, ``input_layernorm``...)
so that ``weights.py`` is a plain name table. Every size comes from the HF ``config.json``.

Shape suffixes: B batch, T query length, S key length (cache slots), D hidden size, N query heads,
K key/value heads, G query heads per key/value head (N = K * G), H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config:
    """The architecture fields of a Hugging Face ``Qwen2Config``."""

    vocab_size: int
    """Number of token embeddings (151,936 for Qwen2.5)."""
    hidden_size: int
    """Width D of the residual stream."""
    intermediate_size: int
    """Width F of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    num_attention_heads: int
    """Query heads N."""
    num_key_value_heads: int
    """Key/value heads K (grouped-query attention); must divide N."""
    rope_theta: float = 10000.0
    """Rotary base frequency: 10,000 for Qwen2.5-Math, 1e6 for general Qwen2.5."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_word_embeddings: bool = False
    """Whether the LM head reuses the token embedding matrix."""
    max_position_embeddings: int = 32768
    """Longest sequence the checkpoint was trained for (informational)."""
    initializer_range: float = 0.02
    """Standard deviation of the random initialisation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 1:
            raise ValueError(f"Qwen2Config.num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> Qwen2Config:
        """Builds the config from a parsed HF ``config.json``; ``source`` names it in errors."""
        if cfg.get("model_type") != "qwen2":
            raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'qwen2'")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
            raise ValueError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            rope_theta=float(rope_theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            initializer_range=cfg.get("initializer_range", 0.02),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2Config:
        """Reads ``config.json`` from a local HF model directory."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
        return cls.from_hf_dict(cfg, source=str(config_file))

    def to_hf_dict(self, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
        """The ``config.json`` fields transformers needs to build ``Qwen2ForCausalLM``."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "dtype": jnp.dtype(dtype).name,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"},
        }


class LayerCache(NamedTuple):
    """Key/value cache of one attention layer, ``[B, K, S, H]`` each (the layout the attention
    einsums read, so a decode step never transposes the whole cache)."""

    k_BKSH: jax.Array
    v_BKSH: jax.Array


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position ids that skip padding: 0 at each row's first real token (left or right padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask_BS: jax.Array, query_slots_BT: jax.Array) -> jax.Array:
    """``[B, T, S]`` booleans: query at cache slot t sees real keys at slots <= t."""
    key_slots_S = jnp.arange(attention_mask_BS.shape[-1])
    visible_BTS = key_slots_S[None, None, :] <= query_slots_BT[:, :, None]
    return visible_BTS & attention_mask_BS.astype(bool)[:, None, :]


def rotary_cos_sin(positions_BT: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, H]`` in float32 then cast to ``dtype``, as transformers does."""
    inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_H2
    emb_BTH = jnp.concatenate([freqs_BTH2, freqs_BTH2], axis=-1)
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def _apply_rotary(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]


def _write_cache(cache_BKSH: jax.Array, new_BKTH: jax.Array, index: jax.Array | int) -> jax.Array:
    """``cache`` with ``new`` written at slots ``index .. index + T`` of every row, or, for ``index`` of shape
    ``[B]`` (and T = 1), at slot ``index[b]`` of row b."""
    new_BKTH = new_BKTH.astype(cache_BKSH.dtype)
    if jnp.ndim(index) == 1:
        rows_B = jnp.arange(cache_BKSH.shape[0])
        return cache_BKSH.at[rows_B, :, index].set(new_BKTH[:, :, 0], mode="drop")
    return jax.lax.dynamic_update_slice(cache_BKSH, new_BKTH, (0, 0, index, 0))


def _masked_softmax(scores_BKGTS: jax.Array, mask_BTS: jax.Array, head_dim: int, dtype) -> jax.Array:
    """Softmax over keys of the scaled scores in float32, masked keys at :data:`_MASK_VALUE`, cast to ``dtype``."""
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS.astype(jnp.float32) * head_dim**-0.5, _MASK_VALUE)
    return jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)


def _attend_one(q_BKG1H: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_B1S: jax.Array) -> jax.Array:
    """Attention of one query token (a decode step) as broadcast multiply-and-sums: XLA:CPU runs the
    batched-dot form as B*K tiny library calls; this fuses into one loop (about 3x faster at 1,024 cache
    slots on two cores) and computes the same sums."""
    h = q_BKG1H.shape[-1]
    scores_BKG1S = jnp.sum(q_BKG1H[:, :, :, :, None, :] * k_BKSH[:, :, None, None, :, :], axis=-1)
    probs_BKG1S = _masked_softmax(scores_BKG1S, mask_B1S, h, v_BKSH.dtype)
    return jnp.sum(probs_BKG1S[..., None] * v_BKSH[:, :, None, None, :, :], axis=-2)


def _attend_all(q_BKGTH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention of T queries over S keys, the G query heads of a K/V head as one matrix (plain
    batched matmuls: faster forward and backward on CPU); scores and softmax in float32."""
    b, k_heads, g, t, h = q_BKGTH.shape
    scores_BKQS = jnp.einsum("bkqh,bksh->bkqs", q_BKGTH.reshape(b, k_heads, g * t, h), k_BKSH)
    probs_BKGTS = _masked_softmax(scores_BKQS.reshape(b, k_heads, g, t, -1), mask_BTS, h, v_BKSH.dtype)
    probs_BKQS = probs_BKGTS.reshape(b, k_heads, g * t, -1)
    return jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BKSH).reshape(b, k_heads, g, t, h)


def attend(
    q_BKGTH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array, *, chunk: int = 0
) -> jax.Array:
    """Softmax attention, ``chunk`` queries at a time when ``0 < chunk < T``.

    Every query's softmax runs over all S keys either way, so chunking changes no value; it bounds the
    float32 scores held at once to ``[B, N, chunk, S]`` instead of ``[B, N, T, S]`` (at T = S = 3,584
    and 12 heads, 0.6 GB per row for all queries, chunk / T of that for one chunk). Each chunk is
    recomputed in the backward pass (``jax.checkpoint``), so its gradient holds one chunk's scores too. The
    last chunk is padded with queries that see no key and dropped.
    """
    t = q_BKGTH.shape[3]
    if chunk <= 0 or chunk >= t:
        return _attend_all(q_BKGTH, k_BKSH, v_BKSH, mask_BTS)
    num = -(-t // chunk)
    pad = num * chunk - t
    q_BKGTH = jnp.pad(q_BKGTH, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, pad), (0, 0)))
    b, k_heads, g, _, h = q_BKGTH.shape
    q_CBKGcH = q_BKGTH.reshape(b, k_heads, g, num, chunk, h).transpose(3, 0, 1, 2, 4, 5)
    mask_CBcS = mask_BTS.reshape(b, num, chunk, -1).swapaxes(0, 1)
    one = jax.checkpoint(lambda qm: _attend_all(qm[0], k_BKSH, v_BKSH, qm[1]))
    out_CBKGcH = jax.lax.map(one, (q_CBKGcH, mask_CBcS))
    return out_CBKGcH.transpose(1, 2, 3, 0, 4, 5).reshape(b, k_heads, g, num * chunk, h)[:, :, :, :t]


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back to the input dtype before the weight multiply."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x_BTD.dtype)


class Linear(nnx.Linear):
    """``nnx.Linear`` applied to its input flattened to ``[N, d_in]``.

    The same product; but the kernel gradient then contracts one axis instead of (B, T), which XLA:CPU
    runs about 1.8x faster (the MLP's backward pass at B=32, T=112 on two cores: 83 -> 46 ms).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Embed(nnx.Embed):
    """``nnx.Embed`` that computes in the dtype of its table (like :class:`Linear` with ``dtype=None``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dtype = None  # nnx.Embed would fix it to the table's dtype at construction


def _linear(cfg: Qwen2Config, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=None,  # compute in the dtype of the (possibly cast) parameters and input
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        rngs=rngs,
    )


class Qwen2Attention(nnx.Module):
    """Grouped-query attention with q/k/v biases, no output bias and rotary embeddings."""

    def __init__(self, cfg: Qwen2Config, *, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, h
        self.q_proj = _linear(cfg, d, self.num_heads * h, True, dtype, rngs)
        self.k_proj = _linear(cfg, d, self.num_kv_heads * h, True, dtype, rngs)
        self.v_proj = _linear(cfg, d, self.num_kv_heads * h, True, dtype, rngs)
        self.o_proj = _linear(cfg, self.num_heads * h, d, False, dtype, rngs)

    def __call__(
        self,
        x_BTD: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask_BTS: jax.Array,
        cache: LayerCache | None = None,
        cache_index: jax.Array | int = 0,
        attention_chunk: int = 0,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attends from the T new tokens to themselves, or to the S cache slots when ``cache`` is given.

        With a cache, the new keys/values are written at slots ``cache_index .. cache_index + T``, or, with
        one index per row (``[B]``, one new token each: continuous batching), at each row's own slot.
        ``attention_chunk`` > 0 attends that many queries at a time (see :func:`attend`).
        """
        b, t, _ = x_BTD.shape
        k_heads, g, h = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q_BTNH = self.q_proj(x_BTD).reshape(b, t, self.num_heads, h)
        k_BTKH = _apply_rotary(self.k_proj(x_BTD).reshape(b, t, k_heads, h), *cos_sin)
        k_BKSH = k_BTKH.transpose(0, 2, 1, 3)
        v_BKSH = self.v_proj(x_BTD).reshape(b, t, k_heads, h).transpose(0, 2, 1, 3)
        q_BTNH = _apply_rotary(q_BTNH, *cos_sin)
        if cache is not None:
            cache = LayerCache(
                _write_cache(cache.k_BKSH, k_BKSH, cache_index), _write_cache(cache.v_BKSH, v_BKSH, cache_index)
            )
            k_BKSH, v_BKSH = (c.astype(x_BTD.dtype) for c in cache)  # a cache_dtype other than compute
        q_BKGTH = q_BTNH.reshape(b, t, k_heads, g, h).transpose(0, 2, 3, 1, 4)
        if t == 1:
            out_BKGTH = _attend_one(q_BKGTH, k_BKSH, v_BKSH, mask_BTS)
        else:
            out_BKGTH = attend(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, chunk=attention_chunk)
        out_BTKGH = out_BKGTH.transpose(0, 3, 1, 2, 4)
        return self.o_proj(out_BTKGH.reshape(b, t, self.num_heads * h)), cache


class Qwen2MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: Qwen2Config, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, False, dtype, rngs)
        self.up_proj = _linear(cfg, d, f, False, dtype, rngs)
        self.down_proj = _linear(cfg, f, d, False, dtype, rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Qwen2DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Qwen2Config, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_sin, mask_BTS, cache=None, cache_index=0, attention_chunk=0):
        attn_BTD, cache = self.self_attn(
            self.input_layernorm(x_BTD), cos_sin, mask_BTS, cache, cache_index, attention_chunk
        )
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD)), cache


class Qwen2(nnx.Module):
    """``Qwen2ForCausalLM``: token embedding, decoder blocks, final RMSNorm and LM head.

    It computes in the dtype of its parameters (``dtype`` at construction): merging ``nnx.split`` state
    cast to bfloat16 gives a bfloat16 model (matmuls, activations, rotary tables, KV cache), whatever the
    graph was built with; RMSNorm statistics, attention softmax and sampling stay float32.
    """

    def __init__(self, config: Qwen2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(
            config.vocab_size,
            config.hidden_size,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [Qwen2DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config, config.hidden_size, config.vocab_size, False, dtype, rngs)
        )

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype: that of the parameters (the embedding table's)."""
        return jnp.dtype(self.embed_tokens.embedding.get_value().dtype)

    def __call__(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        *,
        capture_layer: int | None = None,
    ) -> jax.Array:
        """Full forward over a (possibly padded) batch.

        Args:
          input_ids_BT: token ids ``[B, T]``.
          attention_mask_BT: 1 for real tokens, 0 for padding (left or right); all ones if None.
          capture_layer: if set to L, run only the first L blocks and return the residual stream after
            them, ``[B, T, D]`` (transformers' ``output_hidden_states[L]``; 0 is the embeddings).

        Returns:
          logits ``[B, T, V]``, or the residual stream ``[B, T, D]`` with ``capture_layer``.
        """
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
        num_layers = self.config.num_hidden_layers
        if capture_layer is not None:
            if not 0 <= capture_layer < num_layers:
                raise ValueError(
                    f"capture_layer={capture_layer} is out of range: this model has "
                    f"{num_layers} layers, so it must be in [0, {num_layers - 1}]"
                )
            num_layers = capture_layer
        t = input_ids_BT.shape[1]
        slots_BT = jnp.broadcast_to(jnp.arange(t), input_ids_BT.shape)
        x_BTD, _ = self.hidden_states(
            input_ids_BT,
            positions_from_mask(attention_mask_BT),
            causal_mask(attention_mask_BT, slots_BT),
            num_layers=num_layers,
        )
        return x_BTD if capture_layer is not None else self.logits(x_BTD)

    def hidden_states(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array,
        mask_BTS: jax.Array,
        *,
        num_layers: int | None = None,
        cache: tuple[LayerCache, ...] | None = None,
        cache_index: jax.Array | int = 0,
        remat: bool = False,
        attention_chunk: int = 0,
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        """Residual stream after ``num_layers`` blocks (all by default), and the updated cache."""
        return self.run_layers(
            self.embed_tokens(input_ids_BT),
            positions_BT,
            mask_BTS,
            stop=num_layers,
            cache=cache,
            cache_index=cache_index,
            remat=remat,
            attention_chunk=attention_chunk,
        )

    def run_layers(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        mask_BTS: jax.Array,
        *,
        start: int = 0,
        stop: int | None = None,
        cache: tuple[LayerCache, ...] | None = None,
        cache_index: jax.Array | int = 0,
        remat: bool = False,
        attention_chunk: int = 0,
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        """Runs blocks ``start .. stop`` on a residual stream (e.g. one with an SAE reconstruction spliced in).

        With a cache, ``cache[i]`` belongs to block i and the returned cache has the same length. With
        With ``remat`` (and no cache), a gradient keeps only each block's input and recomputes the rest
        (see :meth:`_scan_blocks`).
        ``attention_chunk`` > 0 attends that many queries at a time (same values, bounded scores; see
        :func:`attend`).
        """
        stop = self.config.num_hidden_layers if stop is None else stop
        cos_sin = rotary_cos_sin(positions_BT, self.config.head_dim, self.config.rope_theta, self.dtype)
        if remat and cache is None and stop > start:
            return self._scan_blocks(x_BTD, cos_sin, mask_BTS, start, stop, attention_chunk), None
        new_cache = None if cache is None else list(cache)
        for i in range(start, stop):
            x_BTD, layer_cache = self.layers[i](
                x_BTD, cos_sin, mask_BTS, None if cache is None else cache[i], cache_index, attention_chunk
            )
            if new_cache is not None:
                new_cache[i] = layer_cache
        return x_BTD, None if new_cache is None else tuple(new_cache)

    def _scan_blocks(self, x_BTD, cos_sin, mask_BTS, start: int, stop: int, attention_chunk: int) -> jax.Array:
        """Blocks ``start .. stop`` as a ``lax.scan`` over their stacked parameters, each recomputed in the
        backward pass (``jax.checkpoint``).

        A scan, not a Python loop of checkpointed blocks: XLA:CPU drops the optimisation barriers of an
        unrolled remat and merges the recomputation back into the forward pass (the compiled gradient then
        holds every block's attention scores, measured in ``tests/test_memory_plan.py``), while the backward
        loop of a scan can only hold one block's. The stacked parameters are a copy of the blocks' weights
        (in the compute dtype) for the duration of the pass.
        """
        graphdef = nnx.graphdef(self.layers[start])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(self.layers[i]) for i in range(start, stop)))

        def block(x_BTD, state):
            layer = nnx.merge(graphdef, state)
            return layer(x_BTD, cos_sin, mask_BTS, attention_chunk=attention_chunk)[0], None

        return jax.lax.scan(jax.checkpoint(block), x_BTD, stacked)[0]

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final RMSNorm and LM head: ``[..., D] -> [..., V]``."""
        x_BTD = self.norm(x_BTD)
        if self.lm_head is None:
            return self.embed_tokens.attend(x_BTD)
        return self.lm_head(x_BTD)

    def init_cache(self, batch_size: int, num_slots: int, dtype=None) -> tuple[LayerCache, ...]:
        """Zeroed key/value cache with ``num_slots`` positions per layer, in ``dtype`` (default: the compute
        dtype); keys and values are cast to it when written."""
        shape = (batch_size, self.config.num_key_value_heads, num_slots, self.config.head_dim)
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        return tuple(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.config.num_hidden_layers)
        )
