"""Trains the tiny-math Qwen2 by supervised fine-tuning in JAX and saves it as a Hugging Face directory.

    python scripts/train_tinymath_sft.py [--assets assets/tiny-math] [--steps 2000] [--stop-at 0.45]

Training stops at the first evaluation whose greedy accuracy on the first ``--eval-slice`` problems of
``eval.jsonl`` reaches ``--stop-at``, so the model solves some problems but not all (room for RL). The
model goes to ``ASSETS/model`` (config.json + model.safetensors); ``ASSETS/model/sft_report.json`` holds
the settings, the loss curve, every evaluation and the final accuracy by topic and difficulty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from saerl_jax import sft
from saerl_jax.data import load_tokenizer
from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2, save_pretrained


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_group(rows: list[dict], rewards: list[float], key) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for row, reward in zip(rows, rewards, strict=True):
        groups.setdefault(key(row), []).append(reward)
    return {name: round(float(np.mean(v)), 4) for name, v in sorted(groups.items())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=Path("assets/tiny-math"), help="tiny-math directory")
    parser.add_argument("--n-sft", type=int, default=20_000, help="generated SFT problems (seed 2, no noise)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000, help="most optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-slice", type=int, default=256, help="eval.jsonl rows checked while training")
    parser.add_argument("--stop-at", type=float, default=0.45, help="stop once the slice accuracy reaches this")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(args.assets / "tokenizer")
    held_out = read_jsonl(args.assets / "eval.jsonl")
    rows = sft.tinymath_sft_rows(args.n_sft)
    cfg = sft.SFTConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    data = sft.tokenize_sft(tokenizer, rows, cfg.seq_len)
    config = sft.small_qwen2_config(
        len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
    )
    model = Qwen2(config, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"tiny-math Qwen2: {n_params:,} parameters, {len(rows)} SFT problems", flush=True)

    def evaluate(model, step):
        accuracy, _ = sft.greedy_accuracy(model, tokenizer, held_out[: args.eval_slice])
        print(f"step {step}: greedy accuracy {accuracy:.3f} on {args.eval_slice} held-out problems", flush=True)
        return "stop" if accuracy >= args.stop_at else accuracy

    started = time.perf_counter()
    losses, evaluations = sft.train(model, data, cfg, evaluate=evaluate, eval_every=args.eval_every)
    minutes = (time.perf_counter() - started) / 60
    accuracy, rewards = sft.greedy_accuracy(model, tokenizer, held_out)
    out = save_pretrained(model, args.assets / "model")
    report = {
        "command": " ".join(["python", "scripts/train_tinymath_sft.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sft_config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "steps_run": len(losses),
        "minutes": round(minutes, 1),
        "loss_every_50_steps": [round(x, 4) for x in losses[::50]],
        "evaluations": {str(k): v for k, v in evaluations.items()},
        "eval_accuracy": round(accuracy, 4),
        "eval_slice_accuracy": round(float(np.mean(rewards[: args.eval_slice])), 4),
        "accuracy_by_topic": by_group(held_out, rewards, lambda r: r["topic"].split(" -> ")[-1]),
        "accuracy_by_difficulty": by_group(held_out, rewards, lambda r: f"{min(int(r['difficulty']) // 2 * 2, 8)}+"),
    }
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / "sft_report.json", lambda tmp: Path(tmp).write_text(text))
    print(json.dumps({k: report[k] for k in ("eval_accuracy", "accuracy_by_topic", "accuracy_by_difficulty")}))
    print(f"wrote {out} ({len(losses)} steps, {minutes:.1f} min)")


if __name__ == "__main__":
    main()
