"""Rollout throughput on length-skewed work: continuous batching vs static chunks vs transformers ``generate``.

Two workloads, W completions each (``--prompts`` prompts x ``--generations`` samples), at most N new tokens,
``--slots`` rows decoded at once by every sampler (the static sampler's chunk, the engine's cache slots,
transformers' batch):

1. ``tiny-math``: the shipped tiny-math policy on held-out problems at temperature 1 (its real completion
   lengths; most end long before the budget).
2. ``geometric``: a random Qwen2 of the tiny-math shape whose stop set holds enough token ids that a
   completion ends with probability ~1/90 per token: lengths are roughly geometric and about 10% of the
   rows run to a 256-token budget.

Each sampler's throughput is useful tokens (completion tokens up to the first EOS) per second, the median
of ``--repeats`` timed runs after a compiling one. The static and continuous engines draw the same tokens
(checked here); transformers draws its own (same model and distribution, another generator). Everything is
float32; JAX runs on its default device, transformers on ``--device``. Run::

    .venv/bin/python benchmarks/bench_rollout.py           # a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_rollout.py --quick   # seconds
    JAX_DEFAULT_MATMUL_PRECISION=highest python benchmarks/bench_rollout.py --device cuda   # on a GPU

On a GPU, XLA's default float32 matmuls round their inputs to TF32 (torch's do not), which breaks near-ties
differently at the two engines' batch shapes; ``highest`` keeps float32 so the engines' tokens can agree.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from rl.rollout import row_keys, sample_rows
from saerl_jax.data.problems import load_problems
from saerl_jax.data.prompt import format_example, load_tokenizer, stop_ids
from saerl_jax.model import SamplingConfig, bucket_length, left_pad, load_pretrained
from saerl_jax.model.engine import EngineConfig, generate_continuous

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per workload")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--slots", type=int, default=64, help="rows decoded at once, every sampler")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion budget N")
    parser.add_argument("--sync-steps", type=int, default=8, help="engine decode steps between host visits")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the median is reported")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device of transformers")
    parser.add_argument("--quick", action="store_true", help="few prompts and a short budget")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.slots, args.max_new_tokens, args.repeats = 8, 8, 32, 1
    return args


def median_s(fn, repeats: int):
    """Result of a first (compiling) call, and the median seconds of ``repeats`` more."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def tiny_math_prompts(tokenizer, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    problems = load_problems(ASSETS / "eval.jsonl", limit=n).problems
    prompts = [format_example(tokenizer, p.question).input_ids for p in problems]
    ids, mask = left_pad(prompts, bucket_length(max(map(len, prompts))))
    return ids.astype(np.int32), mask.astype(np.int32), [p.id for p in problems]


def bench(name: str, directory: Path, ids, mask, sample_ids, eos, pad, args) -> None:
    g = args.generations
    graphdef, params = nnx.split(load_pretrained(directory))
    ids_W, mask_W = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
    keys = row_keys(0, 0, sample_ids, g)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    common = dict(sampling=cfg, eos_ids=eos, pad_id=pad)

    def static():
        return sample_rows(graphdef, params, ids_W, mask_W, keys, rows_per_call=args.slots, engine="static", **common)

    engine = EngineConfig(slots=args.slots, sync_steps=args.sync_steps)

    def continuous():
        return generate_continuous(graphdef, params, ids_W, mask_W, keys, engine=engine, **common)

    hf = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32).to(args.device).eval()

    def theirs():
        lengths = []
        for start in range(0, len(ids_W), args.slots):
            rows = slice(start, start + args.slots)
            with torch.inference_mode():
                out = hf.generate(
                    torch.from_numpy(ids_W[rows]).long().to(args.device),
                    attention_mask=torch.from_numpy(mask_W[rows]).long().to(args.device),
                    max_new_tokens=args.max_new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    eos_token_id=list(eos),
                    pad_token_id=pad,
                )[:, ids_W.shape[1] :]
            ended = np.isin(out.cpu().numpy(), eos)
            lengths += [int(np.argmax(r)) + 1 if r.any() else out.shape[1] for r in ended]
        return np.asarray(lengths)

    fixed, static_s = median_s(static, args.repeats)
    (flowing, stats), continuous_s = median_s(continuous, args.repeats)
    assert (fixed.tokens_BN == flowing.tokens_BN).all(), "the engines drew different tokens"
    hf_lengths, hf_s = median_s(theirs, args.repeats)
    tokens = int(fixed.mask_BN.sum())
    lengths = fixed.mask_BN.sum(axis=1)
    print(
        f"{name}: {len(ids_W)} completions, {args.slots} rows at once, budget {args.max_new_tokens}: "
        f"mean length {lengths.mean():.1f} (transformers {hf_lengths.mean():.1f}), "
        f"{np.mean(lengths >= args.max_new_tokens):.0%} at the budget"
    )
    print(
        f"  static {tokens / static_s:,.0f} tok/s, continuous {tokens / continuous_s:,.0f} tok/s, "
        f"transformers {hf_lengths.sum() / hf_s:,.0f} tok/s; continuous / static = {static_s / continuous_s:.2f}x "
        f"(goal >= 2x), continuous / transformers = {(tokens / continuous_s) / (hf_lengths.sum() / hf_s):.2f}x "
        "(goal >= 3x)"
    )
    print(
        f"  engine: slot utilisation {stats.utilisation:.0%}, {stats.decode_steps} decode steps, "
        f"{stats.admissions} admissions, {stats.prefilled} prompts prefilled for {stats.items} rows "
        f"({1 - stats.prefilled / stats.items:.0%} prefill saved), prefill shapes {sorted(stats.prefill_shapes)}"
    )


def main() -> None:
    args = parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {args.device}, float32")
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    eos, pad = stop_ids(tokenizer)
    ids, mask, sample_ids = tiny_math_prompts(tokenizer, args.prompts)
    bench("tiny-math", ASSETS / "model", ids, mask, sample_ids, eos, pad, args)

    config = transformers.Qwen2Config.from_pretrained(ASSETS / "model")
    torch.manual_seed(0)
    random_model = transformers.Qwen2ForCausalLM(config)
    stops = list(range(config.vocab_size - round(config.vocab_size / 90), config.vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        random_model.save_pretrained(tmp)
        bench("geometric", Path(tmp), ids, mask, sample_ids, stops, pad, args)


if __name__ == "__main__":
    main()
