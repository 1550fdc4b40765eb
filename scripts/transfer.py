"""Cross-model transfer: a plan built from model A's SAE features trains model B (another size, or another
family), against B's vanilla (shuffled) GRPO run, on the same budget over seeds.

    python scripts/transfer.py [--direction down|up] [--model-b DIR] [--seeds 0 1 2] [--out runs/transfer]

--direction down (default): model A is --model (default: the shipped tiny-math model) with its SAE --sae,
and model B a smaller tiny-math Qwen2 (default 2 layers, width 96) trained here, or --model-b.
--direction up, the paper's way round: model A is the smaller Qwen2 trained here, with an SAE trained here
on its residual stream (saerl train-sae on the training pool), and model B is --model (or --model-b).
--small-vocab-size gives the small model a BPE tokenizer of its own (another model family: another
vocabulary; plans are over problem ids, so no token carries over).

The small model learns by the project's SFT for --sft-steps steps (about 0.35 s a step on a 2-core CPU, so
the default 1500 steps take some 9 minutes; 400 steps gave 10% held-out greedy accuracy) and is saved under
OUT/model-b (down) or OUT/model-a (up), its SAE under OUT/model-a-sae; both are reused on reruns with the
same settings (the SFT has no mid-run checkpoint: an interrupted SFT starts over; the SAE resumes).

A GRPO seed varies the rollout sampling, the vanilla arm's shuffle order and the Avg@k sampling; the
plan is fixed by --plan-seed. Rerunning the same command skips finished runs and resumes the others.
Writes OUT/results.json, OUT/results.md (with paired differences to vanilla) and OUT/curves.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.experiments import SmallModel, SmallSAE, TransferConfig, run_transfer
from saerl_jax.experiments.cli import add_study_args, study_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser, out=Path("runs/transfer"))
    group = parser.add_argument_group("direction")
    group.add_argument(
        "--direction", choices=["down", "up"], default="down", help="down: A is --model; up: A is trained here"
    )
    group.add_argument("--model-b", type=Path, help="model B, an HF Qwen2 directory (default: see --direction)")
    d = SmallModel()
    group = parser.add_argument_group("the small model trained here (B when down, A when up)")
    group.add_argument("--small-layers", "--b-layers", dest="layers", type=int, default=d.layers, help="blocks")
    group.add_argument(
        "--small-hidden-size", "--b-hidden-size", dest="hidden_size", type=int, default=d.hidden_size, help="width"
    )
    group.add_argument(
        "--small-intermediate-size", "--b-intermediate-size", dest="intermediate_size", type=int, help="MLP width"
    )
    group.add_argument("--small-heads", "--b-heads", dest="heads", type=int, default=d.heads, help="attention heads")
    group.add_argument(
        "--small-kv-heads", "--b-kv-heads", dest="kv_heads", type=int, default=d.kv_heads, help="key/value heads"
    )
    group.add_argument(
        "--small-vocab-size", dest="vocab_size", type=int, help="own BPE tokenizer of this size (default: shared)"
    )
    group.add_argument("--sft-steps", type=int, default=d.steps, help="SFT steps (default: %(default)s)")
    group.add_argument("--sft-problems", type=int, default=d.problems, help="generated SFT problems")
    group.add_argument("--sft-batch-size", type=int, default=d.batch_size, help="SFT sequences per step")
    group.add_argument("--sft-lr", type=float, default=d.lr, help="SFT peak learning rate (default: %(default)s)")
    group.add_argument("--sft-seed", type=int, default=d.seed, help="initialisation and batch-order seed")
    s = SmallSAE()
    group = parser.add_argument_group("the small model's SAE (--direction up)")
    group.add_argument("--small-sae-layer", type=int, help="residual stream after this many blocks (default: last - 1)")
    group.add_argument("--small-sae-latents", type=int, help="latents (default: 8 x width)")
    group.add_argument("--small-sae-k", type=int, default=s.k, help="active latents per token (default: %(default)s)")
    group.add_argument("--small-sae-steps", type=int, default=s.steps, help="optimizer steps (default: %(default)s)")
    group.add_argument("--small-sae-batch-size", type=int, default=s.batch_size, help="activations per step")
    args = parser.parse_args(argv)
    small = SmallModel(
        layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or d.intermediate_size,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        steps=args.sft_steps,
        problems=args.sft_problems,
        batch_size=args.sft_batch_size,
        lr=args.sft_lr,
        seed=args.sft_seed,
    )
    small_sae = SmallSAE(
        layer=args.small_sae_layer,
        d_sae=args.small_sae_latents,
        k=args.small_sae_k,
        steps=args.small_sae_steps,
        batch_size=args.small_sae_batch_size,
        seed=args.plan_seed,
    )
    run_transfer(
        TransferConfig(
            **study_options(args),
            direction=args.direction,
            model_b=args.model_b,
            small=small,
            small_sae=small_sae,
        )
    )


if __name__ == "__main__":
    main()
