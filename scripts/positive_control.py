"""The positive control: SAERL against vanilla GRPO and the paper's baselines in a tiny-math world built so
that a difficulty curriculum and a quality filter must help if they work (saerl_jax.data.control).

    python scripts/positive_control.py [--seeds 0 1 2 3 4] [--steps 150] [--arms ...] [--out runs/positive_control]

Generates the world under OUT/world (2,000 pool rows: 30% plausible wrong answers, 10% off-distribution,
half of the clean rows on a rung the base policy almost never solves; 1,000 clean held-out problems),
measures the planted conditions on the base policy (OUT/conditions.json), builds each arm's inputs once,
then trains every arm seed by seed. Every arm is evaluated on all held-out problems. Tables are rewritten
after every run and say which seeds and arms are done; rerunning the same command resumes. Writes
OUT/results.json, OUT/results.md, OUT/curves.png and OUT/paired.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.experiments.cli import add_study_args, study_options
from saerl_jax.experiments.control import ARMS, ControlConfig, run_control

DEFAULTS = dict(steps=150, eval_steps=50, eval_limit=1000, seeds=[0, 1, 2, 3, 4], lr=5e-5)
"""The control's budget: 150 steps of 8 prompts walk the SAERL plan about once."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(parser, out=Path("runs/positive_control"))
    parser.set_defaults(**DEFAULTS)
    group = parser.add_argument_group("positive control")
    group.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms (default: all)")
    group.add_argument(
        "--reference", choices=list(ARMS), default="vanilla", help="the arm the others are paired with (vanilla)"
    )
    group.add_argument("--n-problems", type=int, default=2000, help="pool rows, noise included (%(default)s)")
    group.add_argument("--n-eval", type=int, default=1000, help="clean held-out problems (%(default)s)")
    group.add_argument("--world-seed", type=int, default=0, help="generator seed of the world (%(default)s)")
    group.add_argument("--rollout-k", type=int, default=4, help="samples per problem for base pass rates")
    group.add_argument("--replan-steps", type=int, default=50, help="steps between re-plans (%(default)s)")
    group.add_argument("--no-check", action="store_true", help="train even when a planted condition fails")
    args = parser.parse_args(argv)
    run_control(
        ControlConfig(
            **study_options(args),
            arms=tuple(args.arms),
            reference=args.reference,
            n_problems=args.n_problems,
            n_eval=args.n_eval,
            world_seed=args.world_seed,
            rollout_k=args.rollout_k,
            replan_steps=args.replan_steps,
            check=not args.no_check,
        )
    )


if __name__ == "__main__":
    main()
