"""GRPO arms over seeds: one run per (arm, seed) with held-out greedy accuracy every few steps, Avg@k of the
final policy, and the base model scored once as step 0.

What a seed ``s`` varies: ``GRPOConfig.seed`` (the rollout sampling keys, hence the whole trajectory),
``TrainJob.data_seed`` (the shuffled order of the vanilla arm; the plan and external-difficulty orders do
not depend on it) and the sampling seed of the final Avg@k. Plans are fixed inputs: their seed is the
engineer's (``--plan-seed``), the same for every GRPO seed.

Every run directory is reused: training resumes from its checkpoint, and a run whose ``result.json`` holds
the same settings is read back instead of run again. A directory holding a run with other settings is
refused, never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from rl.benchmarks import EvalProblem
from rl.config import ALGOS, GRPOConfig
from rl.evaluate import evaluate
from rl.metrics import read_evals, read_metrics
from rl.trainer import TrainJob, run_train
from saerl_jax.data.problems import load_problems
from saerl_jax.data.prompt import load_tokenizer
from saerl_jax.experiments.aggregate import aggregate
from saerl_jax.features.store import file_hash
from saerl_jax.io import atomic_write
from saerl_jax.model import load_pretrained
from saerl_jax.sft import greedy_accuracy

RESULT = "result.json"
SETTINGS = "settings.json"
EXTENDABLE = ("steps", "eval_steps", "k", "temperature")
"""Budget fields a reused run directory may differ in (more steps resume training; k and temperature only
change the final Avg@k, which is evaluated again)."""
BENCH = "held_out"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """The RL budget and held-out evaluation every arm of an experiment shares."""

    algo: Literal["grpo", "ppo", "dpo"] = "grpo"
    """The RL algorithm of every arm (PPO and DPO with their defaults for what is not set here)."""
    steps: int = 200
    """GRPO steps per run."""
    batch_size: int = 8
    """Prompts per step (also the plans' batch size)."""
    num_generations: int = 4
    """Completions per prompt (G)."""
    learning_rate: float = 2e-5
    """AdamW learning rate."""
    beta: float = 0.04
    """KL weight to the initial policy: GRPO's ``beta``, PPO's ``kl_coef``; DPO's ``beta``."""
    max_prompt_length: int = 128
    """Prompt tokens (left-padded)."""
    max_completion_length: int = 64
    """Completion budget in tokens, in training and in both evaluations."""
    eval_steps: int = 20
    """Held-out greedy accuracy every this many steps (and at the last); 0 evaluates only at the end."""
    eval_limit: int = 256
    """Held-out problems (the first ones of the eval file), for the curve and for Avg@k."""
    k: int = 4
    """Samples per held-out problem for the final Avg@k / Pass@k."""
    temperature: float = 0.6
    """Sampling temperature of the final Avg@k."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_generations", "max_prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.algo not in ("grpo", "ppo", "dpo"):
            raise ValueError(f"algo must be one of ('grpo', 'ppo', 'dpo'), got {self.algo!r}")
        if self.eval_steps < 0 or self.eval_limit < 1 or self.k < 1 or self.temperature <= 0:
            raise ValueError("need eval_steps >= 0, eval_limit >= 1, k >= 1 and temperature > 0")

    def train_config(self, seed: int) -> GRPOConfig:
        """The trainer's config for one seed (a checkpoint at every evaluation)."""
        kl = {"grpo": {"beta": self.beta}, "ppo": {"kl_coef": self.beta}, "dpo": {"beta": self.beta}}[self.algo]
        return ALGOS[self.algo](
            **kl,
            batch_size=self.batch_size,
            num_generations=self.num_generations,
            learning_rate=self.learning_rate,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            max_steps=self.steps,
            eval_steps=self.eval_steps,
            eval_limit=self.eval_limit,
            save_steps=self.eval_steps or self.steps,
            seed=seed,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arm:
    """One training condition: the problems and the order they are drawn in."""

    name: str
    """Directory name and table label."""
    sampler: Literal["plan", "shuffle", "difficulty"]
    """The trainer's sampler."""
    plan: Path | None = None
    """``plan.json`` (or its directory) for ``sampler='plan'``."""
    data: Path | None = None
    """The arm's own training problems (a selection of the pool, or the pool with other difficulty
    labels); the experiment's pool when None."""
    replan: Callable[[int, Path, list[str]], Path] | None = dataclasses.field(default=None, compare=False)
    """Adaptive re-planning (see :attr:`rl.trainer.TrainJob.replan`); part of the settings by ``replan_steps``
    and ``replan_name``."""
    replan_steps: int = 0
    """Steps between re-plans."""
    replan_name: str = ""
    """What the re-planner does (recorded in the settings, so a changed re-planner is a new run)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
    """What every arm of an experiment shares."""

    model: Path
    """The initial policy (HF Qwen2 directory)."""
    tokenizer: Path
    """Tokenizer directory."""
    data: Path
    """Training problems (every arm draws from these; plan ids must be among them)."""
    eval_data: Path
    """Held-out problems."""
    out: Path
    """Experiment directory: ``base/`` and ``runs/ARM/seed-S/``."""
    budget: Budget
    """GRPO budget and evaluation settings."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """GRPO seeds (see the module docstring for what a seed varies)."""
    reward_workers: int = 1
    """Grading processes of the trainer; 0 grades in this process (main thread only)."""
    progress: bool = True
    """Progress bars."""


def _normal(value) -> object:
    """``value`` as JSON gives it back (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=1, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _finished(directory: Path, settings: dict) -> dict | None:
    """The saved result of ``settings`` in ``directory``, or None (after recording the settings) when the work
    is still to do; a directory holding other work (beyond :data:`EXTENDABLE` budget fields) is refused."""
    result = directory / RESULT
    if result.is_file():
        saved = json.loads(result.read_text())
        if saved["settings"] == settings:
            return saved
    path = directory / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        fixed = [k for k in settings if k != "budget" and old.get(k) != settings[k]]
        fixed += [k for k in settings["budget"] if k not in EXTENDABLE and old["budget"][k] != settings["budget"][k]]
        if fixed or old["budget"]["steps"] > settings["budget"]["steps"]:
            raise ValueError(
                f"{directory} holds a run with other settings ({', '.join(fixed) or 'more steps'}); "
                "pass another --out or delete that directory"
            )
    _write_json(path, settings)
    return None


def held_out(exp: Experiment) -> list[EvalProblem]:
    """The first ``eval_limit`` held-out problems."""
    problems = load_problems(exp.eval_data, limit=exp.budget.eval_limit).problems
    return [EvalProblem(p.id, p.question, p.final_answer) for p in problems]


def _avg_at_k(model_dir: Path, step: int, exp: Experiment, seed: int, out: Path, tokenizer) -> dict:
    """Avg@k / Pass@k of ``model_dir`` (the policy after ``step`` GRPO steps) on the held-out problems, cached
    by :func:`rl.evaluate.evaluate` under ``out`` (the step is part of the cache key)."""
    problems, b = held_out(exp), exp.budget
    summary = evaluate(
        load_pretrained(model_dir),
        tokenizer,
        {BENCH: problems},
        k=b.k,
        temperature=b.temperature,
        max_new_tokens=b.max_completion_length,
        seed=seed,
        batch_size=min(64, len(problems) * b.k),
        progress=exp.progress,
        out=out,
        model_name=f"{model_dir} (step {step})",
    )
    result = summary["benchmarks"][BENCH]
    samples = [json.loads(line) for line in (out / "samples" / f"{BENCH}.jsonl").read_text().splitlines()]
    by_id = {row["id"]: row["scores"] for row in samples}
    avg_correct = [sum(score > 0 for score in by_id[p.id][: b.k]) / b.k for p in problems]
    keys = ("avg_at_k", "pass_at_k", "mean_length", "truncation_rate")
    return {**{key: result[key] for key in keys}, "avg_correct": avg_correct}


def _settings(exp: Experiment, data: Path | None = None, **extra) -> dict:
    data = data or exp.data
    data = {"path": data, "hash": file_hash(data)}
    held = {"path": exp.eval_data, "hash": file_hash(exp.eval_data)}
    model = {"path": exp.model, "hash": file_hash(exp.model / "config.json", *sorted(exp.model.glob("*.safetensors")))}
    budget = dataclasses.asdict(exp.budget)
    if budget["algo"] == "grpo":  # runs recorded before PPO / DPO name no algorithm: they are GRPO runs
        del budget["algo"]
    return _normal({"model": model, "data": data, "eval_data": held, "budget": budget, **extra})


def _without_settings(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "settings"}


def evaluate_base(exp: Experiment, tokenizer) -> list[dict]:
    """The initial policy as step 0, per seed: held-out greedy accuracy (as the trainer measures it, computed
    once) and Avg@k with that seed's sampling."""
    directory = exp.out / "base"
    settings = _settings(exp, arm="base")
    settings["budget"] = {k: settings["budget"][k] for k in ("eval_limit", "max_completion_length")}
    path = directory / "greedy.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("settings") == settings and "correct" in saved:
        accuracy, correct = saved["accuracy"], saved["correct"]
        print(f"base: greedy accuracy read back from {path}")
    else:
        rows = [{"question": p.question, "final_answer": p.answer} for p in held_out(exp)]
        accuracy, correct = greedy_accuracy(
            load_pretrained(exp.model),
            tokenizer,
            rows,
            max_new_tokens=exp.budget.max_completion_length,
            batch_size=min(128, len(rows)),  # the trainer's evaluation batch: the same greedy tokens
        )
        correct = [float(v) for v in correct]
        _write_json(path, {"settings": settings, "accuracy": accuracy, "correct": correct})
    return [
        {
            "arm": "base",
            "seed": seed,
            "curve": [[0, accuracy]],
            "final_accuracy": accuracy,
            "final_correct": correct,
            **_avg_at_k(exp.model, 0, exp, seed, directory / f"seed-{seed}", tokenizer),
        }
        for seed in exp.seeds
    ]


def run_arm(arm: Arm, seed: int, exp: Experiment, base_accuracy: float, tokenizer) -> dict:
    """Trains (or resumes, or reads back) one arm for one seed under ``exp.out/runs/ARM/seed-S``.

    Returns:
      ``arm``, ``seed``, ``settings``, ``run_dir``; ``curve`` (``[step, held-out greedy accuracy]`` from
      step 0 = ``base_accuracy``), ``final_accuracy`` (the last step's), the per-step training ``reward``
      and ``train_accuracy``, ``step_s`` (median seconds of rollout + update per step, the first step and its
      compilation left out), and the final
      policy's ``avg_at_k``, ``pass_at_k``, ``mean_length`` and ``truncation_rate``.
    """
    run_dir = exp.out / "runs" / arm.name / f"seed-{seed}"
    plan = None
    if arm.plan is not None:
        plan_file = arm.plan / "plan.json" if arm.plan.is_dir() else arm.plan
        plan = {"path": plan_file, "hash": file_hash(plan_file)}
    described = {"name": arm.name, "sampler": arm.sampler, "plan": plan}
    if arm.replan is not None:
        described["replan"] = {"steps": arm.replan_steps, "name": arm.replan_name}
    settings = _settings(exp, arm.data, arm=described, seed=seed)
    done = _finished(run_dir, settings)
    if done is not None:
        print(f"{arm.name} seed {seed}: finished before, read back {run_dir / RESULT}")
        return done
    print(f"{arm.name} seed {seed}: training in {run_dir}", flush=True)
    job = TrainJob(
        model=exp.model,
        tokenizer=exp.tokenizer,
        data=arm.data or exp.data,
        out=run_dir,
        config=exp.budget.train_config(seed),
        sampler=arm.sampler,
        plan=arm.plan,
        replan=arm.replan,
        replan_steps=arm.replan_steps,
        eval_data=exp.eval_data,
        data_seed=seed,
        resume=True,
        reward_workers=exp.reward_workers,
        tensorboard=False,
        progress=exp.progress,
    )
    summary = run_train(job)
    if summary["interrupted"] or summary["stop_requested"]:  # a stop in the last step ends the script too
        raise KeyboardInterrupt(f"{arm.name} seed {seed} interrupted at step {summary['step']} (rerun to resume)")
    rows = [row for row in read_metrics(run_dir) if row["step"] <= exp.budget.steps]
    evals = [[row["step"], row["eval_accuracy"]] for row in rows if row.get("eval_accuracy") is not None]
    scores = read_evals(run_dir)
    result = {
        "arm": arm.name,
        "seed": seed,
        "settings": settings,
        "run_dir": str(run_dir),
        "curve": [[0, base_accuracy], *evals],
        "final_accuracy": evals[-1][1] if evals else None,
        "final_correct": scores.get(evals[-1][0]) if evals else None,
        "zero_std": [row["frac_reward_zero_std"] for row in rows],
        "reward": [row["reward_mean"] for row in rows],
        "train_accuracy": [row["accuracy"] for row in rows],
        "step_s": statistics.median(row["rollout_s"] + row["update_s"] for row in rows[1:] or rows),
        **_avg_at_k(Path(summary["hf"]), summary["step"], exp, seed, run_dir / "avg_at_k", tokenizer),
    }
    _write_json(run_dir / RESULT, result)
    return result


def run_arms(
    exp: Experiment,
    arms: Sequence[Arm],
    *,
    target: float | None = None,
    after_each: Callable[[dict], None] | None = None,
) -> dict:
    """The base model, then every arm for every seed, seed by seed (so a partial run holds whole seeds,
    paired across arms), aggregated.

    Args:
      exp: the shared model, data, budget and seeds.
      arms: the conditions (names unique, ``base`` reserved for step 0).
      target: held-out accuracy whose first step is reported; None takes base accuracy + 0.02.
      after_each: called with the summary so far after every (arm, seed) run, e.g. to write partial tables.

    Returns:
      the settings, ``base_accuracy``, ``target``, per-seed ``results`` by arm (``base`` first), their
      :func:`aggregate` under ``aggregate``, and ``done`` (seeds finished per arm) and ``complete``.
    """
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names) or "base" in names:
        raise ValueError(f"arm names must be unique and not 'base', got {names}")
    started = time.perf_counter()
    tokenizer = load_tokenizer(exp.tokenizer)
    results = {"base": evaluate_base(exp, tokenizer)}
    base_accuracy = results["base"][0]["final_accuracy"]
    target = base_accuracy + 0.02 if target is None else target
    results.update({name: [] for name in names})

    def summary() -> dict:
        done = {arm: [r["seed"] for r in rows] for arm, rows in results.items() if arm != "base"}
        return {
            "model": str(exp.model),
            "data": str(exp.data),
            "eval_data": str(exp.eval_data),
            "seeds": list(exp.seeds),
            "budget": dataclasses.asdict(exp.budget),
            "arms": _normal({arm.name: _describe(arm) for arm in arms}),
            "base_accuracy": base_accuracy,
            "target": target,
            "done": done,
            "complete": all(len(seeds) == len(exp.seeds) for seeds in done.values()),
            "results": {arm: [_without_settings(r) for r in rows] for arm, rows in results.items()},
            "aggregate": aggregate({arm: rows for arm, rows in results.items() if rows}, target),
            "wall_s": round(time.perf_counter() - started, 1),
        }

    for seed in exp.seeds:
        for arm in arms:
            results[arm.name].append(run_arm(arm, seed, exp, base_accuracy, tokenizer))
            if after_each is not None:
                after_each(summary())
    return summary()


def _describe(arm: Arm) -> dict:
    fields = {f.name: getattr(arm, f.name) for f in dataclasses.fields(arm) if f.name != "replan"}
    return {**fields, "replan": arm.replan is not None}
