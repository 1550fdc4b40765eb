"""The GRPO / DAPO trainer: rewards go up on a learnable task, a killed run resumes exactly, the exported
Hugging Face directory gives transformers the same logits, and the config / prompt-queue / dynamic
sampling pieces behave."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rl.collect import NoSignalError, PromptQueue, collect, loss_mask
from rl.config import DAPOConfig, GRPOConfig, config_from_dict
from rl.metrics import read_metrics
from rl.rollout import Rollout
from rl.trainer import Trainer, TrainJob
from saerl_jax.data.problems import load_problems
from saerl_jax.engineering.planner import CurriculumPlanner
from saerl_jax.errors import UserError
from saerl_jax.model import forward, load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
TIMING = {"rollout_s", "update_s", "tokens_per_s", "compiles", "compile_s"}  # depend on the run, not the data


def digit_share(completions, answers):
    """A dense reward a random model can climb: the share of characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _job(model: Path, out: Path, config: GRPOConfig, **overrides) -> TrainJob:
    fields = dict(
        model=model,
        data=ASSETS / "problems.jsonl",
        out=out,
        config=config,
        reward=digit_share,
        reward_workers=0,
        tensorboard=False,
        progress=False,
    )
    return TrainJob(**{**fields, **overrides})


def test_reward_goes_up_on_a_learnable_task(tiny_model, tmp_path):
    cfg = GRPOConfig(
        batch_size=4,
        num_generations=8,
        max_prompt_length=96,
        max_completion_length=8,
        beta=0.0,
        learning_rate=1e-2,
        max_steps=25,
        save_steps=25,
    )
    Trainer(_job(tiny_model, tmp_path, cfg)).train()
    rewards = [row["reward_mean"] for row in read_metrics(tmp_path)]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > max(5 * first, 0.5), rewards  # about 0.02 -> 0.9 with this seed


def test_a_step_trains_exactly_one_plan_batch_in_plan_order(tiny_model, tmp_path):
    problems = load_problems(ASSETS / "problems.jsonl", limit=30).problems
    ids = [p.id for p in problems]
    rng = np.random.default_rng(0)
    plan = CurriculumPlanner(batch_size=4, n_stages=2, mixing_ratio=0.25).plan(
        ids, [p.difficulty for p in problems], rng.integers(3, size=30), rng.integers(20, 90, size=30)
    )
    plan.save(tmp_path / "plan.json")
    cfg = GRPOConfig(batch_size=4, num_generations=2, max_prompt_length=96, max_completion_length=4, max_steps=3)
    out = tmp_path / "run"
    Trainer(_job(tiny_model, out, cfg, sampler="plan", plan=tmp_path)).train()
    trained = [json.loads(line)["ids"] for line in (out / "batches.jsonl").read_text().splitlines()]
    assert trained == plan.batches[:3]
    assert [row["batch_index"] for row in read_metrics(out)] == [0, 1, 2]
    assert {row["planned_share"] for row in read_metrics(out)} == {1.0}
    with pytest.raises(UserError, match=r"plan's batches hold 4 ids but batch_size=2.*--batch-size 2"):
        Trainer(
            _job(tiny_model, tmp_path / "other", dataclasses.replace(cfg, batch_size=2), sampler="plan", plan=tmp_path)
        )


@pytest.mark.slow
def test_continuous_rollouts_train_what_static_rollouts_train(tiny_model, tmp_path):
    """The slot engine (3 slots for 8 completions a step, so slots are refilled) samples the static
    sampler's completions, so the run's rewards, lengths and held-out greedy accuracy are the same."""
    cfg = GRPOConfig(
        batch_size=4,
        num_generations=2,
        max_prompt_length=96,
        max_completion_length=6,
        max_steps=2,
        eval_steps=2,
        eval_limit=5,
        rollout_batch_size=3,
    )
    rows = {}
    for engine in ("static", "continuous"):
        out = tmp_path / engine
        job = _job(tiny_model, out, dataclasses.replace(cfg, rollout_engine=engine), eval_data=ASSETS / "eval.jsonl")
        Trainer(job).train()
        rows[engine] = read_metrics(out)
    for static, continuous in zip(rows["static"], rows["continuous"], strict=True):
        for key in ("reward_mean", "completion_length", "eval_accuracy"):
            assert static.get(key) == continuous.get(key), key
        assert static["loss"] == pytest.approx(continuous["loss"], abs=1e-5)
    assert rows["continuous"][-1]["eval_accuracy"] is not None


def test_export_loads_in_transformers_with_the_same_logits(tiny_model, tmp_path):
    cfg = DAPOConfig(
        batch_size=2,
        num_generations=4,
        max_prompt_length=96,
        max_completion_length=8,
        overlong_buffer_len=4,
        learning_rate=1e-3,
        max_steps=2,
        max_num_gen_batches=8,
    )
    trainer = Trainer(_job(tiny_model, tmp_path, cfg))
    trainer.train()
    trained = nnx.merge(trainer.graphdef, trainer.state.params)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 512, (2, 11))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(trained, ids)), expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(forward(load_pretrained(tmp_path / "hf"), ids)), expected, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|im_end|>"
    rows = read_metrics(tmp_path)
    row = rows[-1]
    assert {"kl", "clip_region", "entropy", "groups_filtered", "frac_reward_zero_std", "truncation_rate"} <= set(row)
    assert rows[0]["compiles"] > 0 and trainer.compiles == sum(r["compiles"] for r in rows)


def test_compile_counter_counts_new_programs_only():
    from rl.metrics import CompileCounter

    fn = jax.jit(lambda x: x * 3 + 1)
    five, zeros, seven = np.ones(5, np.float32), np.zeros(5, np.float32), np.ones(7, np.float32)
    with CompileCounter() as first:
        fn(five)
    with CompileCounter() as again:
        fn(five)
        fn(zeros)
    with CompileCounter() as other:
        fn(seven)  # a new shape
    assert first.compiles >= 1 and again.compiles == 0 and other.compiles >= 1


# --- the pieces ------------------------------------------------------------------------------------------


def test_configs_validate_and_round_trip():
    dapo = DAPOConfig()
    assert (dapo.loss_type, dapo.beta, dapo.epsilon_high, dapo.dynamic_sampling) == ("dapo", 0.0, 0.28, True)
    assert config_from_dict(json.loads(json.dumps(dapo.to_dict()))) == dapo
    assert config_from_dict(GRPOConfig(beta=0.1).to_dict()) == GRPOConfig(beta=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3"):
        GRPOConfig(batch_size=2, num_generations=4, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        GRPOConfig(max_completion_length=8, overlong_buffer_len=9)
    with pytest.raises(ValueError, match="unknown grpo config fields: bogus"):
        config_from_dict({"algo": "grpo", "bogus": 1})


def _sampler_batches(sizes):
    """Fake Grain batches of the given sizes with ids p0, p1, ... and prompts of growing length."""
    start = 0
    for size in sizes:
        ids = np.zeros((size, 6), np.int32)
        mask = np.zeros_like(ids)
        for row in range(size):
            n = 2 + (start + row) % 4
            ids[row, 6 - n :], mask[row, 6 - n :] = np.arange(1, n + 1) + start + row, 1
        yield {
            "input_ids": ids,
            "attention_mask": mask,
            "ids": np.array([f"p{start + r}" for r in range(size)]),
            "final_answer": np.array([str(start + r) for r in range(size)]),
        }
        start += size


def test_prompt_queue_takes_exactly_one_sampler_batch_and_truncates():
    queue = PromptQueue(_sampler_batches([2, 2, 2]), length=4, pad_id=9)
    first = queue.take()
    assert list(first["ids"]) == ["p0", "p1"] and first["index"] == 0
    np.testing.assert_array_equal(first["input_ids"][0], [9, 9, 1, 2])  # p0: 2 tokens, left-padded
    np.testing.assert_array_equal(first["attention_mask"][1], [0, 1, 1, 1])
    second = queue.take()
    assert list(second["ids"]) == ["p2", "p3"] and second["index"] == 1
    np.testing.assert_array_equal(second["input_ids"][0], [3, 4, 5, 6])  # p2 had 4 tokens
    np.testing.assert_array_equal(second["input_ids"][1], [5, 6, 7, 8])  # p3 had 4..8: its last 4 kept
    assert queue.truncated == 1
    saved = json.loads(json.dumps(queue.state()))
    fresh = PromptQueue(iter([]), length=4)
    fresh.restore(saved)
    assert fresh.state() == {"taken": 2, "truncated": 1}


def _fake_roll(prompts, draw, g=2, n=3):
    b = len(prompts["ids"]) * g
    zeros = np.zeros((b, n), np.int32)
    tokens = np.repeat(np.arange(b)[:, None], n, axis=1)
    return Rollout(
        np.repeat(prompts["input_ids"], g, 0),
        np.repeat(prompts["attention_mask"], g, 0),
        tokens,
        zeros + 1,
        zeros.astype(np.float32),
        np.zeros(b, bool),
    )


def test_dynamic_sampling_drops_flat_groups_and_refills():
    cfg = DAPOConfig(batch_size=3, num_generations=2, max_completion_length=3, overlong_buffer_len=0)
    queue = PromptQueue(_sampler_batches([3] * 10), length=6)

    # Prompt p<k> has differing rewards only when k % 3 == 0 (its rows score 0 and 1).
    def reward_fn(completions, answers, rollout):
        rewards = np.array([float(int(a) % 3 == 0 and i % 2) for i, a in enumerate(answers)], np.float32)
        return rewards, rewards

    graded = collect(queue, cfg, _fake_roll, lambda t: [str(r) for r in t], reward_fn)
    assert graded.sample_ids == ["p0", "p3", "p6"]  # one from the planned batch, refills from the next two
    assert graded.stats == {
        "batch_index": 0,
        "frac_reward_zero_std": pytest.approx(2 / 3),
        "groups_filtered": 6,
        "gen_batches": 3,
        "planned_share": pytest.approx(1 / 3),
    }
    assert queue.taken == 3  # the next step starts at the next unused batch
    np.testing.assert_array_equal(graded.rewards_B, [0, 1, 0, 1, 0, 1])
    assert graded.rollout.completion_ids_BN.shape == (6, 3)

    flat = PromptQueue(_sampler_batches([3] * 10), length=6)
    with pytest.raises(NoSignalError, match="max_num_gen_batches=2"):
        collect(
            flat,
            dataclasses.replace(cfg, max_num_gen_batches=2),
            _fake_roll,
            lambda t: [""] * len(t),
            lambda c, a, r: (np.zeros(len(c)), np.zeros(len(c))),
        )


def test_dynamic_sampling_filters_on_accuracy_not_the_shaped_reward():
    # All eight completions are correct; the last is penalised for length. Its shaped rewards differ, and
    # group-std scaling would turn 0.0625 into advantages of 0.35 and -2.46: DAPO filters on accuracy.
    cfg = DAPOConfig(batch_size=1, num_generations=8, max_completion_length=3, max_num_gen_batches=1)

    def reward_fn(completions, answers, rollout):
        return np.array([1.0] * 7 + [0.9375], np.float32), np.ones(8, np.float32)

    def graded(metric):
        queue = PromptQueue(_sampler_batches([1] * 3), length=6)
        config = dataclasses.replace(cfg, filter_groups_metric=metric)
        return collect(queue, config, functools.partial(_fake_roll, g=8), lambda t: [""] * len(t), reward_fn)

    with pytest.raises(NoSignalError, match="equal accuracy"):
        graded("accuracy")
    assert graded("reward").sample_ids == ["p0"]
    with pytest.raises(ValueError, match="filter_groups_metric"):
        DAPOConfig(filter_groups_metric="loss")


def test_config_checks_generations_and_scales_the_overlong_buffer():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    assert DAPOConfig(max_completion_length=20480).overlong_buffer_tokens == 4096  # the DAPO paper's 20%
    assert DAPOConfig(max_completion_length=64).overlong_buffer_tokens == 13
    assert DAPOConfig(max_completion_length=8, overlong_buffer_len=2).overlong_buffer_tokens == 2
    assert GRPOConfig().overlong_buffer_tokens == 0
    assert config_from_dict(DAPOConfig().to_dict()) == DAPOConfig()


def test_loss_mask_drops_truncated_completions_only_when_asked():
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], np.int32)
    rollout = Rollout(*(np.zeros((3, 1)),) * 3, mask, np.zeros((3, 3)), np.array([False, True, False]))
    np.testing.assert_array_equal(loss_mask(rollout, False), mask)
    np.testing.assert_array_equal(loss_mask(rollout, True), [[1, 1, 0], [0, 0, 0], [1, 1, 1]])


def test_saerl_train_command_runs_resumes_and_documents_every_option(tiny_model, tmp_path, capsys):
    from rl.config import field_docs
    from saerl_jax.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for name in field_docs(DAPOConfig):
        assert "--" + name.replace("_", "-") in help_text, name
    argv = ["train", "--model", str(tiny_model), "--data", str(ASSETS / "problems.jsonl"), "--out", str(tmp_path)]
    argv += ["--batch-size", "2", "--num-generations", "2", "--max-prompt-length", "96"]
    argv += ["--max-completion-length", "6", "--reward-workers", "0", "--no-tensorboard", "--algo", "dapo"]
    argv += ["--dynamic-sampling", "false", "--overlong-buffer-len", "2"]
    assert main([*argv, "--max-steps", "2"]) == 0
    assert f"wrote {tmp_path}" in capsys.readouterr().out
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]
    saved = json.loads(next((tmp_path / "checkpoints" / "3").glob("meta*/*")).read_text())
    assert saved["config"]["algo"] == "dapo" and saved["config"]["dynamic_sampling"] is False
    with pytest.raises(SystemExit, match="loss_type must be one of"):
        main([*argv, "--loss-type", "ppo"])
