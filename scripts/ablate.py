"""Ablations of the SAERL plan: no difficulty sort, no mixing, no clustering, and a mixing-ratio sweep.

    python scripts/ablate.py [--seeds 0 1 2] [--sweep 0 0.1 0.25 0.5] [--out runs/ablate]
    python scripts/ablate.py --mixing pooled      # sweep 0 0.1 0.25 0.5 0.75 1: up to stage-random batches

Every plan is built by saerl engineer from one SAE feature store (built under OUT unless --store is
given) with the full plan's options except the one ablated; every arm gets the same GRPO budget. The
sweep plots each mixing ratio's plan diversity (mean cluster entropy and mean feature diversity per batch,
from Plan.summary()) against its final held-out accuracy (seed mean ± std). Sweep ratios equal to an
ablation (0 = no mixing, the full plan's ratio = the full plan) reuse that arm's runs.

A GRPO seed varies the rollout sampling and the Avg@k sampling; the plans are fixed by --plan-seed.
Rerunning the same command skips finished runs and resumes the others. Writes OUT/results.json,
OUT/results.md (with paired differences to the full plan), OUT/curves.png, OUT/sweep.png and OUT/paired.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.engineering.planner import MIXING_MODES
from saerl_jax.experiments import POOLED_SWEEP, SWEEP, AblateConfig, run_ablate
from saerl_jax.experiments.cli import add_study_args, study_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser, out=Path("runs/ablate"))
    group = parser.add_argument_group("plans")
    group.add_argument("--mixing-ratio", type=float, default=0.25, help="the full plan's mixing ratio (default: 0.25)")
    group.add_argument(
        "--mixing",
        choices=list(MIXING_MODES),
        default="pairs",
        help="pairs: swap with the neighbouring cluster batch (ratios <= 0.5); pooled: a stage-wide pool dealt "
        "back at random (ratios <= 1, 1 = stage-random batches) (default: pairs)",
    )
    group.add_argument(
        "--sweep",
        type=float,
        nargs="+",
        help="mixing ratios of the sweep (default: 0 0.1 0.25 0.5; with --mixing pooled 0 0.1 0.25 0.5 0.75 1)",
    )
    args = parser.parse_args(argv)
    sweep = tuple(args.sweep) if args.sweep else POOLED_SWEEP if args.mixing == "pooled" else SWEEP
    run_ablate(AblateConfig(**study_options(args), mixing_ratio=args.mixing_ratio, sweep=sweep, mixing=args.mixing))


if __name__ == "__main__":
    main()
