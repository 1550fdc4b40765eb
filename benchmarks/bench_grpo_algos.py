"""The PPO and DPO rows of ``bench_grpo.py``: our trainer's PPO and DPO steps against TRL's trainers, on the
policy, prompts and shared options that ``bench_grpo.py`` sets up (its docstring describes them). Each row runs
``--steps`` timed steps after one warm-up and reports medians, on the first batches of the same prompts:

- PPO: our ``Trainer.run_step`` with :class:`rl.config.PPOConfig` (``--batch-size`` prompts x 1 completion,
  ``--ppo-epochs`` x ``--ppo-mini-batches`` updates, a separate critic, the trainer's other PPO defaults)
  against TRL's ``PPOTrainer`` step (rollout, reference and value forwards, grading, GAE, the same updates)
  with the same options. TRL 1.16 has no PPOTrainer (1.13 removed ``trl.experimental.ppo``); TRL 1.12.0 has
  it and runs beside our transformers and torch in a venv of its own, which ``--trl-ppo-python`` names:
  ``benchmarks/trl_ppo_step.py`` runs it there in lock-step with our steps (its docstring says how to make
  the venv and how it feeds TRL our prompts and reward). TRL's PPO never clips gradients, so our PPO row
  runs with ``max_grad_norm=0`` too. Without ``--trl-ppo-python`` our PPO step is printed beside the GRPO
  steps, with the reason TRL's is missing.
- DPO: our ``Trainer.run_step`` with :class:`rl.config.DPOConfig` (``--num-generations`` completions per
  prompt, pairs built from the graded rollout, reference log-probs, the update; beta ``--dpo-beta``, loss
  ``sigmoid``), timed whole. TRL's ``DPOTrainer`` is offline (no rollout), so what is compared is our update
  alone (the trainer's jitted DPO step, reference log-probs computed beforehand) against TRL's step with
  ``precompute_ref_log_probs=True``, both on the same fixed batches of ``--batch-size`` real pairs: the pairs
  our DPO steps built, in order (repeated when fewer), given to TRL as prompt / chosen / rejected text
  decoded from our token ids (special tokens kept; the benchmark counts pairs that TRL's tokenizer does not
  turn back into our ids), ``max_length`` our prompt width plus the completion budget, sequential batches.

Torch, transformers, trl and datasets are imported inside the functions that need them (see ``bench_grpo.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from grpo_common import Run, SaerlSteps, print_split, report_step, step_timer, timing_table

from rl import dpo_step
from rl.config import DPOConfig, PPOConfig
from rl.sharding import shard_batch
from rl.trainer import Trainer
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.problems import Problem
from saerl_jax.data.prompt import stop_ids

if TYPE_CHECKING:
    import trl

NO_TRL_PPO = (
    "TRL 1.16 (our pin) has no PPOTrainer: 1.13 removed trl.experimental.ppo (1.13.0, 1.15.0 and 1.16.0 checked; "
    "0.29.1, 1.0.0, 1.10.0, 1.11.0 and 1.12.0 have it), and 1.12.0 installs and runs beside transformers 5.23 / "
    "torch 2.13 in a venv of its own: pass --trl-ppo-python (benchmarks/trl_ppo_step.py says how to make it)"
)


def trl_ppo_job(args: argparse.Namespace, cfg: PPOConfig, batches: list[list[Problem]]) -> dict:
    """What ``trl_ppo_step.py`` needs: each step's prompts as our token ids, left-padded to our width (as our
    trainer pads them), and TRL's ``PPOConfig`` arguments for the same run (one rollout batch of ``cfg.rows``
    completions per step, decoded at once; our epochs, mini-batches, KL, GAE, clip and AdamW options)."""
    tokenizer = load_tokenizer(args.tokenizer)
    _, pad_id = stop_ids(tokenizer)

    def row(problem: Problem) -> dict:
        ids = format_example(tokenizer, problem.question).input_ids.tolist()
        padded = [pad_id] * (cfg.max_prompt_length - len(ids)) + ids
        return {"id": problem.id, "final_answer": problem.final_answer, "input_ids": padded}

    same = ("num_ppo_epochs", "num_mini_batches", "kl_coef", "kl_estimator", "gamma", "lam", "cliprange")
    same += ("cliprange_value", "vf_coef", "whiten_rewards", "temperature", "learning_rate", "adam_beta1")
    same += ("adam_beta2", "weight_decay", "seed")
    config = {name: getattr(cfg, name) for name in same} | {
        "per_device_train_batch_size": cfg.rows,
        "gradient_accumulation_steps": 1,
        "local_rollout_forward_batch_size": cfg.rows,
        "total_episodes": cfg.rows * len(batches),
        "response_length": cfg.max_completion_length,
        "stop_token": "eos",
        "missing_eos_penalty": None,
        "lr_scheduler_type": "constant",
        "optim": "adamw_torch",
        "num_sample_generations": 0,
        "use_cpu": args.device == "cpu",
        "bf16": cfg.compute_dtype == "bfloat16",
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
    }
    return {
        "model": str(args.model.resolve()),
        "tokenizer": str(args.tokenizer.resolve()),
        "width": cfg.max_prompt_length,
        "pad_id": pad_id,
        "threads": args.threads,
        "steps": [[row(p) for p in batch] for batch in batches],
        "config": config,
    }


def run_trl_ppo(
    args: argparse.Namespace, cfg: PPOConfig, batches: list[list[Problem]], after_step: Callable[[], None]
) -> Run:
    """TRL's ``PPOTrainer`` for ``len(batches)`` steps on those prompts, in ``--trl-ppo-python`` through
    ``trl_ppo_step.py``, which waits after each step while ``after_step`` runs here."""
    run = Run("TRL PPO")
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(trl_ppo_job(args, cfg, batches)))
        script = Path(__file__).with_name("trl_ppo_step.py")
        command = [str(args.trl_ppo_python), str(script), str(job)]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as worker:
            for line in worker.stdout:
                step = json.loads(line)
                run.name = f"TRL {step['trl']} PPO"
                run.step_s.append(step["step_s"])
                run.cpu_s.append(step["cpu_s"])
                run.rewards.append(step["reward"])
                run.tokens.append(step["tokens"])
                expected = sorted(p.id for p in batches[len(run.step_s) - 1])
                assert step["ids"] == expected, f"TRL's PPO step {len(run.step_s)} graded other prompts than ours"
                report_step(run)
                after_step()
                worker.stdin.write("\n")
                worker.stdin.flush()
    if worker.returncode or len(run.step_s) != len(batches):
        raise RuntimeError(f"{' '.join(command[:2])} exited with {worker.returncode} after {len(run.step_s)} steps")
    return run


def run_ppo(args: argparse.Namespace, cfg: PPOConfig, batches: list[list[Problem]]) -> tuple[list[Run], dict]:
    """Our PPO steps, alternating with TRL's where ``--trl-ppo-python`` is given; the runs and our step's split."""
    with SaerlSteps(args, cfg, batches, name="saerl-jax PPO") as ours:
        if args.skip_trl or args.trl_ppo_python is None:
            for _ in batches:
                ours.step()
            return [ours.run], ours.phases
        return [ours.run, run_trl_ppo(args, cfg, batches, after_step=ours.step)], ours.phases


def fixed_pairs(steps: list[dict[str, np.ndarray]], k: int, count: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """``count`` batches of ``k`` real pairs from the pair batches our DPO steps built (``steps``), in order and
    repeated when there are fewer; completions cut or padded to the longest real one and prompts left-padded to
    the widest step's (steps pad to their own length bucket), so every batch has one shape. Returns the batches
    and the number of distinct pairs."""
    width = max(int(b[f"{side}_mask_KN"].sum(axis=1).max()) for b in steps for side in ("chosen", "rejected"))
    prompt_width = max(b["prompt_ids_KP"].shape[1] for b in steps)

    def fit(name: str, x: np.ndarray) -> np.ndarray:
        if name.endswith("_KP"):
            return np.pad(x, ((0, 0), (prompt_width - x.shape[1], 0)))
        return np.pad(x, ((0, 0), (0, max(width - x.shape[1], 0))))[:, :width] if name.endswith("_KN") else x

    real = {name: np.concatenate([fit(name, b[name])[b["pair_mask_K"] > 0] for b in steps]) for name in steps[0]}
    distinct = len(real["pair_mask_K"])
    if not distinct:
        raise RuntimeError("no DPO step had a prompt with both a correct and an incorrect completion: no pairs")
    order = np.arange(count * k) % distinct
    return [{name: x[order[i * k : (i + 1) * k]] for name, x in real.items()} for i in range(count)], distinct


def pair_texts(tokenizer, batches: list[dict[str, np.ndarray]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """TRL's rows for the pairs of ``batches``, in order: prompt, chosen and rejected decoded from our token
    ids with special tokens kept (our chat-templated prompt; a completion ends with its EOS). Also counts the
    completions TRL's tokenizer does not turn back into our ids, and those without EOS (TRL appends one)."""
    rows, counts = [], {"retokenized_differently": 0, "without_eos": 0}
    for batch in batches:
        for k in range(len(batch["pair_mask_K"])):
            prompt = batch["prompt_ids_KP"][k][batch["prompt_mask_KP"][k] > 0].tolist()
            row = {"prompt": tokenizer.decode(prompt)}
            for side in ("chosen", "rejected"):
                ids = batch[f"{side}_ids_KN"][k][batch[f"{side}_mask_KN"][k] > 0].tolist()
                row[side] = tokenizer.decode(ids)
                counts["retokenized_differently"] += tokenizer(row["prompt"] + row[side])["input_ids"] != prompt + ids
                counts["without_eos"] += not row[side].endswith(tokenizer.eos_token)
            rows.append(row)
    return rows, counts


class DPOUpdates:
    """Our DPO update alone, the trainer's jitted step, on fixed batches of pairs, one per :meth:`step`, timed;
    their reference log-probs are computed first (as TRL's ``precompute_ref_log_probs``)."""

    def __init__(self, trainer: Trainer, batches: list[dict[str, np.ndarray]]):
        self.trainer, self.run = trainer, Run("saerl-jax DPO update")
        self.run.tokens = [int(b["chosen_mask_KN"].sum() + b["rejected_mask_KN"].sum()) for b in batches]
        self.batches = []
        for host in batches:
            batch = shard_batch(host, trainer.mesh)
            batch["ref_chosen_K"], batch["ref_rejected_K"] = dpo_step.reference_logps(
                trainer.graphdef, trainer.ref_params, batch, trainer.cfg
            )
            self.batches.append(jax.block_until_ready(batch))
        self.state = trainer.state  # donated by the first update: the trainer takes no step after

    def step(self) -> None:
        """One update on the next batch, timed to its loss on the host."""
        start, cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.trainer.step_fn(self.state, self.batches[len(self.run.step_s)])
        float(metrics["loss"])
        self.run.step_s.append(time.perf_counter() - start)
        self.run.cpu_s.append(time.process_time() - cpu)
        report_step(self.run)


def trl_dpo_config(cfg: DPOConfig, output_dir: str, device: str, steps: int) -> trl.DPOConfig:
    """TRL's ``DPOConfig`` for our DPO's objective, optimizer and lengths: batches of ``cfg.batch_size`` pairs in
    dataset order, reference log-probs precomputed before the first step, ``max_length`` our prompt width plus
    the completion budget."""
    import trl

    return trl.DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        max_length=cfg.max_prompt_length + cfg.max_completion_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=steps,
        train_sampling_strategy="sequential",
        seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=cfg.compute_dtype == "bfloat16",
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def run_trl_dpo(args: argparse.Namespace, cfg: DPOConfig, rows: list[dict[str, str]], updates: DPOUpdates) -> Run:
    """``DPOTrainer.train()`` on ``rows``, one step per batch of ``updates``, whose steps alternate with TRL's."""
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    run = Run("TRL DPO")
    run.tokens = updates.run.tokens  # the same pairs (TRL's own count differs by an appended EOS at most)
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(args.model.resolve()), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.DPOTrainer(
            model=model,
            args=trl_dpo_config(cfg, out, args.device, len(updates.batches)),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=load_tokenizer(args.tokenizer),
            callbacks=[step_timer(run, updates.step)],
        )
        assert len(trainer.train_dataset) == len(rows), "TRL dropped pairs (prompt longer than max_length)"
        trainer.train()
    return run


def run_dpo(args: argparse.Namespace, cfg: DPOConfig, batches: list[list[Problem]]) -> tuple[list[Run], dict]:
    """Our DPO steps, then our update alone on fixed batches of their pairs alternating with TRL's DPO steps on
    the same pairs; the runs (our step, our update, TRL's) and the pairs' figures."""
    with SaerlSteps(args, cfg, batches, name="saerl-jax DPO") as ours:
        built, build = [], ours.trainer._pair_batch  # the trainer's pair batches, kept (private, for this benchmark)

        def keep(graded):
            batch = build(graded)
            built.append({name: np.asarray(x) for name, x in batch.items() if not name.startswith("ref_")})
            return batch

        ours.trainer._pair_batch = keep
        for _ in batches:
            ours.step()
        fixed, distinct = fixed_pairs(built, cfg.batch_size, len(batches))
        rows, pairs = pair_texts(load_tokenizer(args.tokenizer), fixed)
        width = fixed[0]["chosen_ids_KN"].shape[1]
        pairs |= {"distinct_pairs": distinct, "pairs_per_batch": cfg.batch_size, "completion_width": width}
        print(f"DPO pairs: {pairs}")
        updates = DPOUpdates(ours.trainer, fixed)
        if args.skip_trl:
            for _ in fixed:
                updates.step()
            return [ours.run, updates.run], {"pairs": pairs, "split": ours.phases}
        trl_run = run_trl_dpo(args, ours.trainer.cfg, rows, updates)
    return [ours.run, updates.run, trl_run], {"pairs": pairs, "split": ours.phases}


def report_ppo(args: argparse.Namespace, runs: list[Run], phases: dict, grpo: dict | None) -> dict:
    """Prints the PPO rows (or, without TRL's, ours beside the GRPO steps and the reason); returns the figures."""
    title = (
        f"PPO: {args.batch_size} prompts x 1 completion per step, {args.ppo_epochs} epochs x "
        f"{args.ppo_mini_batches} mini-batches, no gradient clipping (as TRL's PPO)"
    )
    baseline = runs[1].name if len(runs) > 1 else None
    figures = {"timing": timing_table(title, runs, args.steps, baseline)}
    figures["saerl_jax_split"] = print_split(
        "saerl-jax PPO", phases, args.steps, "reference and old log-probs, values, GAE, the PPO updates"
    )
    if baseline is None:
        figures["trl"] = "not timed: " + ("--skip-trl" if args.skip_trl else NO_TRL_PPO)
        print(f"TRL PPO: {figures['trl']}")
        if grpo:
            scale = "; ".join(f"{name} {s['s_per_step']:.3f} s" for name, s in grpo.items())
            print(f"for scale, the GRPO step ({args.batch_size} x {args.num_generations} completions): {scale}")
    return figures


def report_dpo(args: argparse.Namespace, runs: list[Run], extra: dict) -> dict:
    """Prints the DPO rows, what is compared, and our full step's split; returns the figures."""
    title = (
        f"DPO: {args.batch_size} prompts x G={args.num_generations} completions -> up to {args.batch_size} pairs per "
        f"step; beta {args.dpo_beta}, loss sigmoid"
    )
    baseline = runs[2].name if len(runs) > 2 else None
    compared = tuple(run.name for run in runs[1:])  # our update and TRL's step, not our whole step
    figures = {"timing": timing_table(title, runs, args.steps, baseline, compared=compared)}
    print(
        f"compared: {runs[1].name} (fixed batches of {args.batch_size} real pairs from our steps, reference "
        "log-probs precomputed) against TRL's DPOTrainer step on the same pairs (precompute_ref_log_probs=True); "
        f"{runs[0].name} (rollout, grading, pairs, reference log-probs, update) has no TRL counterpart: "
        "DPOTrainer is offline"
    )
    figures["saerl_jax_split"] = print_split(
        runs[0].name, extra["split"], args.steps, "pairs' reference log-probs, update"
    )
    figures["pairs"] = extra["pairs"]
    return figures
