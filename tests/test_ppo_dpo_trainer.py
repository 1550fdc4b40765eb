"""PPO and DPO in the trainer: each learns a learnable task from a random model, a run stopped and resumed
ends where an uninterrupted one does (the value model, the pair-sampling snapshot and the offline store
included), and the exported policy is the policy. Every test that trains runs under ``make test-slow``
(two minutes together: the default suite's time budget); the offline store's file format and the command's
options are checked in the default suite without training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from rl.config import DPOConfig, PPOConfig, config_from_dict
from rl.metrics import read_metrics
from rl.trainer import Trainer, TrainJob
from saerl_jax.model import load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
TIMING = {"rollout_s", "update_s", "tokens_per_s", "compiles", "compile_s"}


def digit_share(completions, answers):
    """A dense reward a random model can climb: the share of characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def has_digit(completions, answers):
    """A 0/1 reward a random model sometimes earns (about one completion in eight at first)."""
    return [float(any(c.isdigit() for c in text)) for text in completions]


def _job(model: Path, out: Path, config, reward, **overrides) -> TrainJob:
    fields = dict(
        model=model,
        data=ASSETS / "problems.jsonl",
        out=out,
        config=config,
        reward=reward,
        reward_workers=0,
        tensorboard=False,
        progress=False,
    )
    return TrainJob(**{**fields, **overrides})


def _rewards(out: Path) -> list[float]:
    return [row["reward_mean"] for row in read_metrics(out)]


@pytest.mark.slow
def test_ppo_learns_a_learnable_task(tiny_model, tmp_path):
    cfg = PPOConfig(
        batch_size=8,
        max_prompt_length=96,
        max_completion_length=8,
        learning_rate=1e-2,
        kl_coef=0.0,
        num_ppo_epochs=2,
        num_mini_batches=2,
        max_steps=25,
        save_steps=25,
    )
    Trainer(_job(tiny_model, tmp_path, cfg, digit_share)).train()
    rewards = _rewards(tmp_path)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > max(5 * first, 0.5), rewards  # about 0.01 -> 0.9 with this seed


@pytest.mark.slow
def test_dpo_learns_from_pairs_of_its_own_rollouts(tiny_model, tmp_path):
    cfg = DPOConfig(
        batch_size=4,
        num_generations=8,
        max_prompt_length=96,
        max_completion_length=8,
        learning_rate=1e-2,
        max_steps=25,
        save_steps=25,
    )
    Trainer(_job(tiny_model, tmp_path, cfg, has_digit)).train()
    rows = read_metrics(tmp_path)
    rewards = _rewards(tmp_path)
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > max(3 * first, 0.6), rewards  # about 0.2 -> 0.95 with this seed
    assert all(row["pairs"] + row["prompts_without_pair"] == 4 for row in rows)
    trained = [row for row in rows if row["pairs"]]
    assert np.mean([row["reward_accuracy"] for row in trained[-5:]]) > 0.7


def _resumes_exactly(model: Path, tmp_path: Path, cfg, reward, steps: int = 4, stop: int = 2) -> dict:
    """Runs ``steps`` at once and ``stop`` + resume; returns the uninterrupted run's final state params."""
    full, split = tmp_path / "full", tmp_path / "split"
    final = {}
    for out, plan in ((full, [steps]), (split, [stop, steps])):
        for n, end in enumerate(plan):
            config = dataclasses.replace(cfg, max_steps=end, save_steps=stop)
            trainer = Trainer(_job(model, out, config, reward, resume=n > 0))
            trainer.train()
        final[out.name] = jax.tree.map(np.asarray, trainer.state)
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert strip(read_metrics(split)) == strip(read_metrics(full))
    jax.tree.map(np.testing.assert_array_equal, final["split"], final["full"])
    return final["full"]


@pytest.mark.slow
def test_ppo_resumes_exactly_with_its_value_model(tiny_model, tmp_path):
    cfg = PPOConfig(batch_size=4, max_prompt_length=96, max_completion_length=6, learning_rate=1e-3, num_ppo_epochs=2)
    state = _resumes_exactly(tiny_model, tmp_path, cfg, digit_share, steps=3, stop=1)
    assert set(state.params) == {"policy", "critic", "value_head"}
    assert np.abs(state.params["value_head"]["kernel"]).sum() > 0  # the value model trained
    saved = json.loads(next((tmp_path / "full" / "checkpoints" / "3").glob("meta*/*")).read_text())
    assert saved["config"]["algo"] == "ppo"
    assert dataclasses.replace(config_from_dict(saved["config"]), max_steps=3, save_steps=1) == dataclasses.replace(
        cfg.with_resolved_precision(), max_steps=3, save_steps=1
    )
    exported = load_pretrained(tmp_path / "full" / "hf")
    policy = jax.tree.map(np.asarray, state.params["policy"])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(exported), policy)


@pytest.mark.slow
@pytest.mark.parametrize("pairs", ["online", "offline"])
def test_dpo_resumes_exactly(tiny_model, tmp_path, pairs):
    """Online with a refresh every 3 steps (the snapshot taken at step 0 is restored at step 2 and replaced
    at step 3), and offline (the stored rollouts are read back, not sampled again)."""
    cfg = DPOConfig(
        batch_size=4,
        num_generations=8,
        max_prompt_length=96,
        max_completion_length=6,
        learning_rate=1e-3,
        pairs=pairs,
        pair_refresh_steps=3,
        loss_type="ipo",
    )
    state = _resumes_exactly(tiny_model, tmp_path, cfg, has_digit)
    assert (state.frozen is not None) == (pairs == "online")
    rows = read_metrics(tmp_path / "full")
    assert sum(row["pairs"] for row in rows) > 0
    if pairs == "offline":
        stored = (tmp_path / "split" / "offline_rollouts.jsonl").read_text().splitlines()
        ids = [json.loads(line)["id"] for line in stored]
        assert len(ids) == len(set(ids)) == 16  # each prompt sampled once, the resumed run read them back


def test_train_command_documents_and_checks_ppo_and_dpo_options(tiny_model, tmp_path, capsys):
    from saerl_jax.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--kl-coef", "--kl-estimator", "--value-model", "--num-ppo-epochs", "--pairs", "--pair-refresh-steps"):
        assert flag in help_text, flag
    assert "dpo: DPO's inverse temperature" in " ".join(help_text.split())
    argv = ["train", "--model", str(tiny_model), "--data", str(ASSETS / "problems.jsonl"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="epsilon: GRPO options that ppo does not use"):
        main([*argv, "--algo", "ppo", "--epsilon", "0.3"])
    with pytest.raises(SystemExit, match="loss_type must be one of \\('sigmoid', 'ipo'\\)"):
        main([*argv, "--algo", "dpo", "--loss-type", "grpo"])


def test_offline_store_reads_back_its_rows_and_drops_a_torn_line(tmp_path):
    from rl.collect import RolloutStore
    from rl.rollout import Rollout

    path = tmp_path / "offline_rollouts.jsonl"
    store = RolloutStore(path, width=4, pad_id=0)
    ids_GN = np.array([[5, 6, 2, 0], [7, 8, 9, 1]], np.int32)
    mask_GN = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)
    prompt = np.ones((2, 3), np.int32)
    store.add("p1", Rollout(prompt, prompt, ids_GN, mask_GN, np.zeros((2, 4), np.float32), np.array([False, True])))
    with path.open("a") as f:
        f.write('{"id": "p2", "completions": [[1, 2')  # a run killed mid-write
    again = RolloutStore(path, width=4, pad_id=0)
    assert "p1" in again and "p2" not in again
    rollout = again.rollout(["p1"], prompt, prompt)
    np.testing.assert_array_equal(rollout.completion_ids_BN, ids_GN * mask_GN)
    np.testing.assert_array_equal(rollout.completion_mask_BN, mask_GN)
    np.testing.assert_array_equal(rollout.truncated_B, [False, True])
