"""Vanilla GRPO (whole pool, and the filtered pool) vs external-difficulty curriculum vs SAERL plan vs
dense-hidden-state plan, over seeds.

    python scripts/compare_samplers.py [--seeds 0 1 2] [--steps 200] [--out runs/compare_samplers]

Every arm gets the same GRPO budget (steps, batch, G, learning rate). The SAE and dense feature stores
and the two plans are built once under OUT (the demo's tiny-math engineering defaults: 32 clusters, plan
batch = GRPO batch) unless --store / --dense-store / --plan / --dense-plan are given. Reported per arm,
over seeds (mean, std, min, max): held-out greedy accuracy vs step (step 0 = the base model), the final
Avg@k and Pass@k, and the steps to reach the target accuracy.

A GRPO seed varies the rollout sampling, the vanilla arm's shuffle order and the Avg@k sampling; the
plans are fixed by --plan-seed. Rerunning the same command skips finished runs and resumes the others.
Writes OUT/results.json, OUT/results.md (with paired differences to vanilla), OUT/curves.png and
OUT/paired.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.experiments import ARMS, CompareConfig, run_compare
from saerl_jax.experiments.cli import add_study_args, study_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser, out=Path("runs/compare_samplers"))
    group = parser.add_argument_group("arms")
    group.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    group.add_argument("--dense-store", type=Path, help="dense feature store (default: built under OUT/stores)")
    group.add_argument("--plan", type=Path, help="SAERL plan.json or its directory (default: built)")
    group.add_argument("--dense-plan", type=Path, help="dense-state plan.json or its directory (default: built)")
    args = parser.parse_args(argv)
    run_compare(
        CompareConfig(
            **study_options(args),
            arms=tuple(args.arms),
            dense_store=args.dense_store,
            plan=args.plan,
            dense_plan=args.dense_plan,
        )
    )


if __name__ == "__main__":
    main()
