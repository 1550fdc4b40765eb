"""The GRPO / DAPO trainer: rewards go up on a learnable task, a killed run resumes exactly, the exported
Hugging Face directory gives transformers the same logits, and the config / prompt-queue / dynamic
sampling pieces behave."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import save_hf_qwen2
from flax import nnx
from safetensors.numpy import load_file

from rl.collect import NoSignalError, PromptQueue, collect, loss_mask
from rl.config import DAPOConfig, GRPOConfig, config_from_dict
from rl.metrics import read_metrics
from rl.rollout import Rollout
from rl.trainer import Trainer, TrainJob
from saerl_jax.model import forward, load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
TIMING = {"rollout_s", "update_s", "tokens_per_s"}


def digit_share(completions, answers):
    """A dense reward a random model can climb: the share of characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Qwen2 over the tiny-math tokenizer, saved by transformers with its tokenizer."""
    directory = tmp_path_factory.mktemp("policy")
    save_hf_qwen2(
        directory,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory


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


class _Interrupted(Trainer):
    """Presses Ctrl-C once ``stop_at`` steps are done."""

    stop_at = 3

    def train_one_step(self):
        if self.step == self.stop_at:
            raise KeyboardInterrupt
        return super().train_one_step()


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_killed_run_resumes_exactly(tiny_model, tmp_path):
    cfg = GRPOConfig(
        batch_size=4,
        num_generations=4,
        max_prompt_length=96,
        max_completion_length=8,
        beta=0.05,  # the frozen reference is reloaded on resume
        num_iterations=2,  # old-policy log-probs
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_steps=4,
        save_steps=2,
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    Trainer(_job(tiny_model, straight, cfg)).train()

    summary = _Interrupted(_job(tiny_model, broken, cfg)).train()
    assert summary["interrupted"] and summary["step"] == 3 and "hf" not in summary
    assert (broken / "checkpoints" / "3").is_dir()  # Ctrl-C saved the step it reached
    shutil.rmtree(broken / "checkpoints" / "3")  # ... now pretend the process was killed before that save
    assert len(read_metrics(broken)) == 3
    resumed = Trainer(_job(tiny_model, broken, cfg, resume=True))
    assert resumed.step == 2
    assert resumed.train()["step"] == 4

    assert _rows(broken) == _rows(straight)
    assert (broken / "batches.jsonl").read_text() == (straight / "batches.jsonl").read_text()
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(broken / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    start = load_file(tiny_model / "model.safetensors")
    assert any(not np.array_equal(start[name], a[name]) for name in a)  # training moved the weights

    with pytest.raises(ValueError, match=r"different config.*learning_rate"):
        Trainer(_job(tiny_model, broken, dataclasses.replace(cfg, learning_rate=1.0), resume=True))
    longer = Trainer(_job(tiny_model, broken, dataclasses.replace(cfg, max_steps=5), resume=True))
    assert longer.step == 4


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
    row = read_metrics(tmp_path)[-1]
    assert {"kl", "clip_region", "entropy", "groups_filtered", "frac_reward_zero_std", "truncation_rate"} <= set(row)


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


def test_prompt_queue_crosses_batches_saves_leftovers_and_truncates():
    queue = PromptQueue(_sampler_batches([3, 3, 3]), length=4, pad_id=9)
    first = queue.take(2)
    assert list(first["ids"]) == ["p0", "p1"]
    np.testing.assert_array_equal(first["input_ids"][0], [9, 9, 1, 2])  # p0: 2 tokens, left-padded
    np.testing.assert_array_equal(first["attention_mask"][1], [0, 1, 1, 1])
    second = queue.take(2)  # p2 left over from the first batch, p3 from the second
    assert list(second["ids"]) == ["p2", "p3"]
    np.testing.assert_array_equal(second["input_ids"][0], [3, 4, 5, 6])  # p2 had 4 tokens
    np.testing.assert_array_equal(second["input_ids"][1], [5, 6, 7, 8])  # p3 had 4..8: its last 4 kept
    assert queue.truncated == 1
    saved = json.loads(json.dumps(queue.state()))
    fresh = PromptQueue(iter([]), length=4)
    fresh.restore(saved)
    assert list(fresh.take(2)["ids"]) == ["p4", "p5"]


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

    graded = collect(queue, 3, cfg, _fake_roll, lambda t: [str(r) for r in t], reward_fn)
    assert graded.sample_ids == ["p0", "p3", "p6"]
    assert graded.stats == {"frac_reward_zero_std": pytest.approx(2 / 3), "groups_filtered": 6, "gen_batches": 3}
    np.testing.assert_array_equal(graded.rewards_B, [0, 1, 0, 1, 0, 1])
    assert graded.rollout.completion_ids_BN.shape == (6, 3)

    flat = PromptQueue(_sampler_batches([3] * 10), length=6)
    with pytest.raises(NoSignalError, match="max_num_gen_batches=2"):
        collect(
            flat,
            3,
            dataclasses.replace(cfg, max_num_gen_batches=2),
            _fake_roll,
            lambda t: [""] * len(t),
            lambda c, a, r: (np.zeros(len(c)), np.zeros(len(c))),
        )


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
