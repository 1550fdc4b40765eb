"""Adaptive re-planning in the trainer: at every ``replan_steps`` it trains the plan ``replan`` builds from the
current policy and the ids seen so far, from that plan's first batch; an interrupt anywhere (the re-plan
included) resumes bit-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from test_trainer_faults import CFG, _job, assert_same_run

from rl.trainer import Trainer
from saerl_jax.engineering.planner import Plan
from saerl_jax.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
STEPS = dataclasses.replace(CFG, max_steps=5, save_steps=1, eval_steps=0, num_iterations=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join((ASSETS / "problems.jsonl").read_text().splitlines(keepends=True)[:12]))
    return path


def _ids(data: Path) -> list[str]:
    return [json.loads(line)["id"] for line in data.read_text().splitlines()]


def _plan(ids: list[str], path: Path) -> Path:
    batches = [ids[i : i + 2] for i in range(0, len(ids) - 1, 2)]
    stats = [{"stage": 0, "cluster_hist": {"0": 2}, "n_clusters": 1, "mean_difficulty": 1.0, "diversity": None}]
    path.parent.mkdir(parents=True, exist_ok=True)
    Plan(batches=batches, stats=stats * len(batches), config={}, meta={}).save(path)
    return path


class Replanner:
    """Plans the unseen ids in reverse order, and records its calls."""

    def __init__(self, data: Path, out: Path, interrupt_at: int | None = None):
        self.ids, self.out, self.calls = _ids(data), out, []
        self.interrupt_at = interrupt_at

    def __call__(self, step: int, hf: Path, seen: list[str]) -> Path:
        assert (hf / "model.safetensors").is_file()
        if step == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt  # Ctrl-C while the new plan is built
        self.calls.append((step, list(seen), load_file(hf / "model.safetensors")))
        unseen = [i for i in reversed(self.ids) if i not in set(seen)]
        return _plan(unseen, self.out / f"plan-{step}.json")


@pytest.fixture(scope="module")
def replanned(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("replanned")
    replanner = Replanner(data, out / "plans")
    plan = _plan(_ids(data), out / "plan0.json")
    job = _job(
        tiny_model,
        data,
        out / "run",
        STEPS,
        eval_data=None,
        sampler="plan",
        plan=plan,
        replan=replanner,
        replan_steps=2,
    )
    Trainer(job).train()
    return out / "run", replanner, plan


def _trained(out: Path) -> list[list[str]]:
    return [json.loads(line)["ids"] for line in (out / "batches.jsonl").read_text().splitlines()]


def test_each_replan_trains_its_plan_from_the_first_batch(replanned, data):
    out, replanner, plan = replanned
    trained, ids = _trained(out), _ids(data)
    assert [call[0] for call in replanner.calls] == [2, 4]
    assert trained[:2] == Plan.load(plan).batches[:2]
    assert replanner.calls[0][1] == trained[0] + trained[1]  # the ids seen, in training order
    first = [i for i in reversed(ids) if i not in set(trained[0] + trained[1])]
    assert trained[2:4] == [first[0:2], first[2:4]]
    assert replanner.calls[1][1] == [i for batch in trained[:4] for i in batch]
    assert trained[4] == [i for i in reversed(ids) if i not in set(replanner.calls[1][1])][:2]
    # the policy handed to the re-planner is the one after that step, not the initial one
    assert any(
        (a != b).any() for a, b in zip(replanner.calls[0][2].values(), replanner.calls[1][2].values(), strict=True)
    )


@pytest.mark.parametrize(
    ("stop_at", "interrupt_at"),
    [pytest.param(2, None, marks=pytest.mark.slow), pytest.param(3, None, marks=pytest.mark.slow), (5, 4)],
)
def test_a_run_stopped_around_a_replan_resumes_exactly(replanned, tiny_model, data, tmp_path, stop_at, interrupt_at):
    """Stopped at the re-plan's step, one after it, or interrupted inside the second re-plan."""
    reference, _, _ = replanned
    replanner = Replanner(data, tmp_path / "plans", interrupt_at)
    plan = _plan(_ids(data), tmp_path / "plan0.json")
    stopped = dataclasses.replace(STEPS, max_steps=stop_at)
    common = dict(eval_data=None, sampler="plan", plan=plan, replan=replanner, replan_steps=2)
    summary = Trainer(_job(tiny_model, data, tmp_path / "run", stopped, **common)).train()
    assert summary["interrupted"] == (interrupt_at is not None)
    Trainer(_job(tiny_model, data, tmp_path / "run", STEPS, resume=True, **common)).train()
    assert_same_run(tmp_path / "run", reference)


def test_a_changed_replanned_plan_is_refused_on_resume(tiny_model, data, tmp_path):
    replanner = Replanner(data, tmp_path / "plans")
    plan = _plan(_ids(data), tmp_path / "plan0.json")
    common = dict(sampler="plan", plan=plan, replan=replanner, replan_steps=2)
    stopped = dataclasses.replace(STEPS, max_steps=3)
    Trainer(_job(tiny_model, data, tmp_path / "run", stopped, eval_data=None, **common)).train()
    _plan(_ids(data), tmp_path / "plans" / "plan-2.json")  # not what the run trained on
    with pytest.raises(UserError, match="re-planned"):
        Trainer(_job(tiny_model, data, tmp_path / "run", STEPS, eval_data=None, resume=True, **common))


def test_replanning_needs_a_plan_sampler(tiny_model, data, tmp_path):
    job = _job(tiny_model, data, tmp_path, STEPS, replan=Replanner(data, tmp_path), replan_steps=2)
    with pytest.raises(UserError, match="re-planning needs"):
        Trainer(job)
