"""The ``saerl`` command: parses options (YAML config file, then flags) and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from sae.job import TrainSAEJob, run_train_sae
from saerl_jax.demo import DemoConfig, run_demo


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML file whose keys set this command's options; flags given here override it"
    )


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded default")
    _add_config_option(p)
    p.add_argument("--out", type=Path, default=DemoConfig.out, help="output directory (default: %(default)s)")
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory (default: a random Qwen2.5-Math-shaped model)")
    p.add_argument("--layer", type=int, help="layer whose residual stream is captured (default: num_layers - 1)")
    p.add_argument("--batch-size", type=int, default=DemoConfig.batch_size, help="prompts per batch (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DemoConfig.max_new_tokens, help="sampled tokens (%(default)s)")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="random seed (%(default)s)")
    p.set_defaults(run=lambda args: run_demo(_to_config(DemoConfig, args)))


def _train_sae_parser(sub) -> None:
    d = TrainSAEJob
    p = sub.add_parser("train-sae", help="train a sparse autoencoder on a Qwen2 model's layer activations")
    _add_config_option(p)
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory")
    p.add_argument("--layer", type=int, help="capture layer L (output_hidden_states[L])")
    p.add_argument("--data", type=Path, help=".txt (a document per line) or .jsonl (text or question)")
    p.add_argument("--out", type=Path, help="output directory (SAELens files, metrics.json)")
    p.add_argument("--activations", type=Path, help="train on cached *.npy activation shards from this directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    p.add_argument("--architecture", choices=["topk", "batchtopk", "relu", "jumprelu"], default=d.architecture)
    p.add_argument("--d-sae", type=int, help="number of latents (default: 8 x hidden size)")
    p.add_argument("--k", type=int, default=d.k, help="active latents per token, topk/batchtopk (%(default)s)")
    p.add_argument("--no-normalize", dest="normalize_activations", action="store_false", help="no input scaling")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="activations per step (%(default)s)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 / sqrt(d_sae / 16384))")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens kept per document (%(default)s)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="held-out documents (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")

    p.set_defaults(run=lambda args: run_train_sae(_to_config(TrainSAEJob, args)))


def _to_config(cls, args: argparse.Namespace):
    """The command's dataclass from parsed options; a required option given nowhere is an error."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if getattr(args, name, None) is None]
    if missing:
        options = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise SystemExit(f"saerl {args.command}: missing required option(s) {options} (flag or --config file)")
    return cls(**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saerl", description="SAE-guided data engineering for RL post-training")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _train_sae_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.config is not None:
        args = _apply_config_file(parser, argv, args.config)
    args.run(args)
    return 0


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str], path: Path) -> argparse.Namespace:
    """Re-parses ``argv`` with the YAML file's keys as defaults, so explicit flags win."""
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    subparser = parser._subparsers._group_actions[0].choices[argv[0]]
    known = {a.dest for a in subparser._actions}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    subparser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
