"""The ``saerl`` command: parses options (YAML config file, then flags) and calls the library.

A user error (:class:`~saerl_jax.errors.UserError`, or a missing / unreadable file) ends the command with one
line ``saerl <command>: error: ...`` on stderr and exit status 1; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from rl.config import ALGOS, ROLLOUT_ENGINES, GRPOConfig, field_docs
from rl.evaluate import EvalJob, run_eval
from rl.trainer import TrainJob, run_train
from sae.job import TrainSAEJob, run_train_sae
from saerl_jax.demo import DemoConfig, run_demo
from saerl_jax.engineering.planner import MIXING_MODES
from saerl_jax.engineering.report import render_report
from saerl_jax.engineering.run import EngineerJob, run_engineer
from saerl_jax.errors import UserError
from saerl_jax.features.extract import ExtractJob, run_extract
from saerl_jax.precision import DTYPES

# Errors that are the user's to fix: reported in one line unless --debug.
_USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML file whose keys set this command's options; flags given here override it"
    )


def _demo_parser(sub) -> None:
    d = DemoConfig
    p = sub.add_parser("demo", help="run the SAERL pipeline on the embedded tiny-math world")
    _add_config_option(p)
    p.add_argument("--out", type=Path, default=d.out, help="output directory (default: %(default)s)")
    p.add_argument("--assets", type=Path, default=d.assets, help="tiny-math directory (default: the shipped one)")
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory (default: ASSETS/model)")
    p.add_argument("--sae", type=Path, help="SAE directory, SAELens layout (default: ASSETS/sae)")
    p.add_argument("--problems", type=int, default=d.problems, help="pool problems encoded (%(default)s)")
    p.add_argument("--feature-problems", type=int, help="pool problems in the feature store (default: all)")
    p.add_argument("--eval-problems", type=int, default=d.eval_problems, help="held-out problems (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per batch (%(default)s)")
    p.add_argument("--n-clusters", type=int, default=d.n_clusters, help="feature-space clusters (%(default)s)")
    p.add_argument("--plan-batch-size", type=int, default=d.plan_batch_size, help="curriculum batch (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.add_argument("--grpo-steps", type=int, default=d.grpo_steps, help="GRPO steps on the plan, 0 skips (%(default)s)")
    p.add_argument("--grpo-batch-size", type=int, default=d.grpo_batch_size, help="prompts per step (%(default)s)")
    p.add_argument("--grpo-generations", type=int, default=d.grpo_generations, help="completions per prompt")
    p.add_argument("--grpo-learning-rate", type=float, default=d.grpo_learning_rate, help="(%(default)s)")
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
    p.add_argument("--param-dtype", choices=DTYPES, default=d.param_dtype, help="SAE master weights (%(default)s)")
    p.add_argument("--compute-dtype", choices=DTYPES, help="matmuls (default: bfloat16 on accelerators, else float32)")

    p.set_defaults(run=lambda args: run_train_sae(_to_config(TrainSAEJob, args)))


def _extract_parser(sub) -> None:
    d = ExtractJob
    p = sub.add_parser("extract", help="pool SAE codes of a model's layer activations into a feature store")
    _add_config_option(p)
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory")
    p.add_argument("--data", type=Path, help="problems, .jsonl or .parquet (DeepMath-103K schema)")
    p.add_argument("--out", type=Path, help="feature store directory")
    p.add_argument("--sae", type=Path, help="SAE directory (SAELens layout)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    p.add_argument("--layer", type=int, help="capture layer (default: the SAE's hook_layer)")
    p.add_argument("--dense", action="store_true", help="pool dense hidden states instead of SAE codes")
    p.add_argument("--n-latents", type=int, default=d.n_latents, help="most frequent latents kept (%(default)s)")
    p.add_argument("--latent-ids", type=Path, help="JSON list of latent ids to keep instead")
    p.add_argument("--selection-sample", type=int, help="count latent frequencies on this many problems (all)")
    p.add_argument(
        "--prompt-span",
        choices=["question", "template"],
        default=d.prompt_span,
        help="prompt tokens pooled: the question's own, or the whole chat template (%(default)s)",
    )
    p.add_argument("--solution-field", default=d.solution_field, help="solution pooled (%(default)s)")
    p.add_argument("--max-solution-tokens", type=int, default=d.max_solution_tokens, help="(%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per batch (%(default)s)")
    p.add_argument("--part-size", type=int, default=d.part_size, help="samples per store part (%(default)s)")
    p.add_argument("--outlier-factor", type=float, default=d.outlier_factor, help="norm/median cut (%(default)s)")
    p.add_argument("--num-shards", type=int, help="workers sharing the store (default: JAX process count)")
    p.add_argument("--shard-index", type=int, help="this worker (default: JAX process index)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid rows (reported) instead of stopping")
    p.add_argument("--column", action="append", default=[], help="FIELD=COLUMN mapping, repeatable")
    p.add_argument("--seed", type=int, default=d.seed, help="selection sample seed (%(default)s)")
    p.set_defaults(run=lambda args: run_extract(_to_config(ExtractJob, args)))


def _engineer_parser(sub) -> None:
    d = EngineerJob
    p = sub.add_parser("engineer", help="quality filter, clusters, difficulty and a curriculum plan from a store")
    _add_config_option(p)
    p.add_argument("--store", type=Path, help="feature store directory (saerl extract)")
    p.add_argument("--data", type=Path, help="the problems file the store was made from (labels)")
    p.add_argument("--out", type=Path, help="output directory (plan.json, report.json, plan.png)")
    p.add_argument("--n-clusters", type=int, default=d.n_clusters, help="clusters (%(default)s)")
    p.add_argument("--n-labelled", type=int, default=d.n_labelled, help="difficulty labels used (%(default)s)")
    p.add_argument(
        "--n-quality-labelled",
        type=int,
        default=d.n_quality_labelled,
        help="rows whose noise label fits the quality filter, which is applied to the rest (%(default)s)",
    )
    p.add_argument(
        "--max-labelled-fraction",
        type=float,
        default=d.max_labelled_fraction,
        help="cap on each labelled subset (quality, difficulty) as a share of its pool, 1 lifts it (%(default)s)",
    )
    p.add_argument("--difficulty", choices=["sae", "external"], default=d.difficulty, help="(%(default)s)")
    p.add_argument("--quality-threshold", type=float, default=d.quality_threshold, help="(%(default)s)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="no quality filter: every row is planned")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="ids per plan batch; must equal the trainer's global batch size, saerl train --batch-size (%(default)s)",
    )
    p.add_argument("--n-stages", type=int, default=d.n_stages, help="curriculum stages (%(default)s)")
    p.add_argument(
        "--mixing-ratio",
        type=float,
        default=d.mixing_ratio,
        help="share of each cluster batch mixed; 0: no-mixing ablation (%(default)s)",
    )
    p.add_argument(
        "--mixing",
        choices=list(MIXING_MODES),
        default=d.mixing,
        help="pairs: swap with the neighbouring cluster batch (ratio <= 0.5); pooled: a stage-wide pool dealt "
        "back at random (ratio <= 1; 1 = stage-random batches) (%(default)s)",
    )
    p.add_argument(
        "--no-sort",
        dest="sort",
        action="store_false",
        help="ablation: no easy-to-hard order at all (random stages and order); clusters and mixing stay",
    )
    p.add_argument(
        "--no-cluster",
        dest="cluster",
        action="store_false",
        help="ablation: no cluster batches (so no mixing); difficulty stages and order stay",
    )
    p.add_argument(
        "--order",
        choices=["curriculum", "random"],
        default=d.order,
        help="random: the vanilla baseline, one seeded shuffle of the kept rows (%(default)s)",
    )
    p.add_argument("--no-probes", dest="probes", action="store_false", help="skip the probe report")
    p.add_argument("--probe-sample", type=int, default=d.probe_sample, help="rows the probes use (%(default)s)")
    p.add_argument("--dense-store", type=Path, help="a saerl extract --dense store to probe beside the SAE codes")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid problem rows, as saerl extract does")
    p.add_argument("--column", action="append", default=[], help="FIELD=COLUMN mapping as in saerl extract, repeatable")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.set_defaults(run=lambda args: run_engineer(_to_config(EngineerJob, args)))


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="render a plan directory as report.md with plots")
    _add_config_option(p)
    p.add_argument("--plan", type=Path, required=True, help="directory with plan.json (and report.json)")
    p.set_defaults(run=lambda args: print(f"wrote {render_report(args.plan)}"))


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="GRPO / DAPO / PPO / DPO training of a Qwen2 model on a problem file")
    _add_config_option(p)
    p.add_argument("--algo", choices=sorted(ALGOS), default="grpo", help="algorithm and its defaults (%(default)s)")
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory: the initial policy")
    p.add_argument("--data", type=Path, help="training problems, .jsonl or .parquet (DeepMath-103K schema)")
    p.add_argument("--out", type=Path, help="run directory (checkpoints, metrics.jsonl, tensorboard/, hf/)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    p.add_argument(
        "--sampler",
        choices=["plan", "shuffle", "difficulty"],
        default="shuffle",
        help="prompt order: SAERL plan, seeded shuffle (vanilla GRPO) or the data's difficulty (%(default)s)",
    )
    p.add_argument("--plan", type=Path, help="plan.json or its directory (saerl engineer), for --sampler plan")
    p.add_argument("--eval-data", type=Path, help="held-out problems for greedy accuracy")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid rows (reported) instead of stopping")
    p.add_argument("--column", action="append", default=[], help="FIELD=COLUMN mapping, repeatable")
    p.add_argument(
        "--mesh",
        type=int,
        nargs=3,
        default=[-1, 1, 1],
        metavar=("DATA", "FSDP", "TENSOR"),
        help="device mesh over all devices; -1 fills the data axis (-1 1 1)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the shuffled order (%(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--reward-workers", type=int, default=2, help="grading processes (%(default)s)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="skip TensorBoard output")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process")
    algo = p.add_argument_group("algorithm options (defaults shown per algorithm, e.g. grpo=... dapo=...)")
    defaults = {name: cls() for name, cls in ALGOS.items()}
    for name, doc in _algo_field_docs().items():
        owners = {algo: getattr(config, name) for algo, config in defaults.items() if hasattr(config, name)}
        default = next(iter(owners.values()))
        kind = {bool: _bool, int: int, float: float}.get(type(default), str)
        if name == "epsilon_high":
            kind = float
        shown = " ".join(f"{algo}={value}" for algo, value in owners.items()).replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        algo.add_argument(flag, type=kind, metavar=name.upper(), help=f"{doc} ({shown})")
    p.set_defaults(run=_run_train)


def _algo_field_docs() -> dict[str, str]:
    """Every algorithm's config fields and their doc lines; a field an algorithm documents its own way
    gets each meaning, prefixed by the algorithms it belongs to."""
    meanings: dict[str, dict[str, list[str]]] = {}
    for algo, cls in ALGOS.items():
        for name, doc in field_docs(cls).items():
            meanings.setdefault(name, {}).setdefault(doc, []).append(algo)
    return {
        name: next(iter(docs)) if len(docs) == 1 else " | ".join(f"{'/'.join(a)}: {d}" for d, a in docs.items())
        for name, docs in meanings.items()
    }


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _run_train(args: argparse.Namespace) -> None:
    if args.coordinator is not None:
        from rl.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    overrides = {name: getattr(args, name) for name in _algo_field_docs() if getattr(args, name) is not None}
    try:
        config = ALGOS[args.algo](**overrides)
    except ValueError as err:
        raise _as_user_error(err) from err
    job = _to_config(TrainJob, argparse.Namespace(**{**vars(args), "config": config, "mesh": tuple(args.mesh)}))
    summary = run_train(job)
    print(f"wrote {summary['out']} (metrics.jsonl, checkpoints/{', hf/' if 'hf' in summary else ''})")


def _eval_parser(sub) -> None:
    d = EvalJob
    p = sub.add_parser(
        "eval",
        help="Avg@k and Pass@k of a Qwen2 model on local math benchmark files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""benchmarks:
  --bench NAME=FILE         FILE (.jsonl/.json JSON lines, or .parquet) in the layout called NAME:
                            gsm8k, math500, aime24, amc23, minervamath, olympiadbench
  --bench NAME:LAYOUT=FILE  another name for a layout, e.g. --bench math500-hard:math500=hard.jsonl
  --bench NAME=FILE --columns NAME:question=COL,answer=COL[,id=COL]
                            any file, read through a column mapping (the jsonl layout)
example:
  saerl eval --model ckpt/hf --bench gsm8k=gsm8k/test.jsonl --bench aime24=aime.parquet --k 8 --out eval/""",
    )
    _add_config_option(p)
    p.add_argument("--model", type=Path, help="local HF Qwen2 directory")
    p.add_argument("--bench", action="append", help="NAME=FILE or NAME:LAYOUT=FILE, repeatable (see below)")
    p.add_argument("--columns", action="append", default=[], help="NAME:question=COL,answer=COL[,id=COL], repeatable")
    p.add_argument("--out", type=Path, help="output directory (results.json, results.md, samples/, benchmarks/)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    p.add_argument("--k", type=int, default=d.k, help="report Avg@k and Pass@1..Pass@k (%(default)s)")
    p.add_argument("--n", type=int, help="samples per problem, n >= k; Pass@k uses all n (default: k)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(%(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="(%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="completion budget (%(default)s)")
    p.add_argument("--greedy", action="store_true", help="one greedy completion per problem (k = n = 1)")
    p.add_argument("--limit", type=int, help="first problems of each benchmark (default: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="completions decoded at once (%(default)s)")
    p.add_argument(
        "--engine",
        choices=ROLLOUT_ENGINES,
        default=d.engine,
        help="static chunks, or continuous batching over --batch-size slots; the same tokens (%(default)s)",
    )
    p.add_argument("--reward-workers", type=int, default=d.reward_workers, help="grading processes (%(default)s)")

    def run(args: argparse.Namespace) -> None:
        try:
            results = run_eval(_to_config(EvalJob, args))
        except ValueError as err:  # bad options or benchmark files (errors name the file, row and field)
            raise _as_user_error(err) from err
        print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} ({len(results['benchmarks'])} benchmarks)")

    p.set_defaults(run=run)


def _plan_memory_parser(sub) -> None:
    p = sub.add_parser(
        "plan-memory", help="compile the train step and rollout from abstract shapes and report bytes per device"
    )
    _add_config_option(p)
    p.add_argument("--model-config", type=Path, help="HF config.json of the model (or its directory); no weights")
    p.add_argument("--devices", type=int, default=1, help="devices simulated on the host CPU (%(default)s)")
    p.add_argument("--mesh", type=int, nargs=3, default=[-1, 1, 1], metavar=("DATA", "FSDP", "TENSOR"))
    p.add_argument("--algo", choices=["dapo", "grpo"], default="grpo", help="algorithm and its defaults (%(default)s)")
    p.add_argument("--param-dtype", default="float32", help="parameter dtype (%(default)s)")
    p.add_argument("--compile-layers", type=int, default=0, help="compile k and 2k layers, extrapolate (0: all)")
    p.add_argument(
        "--device-memory",
        nargs="+",
        default=[],
        help="memory of one device, e.g. 80GB (or several sizes): also search the cheapest settings that fit",
    )
    p.add_argument(
        "--search-meshes", action="store_true", help="with --device-memory, try other mesh layouts too (slower)"
    )
    options = ("batch_size", "num_generations", "max_prompt_length", "max_completion_length")
    options += ("gradient_accumulation_steps", "rollout_batch_size", "beta", "num_iterations", "logprob_chunk")
    options += ("attention_chunk", "compute_dtype", "reference_dtype", "cache_dtype")
    docs = field_docs(GRPOConfig)
    for name in (*options, "remat"):
        kind = _bool if name == "remat" else str if name.endswith("_dtype") else type(getattr(GRPOConfig(), name))
        p.add_argument("--" + name.replace("_", "-"), type=kind, metavar=name.upper(), help=docs[name])

    def run(args: argparse.Namespace) -> None:
        from rl.memory import MemoryPlanJob, run_plan_memory

        chosen = {name: getattr(args, name) for name in (*options, "remat") if getattr(args, name) is not None}
        try:
            config = ALGOS[args.algo](**chosen)
            job = _to_config(
                MemoryPlanJob, argparse.Namespace(**{**vars(args), "config": config, "mesh": tuple(args.mesh)})
            )
            print(run_plan_memory(job), end="")
        except ValueError as err:
            raise _as_user_error(err) from err

    p.set_defaults(run=run)


def _to_config(cls, args: argparse.Namespace):
    """The command's dataclass from parsed options; a required option given nowhere is an error."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if getattr(args, name, None) is None]
    if missing:
        options = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UserError(f"missing required option(s) {options} (flag or --config file)")
    values = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ValueError as err:  # the options' own checks (__post_init__)
        raise _as_user_error(err) from err


def _as_user_error(err: ValueError) -> UserError:
    """``err`` itself if it is a :class:`UserError`, else one with its message."""
    return err if isinstance(err, UserError) else UserError(str(err))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saerl", description="SAE-guided data engineering for RL post-training")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _train_sae_parser(sub)
    _extract_parser(sub)
    _engineer_parser(sub)
    _report_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _plan_memory_parser(sub)
    for subparser in sub.choices.values():  # --config sets its defaults on the command's own parser
        subparser.set_defaults(subparser=subparser)
        # SUPPRESS: when not given after the command, the global --debug's value stands.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``saerl``; a user error raises ``SystemExit`` with its one-line message (exit status 1)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.config is not None:
        args = _apply_config_file(parser, argv, args)
    try:
        args.run(args)
    except _USER_ERRORS as err:
        if args.debug:
            raise
        raise SystemExit(f"saerl {args.command}: error: {_one_line(err)}") from None
    return 0


def _one_line(err: Exception) -> str:
    """The error's message on one line; an ``OSError`` from ``open`` says which file."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        text = f"{err.filename}{target}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines())


def _apply_config_file(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> argparse.Namespace:
    """Re-parses ``argv`` with the YAML file ``args.config``'s keys as defaults, so explicit flags win."""
    path = args.config
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    # Every option of the command has its dest in the namespace; these are the parser's own bookkeeping.
    known = set(vars(args)) - {"command", "config", "subparser", "run", "debug"}
    unknown = sorted(k.replace("-", "_") for k in values if k.replace("-", "_") not in known)
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    args.subparser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
