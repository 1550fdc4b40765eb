"""Seconds per GRPO, PPO and DPO step of saerl-jax's trainer against TRL's trainers (and Tunix), by default on CPU
in float32.

Both sides train the embedded tiny-math policy (``assets/tiny-math/model``, an 854k-parameter Qwen2) with
the same configuration: ``--batch-size`` prompts per step, ``--num-generations`` (G) completions each of
at most ``--max-completion-length`` tokens at temperature 1 (no top-k / top-p), loss ``grpo`` (per-sequence
mean, symmetric clip ``--epsilon``, k3 KL to the frozen initial policy with weight ``--beta``), group-scaled
advantages, one update per rollout, AdamW (betas 0.9 / 0.99, no weight decay, constant ``--learning-rate``)
after global-norm clipping at 1. The reward is :func:`rl.rewards.math_reward` of the completion against the
problem's ``final_answer``. Both see the same prompts at every step: the first batches of the seeded shuffle
:class:`rl.trainer.Trainer` draws from ``problems.jsonl``, given to TRL as an unshuffled dataset of chat
prompts (system prompt :data:`saerl_jax.data.SYSTEM_PROMPT`) in that order; the benchmark checks that both
graded exactly those prompts at every step.

- Ours: :class:`rl.trainer.Trainer` with a :class:`rl.trainer.TrainJob`, ``run_step()`` in a loop
  (rollout, grading in the trainer's worker processes, reference log-probs, update). Prompts are
  left-padded to one fixed width (the longest prompt used, rounded up to 8), so one compile serves all.
- TRL: ``GRPOTrainer.train()`` on the same Hugging Face directory loaded with transformers (float32, SDPA
  attention), generating with ``model.generate`` (no vLLM), on ``--device`` (``use_cpu=True`` for the CPU),
  no gradient checkpointing, no logging, saving or reporting. A ``TrainerCallback`` times ``on_step_begin``
  -> ``on_step_end``, which holds generation, grading, reference log-probs, forward, backward and the
  optimizer step.
- Tunix (``google-tunix``): timed only if it imports; otherwise the reason is printed.

Each framework runs ``max(--steps + 1, --curve-steps)`` steps once, both in this process with their steps
alternating (TRL's step k, then ours, from a TRL callback), so both see the same background load on a
shared machine; each side's thread pool sleeps while the other runs. The first step (JIT compilation for
us, worker start-up for both) is excluded; the next ``--steps`` are timed and their median is reported, with
completion tokens per second over those steps (EOS included; both sides stop a batch when every row has
ended, so the counts follow what each sampled). The reward curve is the mean math reward of each of the
first ``--curve-steps`` steps; both sides start from the same weights and see the same prompts, so the
curves should agree up to sampling noise. Figures go to ``--out``/grpo.json and the curves to
``--out``/grpo_curves.png. Torch uses ``--threads`` intra-op threads (default: every core, as XLA does).
Both sides keep float32 weights and optimizer state; ``--dtype bfloat16`` computes in bfloat16 on both (our
``compute_dtype``, TRL's ``bf16`` autocast), for accelerators. Run it with::

    .venv/bin/python benchmarks/bench_grpo.py              # defaults: a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_grpo.py --quick      # 2 timed steps, 4 curve steps
    python benchmarks/bench_grpo.py --device cuda --dtype bfloat16   # on a GPU (JAX on its default device)

Then the PPO and DPO rows (``--algos`` picks rows), each ``--steps`` timed after one warm-up, medians, on the
first batches of the same prompts: our PPO step against TRL 1.12's ``PPOTrainer`` (run in ``--trl-ppo-python``
by ``benchmarks/trl_ppo_step.py``; without it, the reason is printed) and our DPO step and update against TRL's
``DPOTrainer``. They live in ``benchmarks/bench_grpo_algos.py``, whose docstring says what each compares; what
the rows share with this one (:class:`grpo_common.Run`, :class:`grpo_common.SaerlSteps`, TRL's step timer, the
timing table) is in ``benchmarks/grpo_common.py``. Their figures go to grpo.json under ``ppo`` and ``dpo``.
"""

from __future__ import annotations

import os

# libgomp reads this when torch loads it; see bench_sae.py: spinning OpenMP workers stall torch for whole
# scheduler slices when other jobs share the cores. Export OMP_WAIT_POLICY=ACTIVE to measure torch spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.metadata
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import matplotlib
import numpy as np
from bench_grpo_algos import report_dpo, report_ppo, run_dpo, run_ppo  # sibling scripts: the PPO and DPO rows
from grpo_common import Run, SaerlSteps, print_split, step_timer, timing_table

from rl.config import DPOConfig, GRPOConfig, PPOConfig
from rl.rewards import math_reward
from saerl_jax.data import SYSTEM_PROMPT, format_example, load_tokenizer
from saerl_jax.data.problems import Problem, load_problems
from saerl_jax.pipeline import ShuffleSampler

if TYPE_CHECKING:
    import trl

# torch, transformers, trl and datasets are imported inside run_trl (and the functions of bench_grpo_algos and
# grpo_common that need them): the trainer grades in spawned worker processes, which re-import this script and
# its sibling modules, and importing TRL costs each of them about 10 s of CPU.

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
QUICK_ARGS = dict(steps=2, curve_steps=4)
TUNIX_CONFLICT = (
    "google-tunix 0.1.7 (the newest release) requires safetensors<0.8, while saerl-jax pins safetensors==0.8.0 "
    "and transformers==5.23.0 (which requires safetensors>=0.8.0); pip reports ResolutionImpossible, or "
    "downgrades transformers to 5.12.1 and safetensors to 0.7.0 when unconstrained"
)
GOAL = 3.0
ALGOS = ("grpo", "ppo", "dpo")


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in :data:`QUICK_ARGS` for the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ASSETS / "model", help="Hugging Face Qwen2 directory")
    parser.add_argument("--tokenizer", type=Path, default=ASSETS / "tokenizer", help="tokenizer directory")
    parser.add_argument("--data", type=Path, default=ASSETS / "problems.jsonl", help="DeepMath-schema problems")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-completion-length", type=int, default=48, help="completion budget in tokens")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="constant AdamW learning rate")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (0: no reference model)")
    parser.add_argument("--epsilon", type=float, default=0.2, help="clip range of the ratio")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after one untimed warm-up step")
    parser.add_argument("--curve-steps", type=int, default=20, help="steps whose mean reward is compared")
    parser.add_argument("--seed", type=int, default=0, help="sampling seeds and the prompt order")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device of TRL")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute, both sides")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="where grpo.json and the plot go")
    parser.add_argument("--skip-trl", action="store_true", help="time saerl-jax alone")
    parser.add_argument("--algos", default=",".join(ALGOS), help="rows to run, comma-separated: grpo, ppo, dpo")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="PPO passes over each rollout batch")
    parser.add_argument("--ppo-mini-batches", type=int, default=1, help="PPO updates per pass")
    parser.add_argument("--trl-ppo-python", type=Path, help="interpreter with TRL 1.12 (see trl_ppo_step.py)")
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (loss sigmoid)")
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK_ARGS)
        args = parser.parse_args()
    if args.steps < 1 or args.curve_steps < 1:
        parser.error("--steps and --curve-steps must be >= 1")
    args.algos = tuple(args.algos.split(","))
    if not args.algos or set(args.algos) - set(ALGOS):
        parser.error(f"--algos takes a comma-separated subset of {', '.join(ALGOS)}, got {','.join(args.algos)}")
    return args


def prompt_batches(problems: dict[str, Problem], batch_size: int, steps: int, seed: int) -> list[list[Problem]]:
    """The first ``steps`` batches the trainer's ``sampler='shuffle'`` draws (as ``rl.trainer`` builds it)."""
    sampler = ShuffleSampler(sorted(problems), batch_size, seed=seed)
    return [[problems[i] for i in sampler.batch(step)] for step in range(steps)]


def make_config(args: argparse.Namespace, prompt_length: int, steps: int) -> GRPOConfig:
    """The shared configuration, as our trainer reads it (TRL's is translated in :func:`trl_config`)."""
    return GRPOConfig(
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_prompt_length=prompt_length,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        loss_type="grpo",
        scale_rewards="group",
        beta=args.beta,
        epsilon=args.epsilon,
        learning_rate=args.learning_rate,
        max_steps=steps,
        save_steps=steps,
        seed=args.seed,
        compute_dtype=args.dtype,
    )


def algo_config(cfg: GRPOConfig, cls: type[GRPOConfig], steps: int, **objective) -> GRPOConfig:
    """``cfg``'s batch, sampling, optimizer and precision under another algorithm, with its ``objective`` fields."""
    shared = ("batch_size", "max_prompt_length", "max_completion_length", "temperature", "learning_rate", "seed")
    shared += ("compute_dtype",)
    return cls(**{name: getattr(cfg, name) for name in shared}, max_steps=steps, save_steps=steps, **objective)


def trl_config(cfg: GRPOConfig, output_dir: str, device: str) -> trl.GRPOConfig:
    """TRL's ``GRPOConfig`` for the same run, training on ``device`` (bfloat16 autocast where we compute in it).

    Batch arithmetic (TRL 1.16, ``GRPOConfig.__post_init__`` and ``GRPOTrainer._get_train_sampler``):
    ``per_device_train_batch_size`` counts completions, not prompts. With ``steps_per_generation`` unset it
    equals ``gradient_accumulation_steps`` (1), so ``generation_batch_size`` = ``per_device_train_batch_size``
    x processes (1) x 1 = ``batch_size * G`` completions of ``batch_size`` prompts, generated and used by one
    optimizer step, as in ours.
    """
    import trl

    return trl.GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.rows,
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps,
        shuffle_dataset=False,
        seed=cfg.seed,
        use_vllm=False,
        use_cpu=device == "cpu",
        bf16=cfg.compute_dtype == "bfloat16",
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def run_trl(
    args: argparse.Namespace, cfg: GRPOConfig, batches: list[list[Problem]], after_step: Callable[[], None]
) -> Run:
    """``GRPOTrainer.train()`` for ``len(batches)`` steps on those prompts, timed by a callback that calls
    ``after_step`` once each step is timed (so the other framework's steps alternate with TRL's)."""
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    run, graded = Run("TRL"), []

    def math_reward_fn(completions, completion_ids, final_answer, problem_id, **kwargs) -> list[float]:
        rewards = [math_reward(c[0]["content"], a) for c, a in zip(completions, final_answer, strict=True)]
        run.rewards.append(float(np.mean(rewards)))
        run.tokens.append(sum(len(ids) for ids in completion_ids))
        graded.append(sorted(set(problem_id)))
        return rewards

    rows = [
        {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p.question}],
            "final_answer": p.final_answer,
            "problem_id": p.id,
        }
        for batch in batches
        for p in batch
    ]
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(args.model.resolve()), dtype=torch.float32)
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=math_reward_fn,
            args=trl_config(cfg, out, args.device),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[step_timer(run, after_step)],
        )
        trainer.train()
    expected = [sorted(p.id for p in batch) for batch in batches]
    assert graded == expected, "TRL graded other prompts than saerl-jax: the batch arithmetic differs"
    return run


def tunix_status() -> str:
    """Why Tunix is not timed (it needs its own runner, added once it installs beside our pins)."""
    try:
        import tunix  # noqa: F401
    except ImportError as error:
        return f"not installed ({error}): {TUNIX_CONFLICT}"
    version = importlib.metadata.version("google-tunix")
    return f"google-tunix {version} imports, but this benchmark has no Tunix runner yet"


def check_prompts(tokenizer_dir: Path, batches: list[list[Problem]]) -> int:
    """Checks our prompt tokens equal TRL's (the chat template on the whole string); returns the longest."""
    tokenizer = load_tokenizer(tokenizer_dir)
    longest, differ = 0, 0
    for problem in (p for batch in batches for p in batch):
        ours = format_example(tokenizer, problem.question).input_ids.tolist()
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]
        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        differ += ours != list(theirs["input_ids"])
        longest = max(longest, len(ours))
    print(f"prompts: {sum(map(len, batches))}, longest {longest} tokens, token ids differing from TRL's: {differ}")
    return longest


def report(args: argparse.Namespace, runs: list[Run], phases: dict[str, list[float]], tunix: str) -> dict:
    """Prints the GRPO timing table, our step's split and the reward curves; returns the figures."""
    title = f"GRPO: {args.batch_size} prompts x G={args.num_generations} completions per step"
    summaries = timing_table(title, runs, args.steps, baseline="TRL")
    print(f"{'Tunix':<22}{tunix}")
    split = print_split("saerl-jax", phases, args.steps, "reference log-probs, loss, AdamW")
    if "TRL" in summaries:
        print(f"goal: saerl-jax >= {GOAL}x faster than TRL; measured {summaries['saerl-jax']['speedup_vs_trl']:.2f}x")
    curves = {run.name: run.rewards[: args.curve_steps] for run in runs}
    print("\nmean math reward per step")
    print(f"{'step':>5}" + "".join(f"{name:>12}" for name in curves))
    for step in range(args.curve_steps):
        print(f"{step + 1:>5}" + "".join(f"{curve[step]:>12.3f}" for curve in curves.values()))
    print(f"{'mean':>5}" + "".join(f"{np.mean(curve):>12.3f}" for curve in curves.values()))
    figures = {"timing": summaries, "saerl_jax_split": split, "curves": curves, "tunix": tunix}
    if "TRL" in summaries:
        ours, theirs = np.asarray(curves["saerl-jax"]), np.asarray(curves["TRL"])
        gap = float(np.mean(np.abs(ours - theirs)))
        corr = float(np.corrcoef(ours, theirs)[0, 1]) if len(ours) > 2 else float("nan")
        print(f"mean |saerl-jax - TRL| per step: {gap:.3f}; correlation over steps (same prompts): {corr:.2f}")
        figures["curve_agreement"] = {"mean_abs_gap": gap, "correlation": corr}
    return figures


def plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Both reward curves against the step, as a PNG."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    ax.set(xlabel="step", ylabel="mean math reward", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Builds the shared prompts and configs, runs each framework once per algorithm and reports."""
    args = parse_args()
    steps = max(args.steps + 1, args.curve_steps) if "grpo" in args.algos else args.steps + 1
    problems = {p.id: p for p in load_problems(args.data).problems}
    batches = prompt_batches(problems, args.batch_size, steps, args.seed)
    prompt_length = -(-check_prompts(args.tokenizer, batches) // 8) * 8
    cfg = make_config(args, prompt_length, steps)
    ppo_cfg = algo_config(  # TRL's PPO never clips gradients
        cfg,
        PPOConfig,
        args.steps + 1,
        num_ppo_epochs=args.ppo_epochs,
        num_mini_batches=args.ppo_mini_batches,
        max_grad_norm=0.0,
    )
    dpo_cfg = algo_config(
        cfg, DPOConfig, args.steps + 1, num_generations=args.num_generations, beta=args.dpo_beta, loss_type="sigmoid"
    )
    configs = {"grpo": cfg, "ppo": ppo_cfg, "dpo": dpo_cfg}
    for algo in args.algos:
        print(f"{algo} config: {configs[algo]}")
    print(f"jax {jax.__version__} on {jax.devices()[0]}; cores {os.cpu_count()}; torch threads {args.threads}")
    print(f"TRL on {args.device}, compute {args.dtype}")
    print(f"load average before: {os.getloadavg()}")
    results = {}
    if "grpo" in args.algos:
        with SaerlSteps(args, cfg, batches) as ours:
            if args.skip_trl:
                for _ in batches:
                    ours.step()
                runs = [ours.run]
            else:
                runs = [ours.run, run_trl(args, cfg, batches, after_step=ours.step)]
        results["grpo"] = runs, ours.phases
    if "ppo" in args.algos:
        results["ppo"] = run_ppo(args, ppo_cfg, batches[: args.steps + 1])
    if "dpo" in args.algos:
        results["dpo"] = run_dpo(args, dpo_cfg, batches[: args.steps + 1])
    print(f"load average after: {os.getloadavg()}")
    figures, args.out = {}, args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if "grpo" in results:
        figures = report(args, *results["grpo"], tunix_status())
        title = f"tiny-math GRPO, {cfg.batch_size} prompts x G={cfg.num_generations}, lr {cfg.learning_rate:g}"
        plot(figures["curves"], args.out / "grpo_curves.png", title)
    if "ppo" in results:
        figures["ppo"] = report_ppo(args, *results["ppo"], figures.get("timing"))
    if "dpo" in results:
        figures["dpo"] = report_dpo(args, *results["dpo"])
    figures["config"] = {
        **{algo: configs[algo].to_dict() for algo in args.algos},
        "steps_run": {algo: configs[algo].max_steps for algo in args.algos},
        "timed_steps": args.steps,
        "torch_threads": args.threads,
    }
    (args.out / "grpo.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out / 'grpo.json'}" + (f" and {args.out / 'grpo_curves.png'}" if "grpo" in results else ""))


if __name__ == "__main__":
    main()
