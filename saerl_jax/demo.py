"""``saerl demo``: the end-to-end job on the embedded default.

Until the tiny-math assets land, the demo exercises what exists: it builds (or takes) a Qwen2
checkpoint in the Hugging Face layout, loads it strictly, captures the residual stream at a layer with
the bucketed jitted forward, samples with the KV cache, and reports shapes and timings.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2, Qwen2Config, forward, generate, load_pretrained, save_pretrained

# A Qwen2.5-Math-shaped model at about 3M parameters (same block structure, GQA ratio and rope_theta).
DEMO_CONFIG = Qwen2Config(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Options of ``saerl demo``."""

    out: Path = Path("runs/demo")
    """Directory for everything the demo writes."""
    model: Path | None = None
    """A local HF Qwen2 directory; None builds a random Qwen2.5-Math-shaped model under ``out``."""
    layer: int | None = None
    """Residual-stream layer to capture; None means the last block's input (num_layers - 1)."""
    batch_size: int = 8
    """Prompts per batch."""
    max_new_tokens: int = 32
    """Tokens sampled per prompt."""
    seed: int = 0
    """Seed of the random model, the prompts and sampling."""


def run_demo(cfg: DemoConfig) -> dict:
    """Runs the demo and returns (and writes to ``out/summary.json``) what it measured."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model
    if model_dir is None:
        model_dir = save_pretrained(Qwen2(DEMO_CONFIG, rngs=nnx.Rngs(cfg.seed)), cfg.out / "model")
        print(f"wrote a random Qwen2 checkpoint ({_n_params(DEMO_CONFIG):,} parameters) to {model_dir}")
    start = time.perf_counter()
    model = load_pretrained(model_dir)
    load_s = time.perf_counter() - start
    config = model.config
    layer = config.num_hidden_layers - 1 if cfg.layer is None else cfg.layer
    rng = np.random.default_rng(cfg.seed)
    summary: dict = {"model": str(model_dir), "layer": layer, "load_s": round(load_s, 3), "capture": []}
    for length in (20, 45, 100):
        ids = rng.integers(0, config.vocab_size, size=(cfg.batch_size, length))
        mask = (np.arange(length)[None, :] < rng.integers(length // 2, length + 1, size=(cfg.batch_size, 1))).astype(
            np.int32
        )
        first, steady = _time(lambda ids=ids, mask=mask: forward(model, ids, mask, capture_layer=layer))
        acts = forward(model, ids, mask, capture_layer=layer)
        summary["capture"].append(
            {"shape": list(acts.shape), "first_call_s": round(first, 3), "tokens_per_s": round(ids.size / steady)}
        )
        print(
            f"capture layer {layer}: activations {tuple(acts.shape)}  first call {first:.2f}s "
            f"(compile)  then {ids.size / steady:,.0f} tokens/s"
        )
    prompts = rng.integers(0, config.vocab_size, size=(cfg.batch_size, 24))
    key = jax.random.key(cfg.seed)
    first, steady = _time(
        lambda: generate(model, prompts, max_new_tokens=cfg.max_new_tokens, eos_token_id=config.vocab_size, rng=key)
    )
    out = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, eos_token_id=config.vocab_size, rng=key)
    new_tokens = int(np.asarray(out.mask_BN).sum())
    summary["generate"] = {
        "tokens_shape": list(out.tokens_BN.shape),
        "first_call_s": round(first, 3),
        "tokens_per_s": round(new_tokens / steady),
        "mean_logprob": float(np.asarray(out.logprobs_BN).sum() / new_tokens),
    }
    print(
        f"generate: tokens {tuple(out.tokens_BN.shape)}  first call {first:.2f}s (compile)  "
        f"then {new_tokens / steady:,.0f} new tokens/s"
    )
    text = json.dumps(summary, indent=2) + "\n"
    path = atomic_write(cfg.out / "summary.json", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {path}")
    print("next stages (SAE, tiny-math, features, engineering, RL) are not part of the demo yet")
    return summary


def _time(fn, repeats: int = 3) -> tuple[float, float]:
    """Seconds of the first call (compile included) and the best of ``repeats`` later calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return first, best


def _n_params(config: Qwen2Config) -> int:
    abstract = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    return sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
