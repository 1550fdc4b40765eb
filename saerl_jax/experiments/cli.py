"""Command-line options the experiment scripts share, and their conversion to configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.experiments.inputs import N_CLUSTERS, Sources
from saerl_jax.experiments.runs import Budget


def add_source_args(parser: argparse.ArgumentParser, *, out: Path) -> None:
    """``--out``, the model / SAE / data locations and ``--feature-problems``."""
    group = parser.add_argument_group("inputs")
    group.add_argument("--out", type=Path, default=out, help="experiment directory (default: %(default)s)")
    group.add_argument("--assets", type=Path, default=ASSETS, help="tiny-math directory (default: %(default)s)")
    group.add_argument("--model", type=Path, help="HF Qwen2 directory (default: ASSETS/model)")
    group.add_argument("--sae", type=Path, help="SAE directory, SAELens layout (default: ASSETS/sae)")
    group.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: ASSETS/tokenizer)")
    group.add_argument("--problems", type=Path, help="training pool (default: ASSETS/problems.jsonl)")
    group.add_argument("--eval-data", type=Path, help="held-out problems (default: ASSETS/eval.jsonl)")
    group.add_argument(
        "--feature-problems",
        type=int,
        help="use only the first N pool problems, for the feature stores and for training (default: all)",
    )
    group.add_argument("--extract-batch-size", type=int, default=64, help="sequences per extraction batch")
    group.add_argument("--store", type=Path, help="SAE feature store of the pool (default: built under OUT/stores)")


def add_study_args(parser: argparse.ArgumentParser, *, out: Path) -> None:
    """Everything :class:`~saerl_jax.experiments.config.StudyConfig` takes."""
    add_source_args(parser, out=out)
    b = Budget()
    group = parser.add_argument_group("RL budget (the same for every arm) and evaluation")
    group.add_argument(
        "--algo", choices=["grpo", "ppo", "dpo"], default=b.algo, help="RL algorithm of every arm (%(default)s)"
    )
    group.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GRPO seeds (default: 0 1 2)")
    group.add_argument("--steps", type=int, default=b.steps, help="GRPO steps per run (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=b.batch_size, help="prompts per step and plan batch size")
    group.add_argument("--generations", type=int, default=b.num_generations, help="completions per prompt (G)")
    group.add_argument("--lr", type=float, default=b.learning_rate, help="learning rate (default: %(default)s)")
    group.add_argument(
        "--beta", type=float, default=b.beta, help="GRPO's KL weight, PPO's kl_coef, DPO's beta (%(default)s)"
    )
    group.add_argument("--max-prompt-length", type=int, default=b.max_prompt_length, help="prompt tokens")
    group.add_argument(
        "--max-completion-length", type=int, default=b.max_completion_length, help="completion tokens, also in eval"
    )
    group.add_argument(
        "--eval-steps", type=int, default=b.eval_steps, help="held-out greedy accuracy every N steps (and at the end)"
    )
    group.add_argument("--eval-limit", type=int, default=b.eval_limit, help="held-out problems (default: %(default)s)")
    group.add_argument("--k", type=int, default=b.k, help="final Avg@k / Pass@k samples (default: %(default)s)")
    group.add_argument(
        "--temperature", type=float, default=b.temperature, help="final Avg@k temperature (default: %(default)s)"
    )
    group.add_argument("--target", type=float, help="target held-out accuracy in [0, 1] (default: base + 0.02)")
    group = parser.add_argument_group("data engineering and running")
    group.add_argument("--n-clusters", type=int, default=N_CLUSTERS, help="plan clusters (default: %(default)s)")
    group.add_argument("--plan-seed", type=int, default=0, help="feature extraction and engineer seed (fixed)")
    group.add_argument("--reward-workers", type=int, default=1, help="grading processes; 0 grades in-process")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def sources_from(args: argparse.Namespace) -> Sources:
    """The :class:`Sources` of :func:`add_source_args`' options."""
    return Sources(
        assets=args.assets,
        model=args.model,
        sae=args.sae,
        tokenizer=args.tokenizer,
        problems=args.problems,
        eval_data=args.eval_data,
        feature_problems=args.feature_problems,
        extract_batch_size=args.extract_batch_size,
    )


def study_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`~saerl_jax.experiments.config.StudyConfig` from :func:`add_study_args`."""
    budget = Budget(
        algo=args.algo,
        steps=args.steps,
        batch_size=args.batch_size,
        num_generations=args.generations,
        learning_rate=args.lr,
        beta=args.beta,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        eval_steps=args.eval_steps,
        eval_limit=args.eval_limit,
        k=args.k,
        temperature=args.temperature,
    )
    return {
        "out": args.out,
        "sources": sources_from(args),
        "budget": budget,
        "seeds": tuple(args.seeds),
        "target": args.target,
        "store": args.store,
        "n_clusters": args.n_clusters,
        "plan_seed": args.plan_seed,
        "reward_workers": args.reward_workers,
        "progress": not args.quiet,
    }
