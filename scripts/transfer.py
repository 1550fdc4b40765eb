"""Cross-model transfer: a plan built from model A's SAE features trains model B (another size), against
B's vanilla (shuffled) GRPO run, on the same budget over seeds.

    python scripts/transfer.py [--model-b DIR] [--seeds 0 1 2] [--out runs/transfer]

Model A is --model (default: the shipped tiny-math model) with its SAE --sae; its SAE feature store and
plan are built once under OUT unless --store is given. Model B is --model-b; without it, a smaller
tiny-math Qwen2 (default 2 layers, width 96) is trained once by the project's SFT for --sft-steps steps
(about 0.35 s a step on a 2-core CPU, so the default 1500 steps take some 9 minutes; 400 steps gave 10%
held-out greedy accuracy) and saved under OUT/model-b, reused on reruns with the same settings (the SFT
has no mid-run checkpoint: an interrupted SFT starts over). Model B must share A's tokenizer.

A GRPO seed varies the rollout sampling, the vanilla arm's shuffle order and the Avg@k sampling; the
plan is fixed by --plan-seed. Rerunning the same command skips finished runs and resumes the others.
Writes OUT/results.json, OUT/results.md and OUT/curves.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.experiments import SmallModel, TransferConfig, run_transfer
from saerl_jax.experiments.cli import add_study_args, study_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser, out=Path("runs/transfer"))
    d = SmallModel()
    group = parser.add_argument_group("model B")
    group.add_argument("--model-b", type=Path, help="model B, an HF Qwen2 directory (default: trained by SFT here)")
    group.add_argument("--b-layers", type=int, default=d.layers, help="model B blocks (default: %(default)s)")
    group.add_argument("--b-hidden-size", type=int, default=d.hidden_size, help="model B width (default: %(default)s)")
    group.add_argument("--b-intermediate-size", type=int, default=d.intermediate_size, help="model B MLP width")
    group.add_argument("--b-heads", type=int, default=d.heads, help="model B attention heads")
    group.add_argument("--b-kv-heads", type=int, default=d.kv_heads, help="model B key/value heads")
    group.add_argument("--sft-steps", type=int, default=d.steps, help="model B SFT steps (default: %(default)s)")
    group.add_argument("--sft-problems", type=int, default=d.problems, help="generated SFT problems")
    group.add_argument("--sft-batch-size", type=int, default=d.batch_size, help="SFT sequences per step")
    group.add_argument("--sft-lr", type=float, default=d.lr, help="SFT peak learning rate (default: %(default)s)")
    group.add_argument("--sft-seed", type=int, default=d.seed, help="model B initialisation and batch-order seed")
    args = parser.parse_args(argv)
    small = SmallModel(
        layers=args.b_layers,
        hidden_size=args.b_hidden_size,
        intermediate_size=args.b_intermediate_size,
        heads=args.b_heads,
        kv_heads=args.b_kv_heads,
        steps=args.sft_steps,
        problems=args.sft_problems,
        batch_size=args.sft_batch_size,
        lr=args.sft_lr,
        seed=args.sft_seed,
    )
    run_transfer(TransferConfig(**study_options(args), model_b=args.model_b, small=small))


if __name__ == "__main__":
    main()
