"""``saerl train`` under faults: an interrupt at any point of a step, a non-finite update, a resume with more
steps than planned, and real processes killed at random moments all end bit-identical to an uninterrupted
run (params, metrics, ``batches.jsonl``); checkpoints only ever hold finite step-boundary states."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_trainer import ASSETS, TIMING, digit_share

from rl.config import DAPOConfig, GRPOConfig
from rl.metrics import read_metrics
from rl.trainer import Trainer, TrainJob
from saerl_jax.cli import main
from saerl_jax.errors import UserError

CFG = GRPOConfig(
    batch_size=2,
    num_generations=2,
    max_prompt_length=96,
    max_completion_length=6,
    beta=0.05,  # the frozen reference is rebuilt on resume
    num_iterations=2,  # two dispatched updates per step: an interrupt can fall between them
    learning_rate=1e-3,
    max_steps=4,
    save_steps=2,
    eval_steps=2,
    eval_limit=3,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Seven training problems: with two per step an epoch ends inside step 4."""
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join((ASSETS / "problems.jsonl").read_text().splitlines(keepends=True)[:7]))
    return path


def _job(model: Path, data: Path, out: Path, config: GRPOConfig = CFG, **overrides) -> TrainJob:
    fields = dict(
        model=model,
        data=data,
        out=out,
        config=config,
        eval_data=data,
        reward=digit_share,
        reward_workers=0,
        tensorboard=False,
        progress=False,
    )
    return TrainJob(**{**fields, **overrides})


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def assert_same_run(out: Path, reference: Path) -> None:
    assert _rows(out) == _rows(reference)
    assert (out / "batches.jsonl").read_text() == (reference / "batches.jsonl").read_text()
    a, b = load_file(reference / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def straight(tiny_model, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    Trainer(_job(tiny_model, data, out)).train()
    return out


class Faulty(Trainer):
    """Raises ``KeyboardInterrupt`` (or sends itself SIGINT) at one point of one step."""

    def __init__(self, job: TrainJob, point: str, at_step: int, *, signal_only: bool = False):
        super().__init__(job)
        self.point, self.at_step, self.signal_only = point, at_step, signal_only
        self.updates = 0
        step_fn, reward = self.step_fn, self.job.reward

        def faulty_step_fn(state, batch):
            self.updates += 1
            if self.step + 1 == self.at_step and self.updates % 2 == 0:  # the step's second update
                self._fault("update")
            return step_fn(state, batch)

        def faulty_reward(completions, answers):
            self._fault("grading")
            return reward(completions, answers)

        self.step_fn = faulty_step_fn
        self.job = dataclasses.replace(self.job, reward=faulty_reward)

    def _fault(self, point: str) -> None:
        if point == self.point and self.step + 1 == self.at_step:
            self.at_step = None  # once
            if self.signal_only:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    def _roll(self, prompts, draw, params):
        self._fault("rollout")
        return super()._roll(prompts, draw, params)

    def evaluate(self, params=None, per_problem=False):
        self._fault("evaluate")
        return super().evaluate(params, per_problem)


@pytest.mark.parametrize(
    ("point", "at_step", "latest"),
    [  # grading and evaluation under `make test-slow` (the default suite's time budget)
        ("rollout", 2, 1),
        pytest.param("grading", 2, 1, marks=pytest.mark.slow, id="grading-2-1"),
        ("update", 3, 2),
        pytest.param("evaluate", 4, 2, marks=pytest.mark.slow, id="evaluate-4-2"),
    ],
)
def test_an_interrupt_inside_a_step_keeps_checkpoints_at_step_boundaries(
    tiny_model,
    data,
    straight,
    tmp_path,
    point,
    at_step,
    latest,
):
    summary = Faulty(_job(tiny_model, data, tmp_path), point, at_step).train()
    assert summary["interrupted"] and summary["step"] == at_step - 1
    # Before the update the step's prompts are put back and the boundary before it is saved; from the
    # update on, the donated state is gone and the latest checkpoint stays the last good one.
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == latest
    resumed = Trainer(_job(tiny_model, data, tmp_path, resume=True))
    assert resumed.step == latest
    assert resumed.train()["step"] == CFG.max_steps
    assert_same_run(tmp_path, straight)


def test_ctrl_c_finishes_the_step_saves_and_stops(tiny_model, data, straight, tmp_path, capsys):
    summary = Faulty(_job(tiny_model, data, tmp_path), "rollout", 3, signal_only=True).train()
    assert summary["interrupted"] and summary["step"] == 3  # step 3 was finished, then the run stopped
    assert "SIGINT: finishing the current step" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert Trainer(_job(tiny_model, data, tmp_path, resume=True)).train()["step"] == CFG.max_steps
    assert_same_run(tmp_path, straight)


def test_ctrl_c_in_the_last_step_finishes_the_run_and_is_reported(tiny_model, data, tmp_path):
    """The run cannot stop earlier than its end, but callers that loop over runs must learn of the request."""
    summary = Faulty(_job(tiny_model, data, tmp_path), "rollout", CFG.max_steps, signal_only=True).train()
    assert not summary["interrupted"] and summary["stop_requested"] and summary["step"] == CFG.max_steps
    assert "hf" in summary


class NaNAtStep3(Trainer):
    def __init__(self, job):
        super().__init__(job)
        reward = self.job.reward
        poisoned = lambda c, a: [float("nan")] * len(c) if self.step == 2 else reward(c, a)  # noqa: E731
        self.job = dataclasses.replace(self.job, reward=poisoned)


def test_a_non_finite_step_stops_the_run_without_saving_it(tiny_model, data, straight, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 3: loss=nan .*latest checkpoint, step 2, is the last good"):
        NaNAtStep3(_job(tiny_model, data, tmp_path)).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    # The last good checkpoint resumes into exactly the uninterrupted run.
    Trainer(_job(tiny_model, data, tmp_path, resume=True)).train()
    assert_same_run(tmp_path, straight)


@pytest.mark.slow  # compiles the skipping variant of the step
def test_a_non_finite_step_can_be_skipped_and_counted(tiny_model, data, tmp_path):
    class Recorded(NaNAtStep3):
        def commit(self, state, row, sample_ids, log):
            super().commit(state, row, sample_ids, log)
            self.params_at = [*getattr(self, "params_at", []), load_params(self.state.params)]

    skip = tmp_path
    trainer = Recorded(_job(tiny_model, data, skip, dataclasses.replace(CFG, skip_nonfinite_steps=True)))
    assert trainer.train()["step"] == CFG.max_steps
    assert [row["skipped_nonfinite"] for row in read_metrics(skip)] == [0, 0, 1, 0]
    for before, after in zip(trainer.params_at[1], trainer.params_at[2], strict=True):
        np.testing.assert_array_equal(before, after)  # step 3's update was dropped
    assert all(np.isfinite(p).all() for p in trainer.params_at[-1])


def load_params(params) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


DAPO_CFG = DAPOConfig(**{**dataclasses.asdict(CFG), "loss_type": "dapo", "beta": 0.0})


@pytest.mark.parametrize("config", [CFG, pytest.param(DAPO_CFG, marks=pytest.mark.slow, id="dapo")])
def test_a_resume_may_run_longer_across_an_epoch_boundary(tiny_model, data, tmp_path, config):
    longer = dataclasses.replace(config, max_steps=6, eval_steps=0)
    reference = tmp_path / "reference"
    Trainer(_job(tiny_model, data, reference, longer, eval_data=None)).train()
    out = tmp_path / "run"
    shorter = dataclasses.replace(longer, max_steps=2)
    Trainer(_job(tiny_model, data, out, shorter, eval_data=None)).train()  # 4 of the 7 ids
    Trainer(_job(tiny_model, data, out, longer, eval_data=None, resume=True)).train()  # crosses two epoch ends
    assert_same_run(out, reference)
    with pytest.raises(UserError, match=r"different config \(learning_rate\)"):
        Trainer(
            _job(tiny_model, data, out, dataclasses.replace(longer, learning_rate=1.0), eval_data=None, resume=True)
        )


# --- real processes ----------------------------------------------------------------------------------------


def _argv(model: Path, data: Path, out: Path) -> list[str]:
    options = dict(
        model=model, data=data, out=out, eval_data=data, batch_size=2, num_generations=2, max_prompt_length=96
    )
    options.update(max_completion_length=6, beta=0.05, num_iterations=2, learning_rate=1e-3, max_steps=6)
    options.update(save_steps=1, eval_steps=3, eval_limit=3, reward_workers=0)
    return [sys.executable, "-m", "saerl_jax.cli", "train", "--no-tensorboard"] + [
        arg for key, value in options.items() for arg in ("--" + key.replace("_", "-"), str(value))
    ]


def _train_until_done(argv: list[str], out: Path, rng: np.random.Generator, kills: list[int]) -> None:
    """Runs ``argv``, sending each signal of ``kills`` at a random moment after the first new metrics row,
    then resumes until the run finishes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for sig in [*kills, None]:
        resume = ["--resume"] if (out / "checkpoints").exists() else []
        log = (out.parent / f"{out.name}.log").open("a")
        process = subprocess.Popen([*argv, *resume], env=env, stdout=log, stderr=subprocess.STDOUT)
        if sig is not None:
            rows = len(read_metrics(out)) if (out / "metrics.jsonl").exists() else 0
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) > rows:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1.5))
            process.send_signal(sig)
        process.wait(timeout=300)
        log.close()
        if sig is None:
            assert process.returncode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _kill_trials(model: Path, data: Path, tmp_path: Path, trials: list[list[int]], seed: int) -> None:
    reference = tmp_path / "reference"
    assert main(_argv(model, data, reference)[3:]) == 0  # the same command, in this process
    rng = np.random.default_rng(seed)
    for trial, kills in enumerate(trials):
        out = tmp_path / f"trial{trial}"
        _train_until_done(_argv(model, data, out), out, rng, kills)
        assert_same_run(out, reference)


@pytest.mark.slow  # the longest test (30-45 s): `make test-slow`; the interrupts above cover each phase
def test_saerl_train_killed_at_a_random_moment_resumes_exactly(tiny_model, data, tmp_path):
    _kill_trials(tiny_model, data, tmp_path, [[signal.SIGKILL]], seed=0)


@pytest.mark.slow
def test_saerl_train_killed_at_many_random_moments_resumes_exactly(tiny_model, data, tmp_path):
    kills = [[signal.SIGKILL], [signal.SIGKILL, signal.SIGKILL], [signal.SIGINT, signal.SIGKILL], [signal.SIGTERM]]
    _kill_trials(tiny_model, data, tmp_path, kills * 2, seed=1)
