"""The ``saerl`` command: parses options (YAML config file, then flags) and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

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


def _to_config(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saerl", description="SAE-guided data engineering for RL post-training")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
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
