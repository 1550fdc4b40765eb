"""What ``bench_grpo.py`` (the GRPO row) and ``bench_grpo_algos.py`` (the PPO and DPO rows) share: a framework's
per-step record (:class:`Run`), our trainer driven one step at a time (:class:`SaerlSteps`), the callback that
times TRL's steps (:func:`step_timer`) and the printed timing table and step split.

Torch and transformers are imported inside the functions that need them: the trainer grades in spawned worker
processes, which re-import the benchmark script and so this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rl.config import GRPOConfig
from rl.trainer import Trainer, TrainJob
from saerl_jax.data.problems import Problem


@dataclasses.dataclass
class Run:
    """What one framework did, step by step (the first, untimed step included)."""

    name: str
    step_s: list[float] = dataclasses.field(default_factory=list)
    """Wall-clock seconds of each step."""
    cpu_s: list[float] = dataclasses.field(default_factory=list)
    """CPU seconds of this process (all its threads) in each step; steadier than wall-clock time when other
    jobs share the cores. Our grading workers are separate processes and not counted."""
    rewards: list[float] = dataclasses.field(default_factory=list)
    """Mean math reward of each step's completions."""
    tokens: list[int] = dataclasses.field(default_factory=list)
    """Completion tokens sampled at each step."""

    def summary(self, timed: int) -> dict[str, float]:
        """Median seconds per step and completion tokens per second over the ``timed`` steps after the first."""
        seconds = self.step_s[1 : 1 + timed]
        return {
            "s_per_step": statistics.median(seconds),
            "cpu_s_per_step": statistics.median(self.cpu_s[1 : 1 + timed]),
            "tokens_per_s": sum(self.tokens[1 : 1 + timed]) / sum(seconds),
            "first_step_s": self.step_s[0],
        }


class SaerlSteps:
    """Our trainer driven one ``run_step`` at a time (no checkpoints, evaluation or logging between),
    grading in worker processes as ``Trainer.train`` does. Use as a context manager."""

    def __init__(
        self, args: argparse.Namespace, cfg: GRPOConfig, batches: list[list[Problem]], name: str = "saerl-jax"
    ):
        self.run, self.batches, self.rows = Run(name), batches, cfg.rows
        self.phases: dict[str, list[float]] = {"rollout_s": [], "update_s": [], "compiles": []}
        """The trainer's own split of each step: sampling, decoding and grading / reference log-probs and
        the update; and the XLA programs each step built."""
        self.out = tempfile.TemporaryDirectory()
        job = TrainJob(
            model=args.model,
            tokenizer=args.tokenizer,
            data=args.data,
            out=Path(self.out.name),
            config=cfg,
            data_seed=args.seed,
            tensorboard=False,
            progress=False,
        )
        self.trainer = Trainer(job)

    def step(self) -> None:
        """One step, timed; checks it drew the expected prompts."""
        expected = sorted(p.id for p in self.batches[len(self.run.step_s)])
        start, cpu = time.perf_counter(), time.process_time()
        state, row, sample_ids = self.trainer.run_step()
        self.trainer.state, self.trainer.step = state, self.trainer.step + 1  # Trainer.commit, without a log
        self.run.step_s.append(time.perf_counter() - start)
        self.run.cpu_s.append(time.process_time() - cpu)
        for phase in self.phases:
            self.phases[phase].append(row[phase])
        assert sorted(sample_ids) == expected, f"step {len(self.run.step_s)} drew other prompts than planned"
        self.run.rewards.append(row["accuracy"])
        self.run.tokens.append(round(row["completion_length"] * self.rows))
        report_step(self.run)

    def __enter__(self) -> SaerlSteps:
        return self

    def __exit__(self, *exc) -> None:
        self.trainer.close()
        self.trainer.manager.close()
        self.out.cleanup()


def report_step(run: Run) -> None:
    """Prints the step ``run`` just finished: its seconds and, where graded, mean reward."""
    reward = f", reward {run.rewards[len(run.step_s) - 1]:.3f}" if len(run.rewards) >= len(run.step_s) else ""
    print(f"  {run.name} step {len(run.step_s)}: {run.step_s[-1]:.2f} s{reward}", flush=True)


def step_timer(run: Run, after_step: Callable[[], None]):
    """A ``TrainerCallback`` timing TRL's steps (``on_step_begin`` -> ``on_step_end``) into ``run``; it calls
    ``after_step`` once each step is timed (so the other framework's steps alternate with TRL's)."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            run.step_s.append(time.perf_counter() - self.start)
            run.cpu_s.append(time.process_time() - self.cpu)
            report_step(run)
            after_step()

    return StepTimer()


HEADER = f"{'s/step (median)':>18}{'tokens/s':>12}{'vs TRL':>10}{'CPU s/step':>12}{'vs TRL':>10}{'first step s':>15}"


def timing_table(
    title: str, runs: list[Run], timed: int, baseline: str | None, compared: tuple[str, ...] | None = None
) -> dict[str, dict]:
    """Prints one algorithm's timing rows under ``title``, with the speed-ups of the ``compared`` rows (all by
    default) over the ``baseline`` row (TRL's; none when None); returns each row's figures by name."""
    summaries = {run.name: run.summary(timed) for run in runs}
    base = summaries.get(baseline)

    def ratio(name: str, key: str) -> float | None:
        return base[key] / summaries[name][key] if base and (compared is None or name in compared) else None

    def shown(x: float | None) -> str:
        return f"{x:>9.2f}x" if x is not None else f"{'-':>10}"

    print(f"\n{title}\n{'':<22}{HEADER}")
    for name, s in summaries.items():
        s["speedup_vs_trl"], s["cpu_speedup_vs_trl"] = ratio(name, "s_per_step"), ratio(name, "cpu_s_per_step")
        line = f"{name:<22}{s['s_per_step']:>18.3f}{s['tokens_per_s']:>12,.0f}{shown(s['speedup_vs_trl'])}"
        print(f"{line}{s['cpu_s_per_step']:>12.3f}{shown(s['cpu_speedup_vs_trl'])}{s['first_step_s']:>15.1f}")
    return summaries


def print_split(name: str, phases: dict[str, list[float]], timed: int, update: str) -> dict:
    """Prints the median split of our step (``update`` says what its update phase holds) and the XLA programs
    each step built; returns them."""
    phases = dict(phases)
    compiles = phases.pop("compiles", [])
    split = {phase: statistics.median(values[1 : 1 + timed]) for phase, values in phases.items()}
    print(f"{name} step, median: rollout (sampling, decoding, grading) {split['rollout_s']:.3f} s, ", end="")
    print(f"update ({update}) {split['update_s']:.3f} s")
    late = [f"step {i + 1}: {int(n)}" for i, n in enumerate(compiles) if i and n]
    first = int(compiles[0]) if compiles else 0
    print(f"{name} XLA programs built: {int(sum(compiles))} ({first} in step 1; later: {', '.join(late) or 'none'})")
    return {**split, "compiles_per_step": compiles}
