"""Supervised fine-tuning: loss masks, seeded batches, a few real optimiser steps, the tiny-math SFT rows and
model config, and scripts/train_tinymath_sft.py end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from saerl_jax import sft
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.data.tinymath import generate
from saerl_jax.model import Qwen2, Qwen2Config, load_pretrained

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _tokenizer():
    return load_tokenizer(ASSETS / "tokenizer")


def test_loss_mask_covers_the_solution_and_the_end_token():
    tokenizer = _tokenizer()
    rows = generate(5, seed=1, noise_fraction=0.0)
    data = sft.tokenize_sft(tokenizer, rows, seq_len=128)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(rows):
        example = format_example(tokenizer, row["question"], row["r1_solution_1"])
        n = len(example.input_ids) + 1
        assert data.attention_mask[i].sum() == n and data.input_ids[i, n - 1] == end_id
        masked = data.input_ids[i][data.loss_mask[i].astype(bool)]
        assert tokenizer.decode(masked[:-1].tolist()) == row["r1_solution_1"] and masked[-1] == end_id
    cut = sft.tokenize_sft(tokenizer, rows, seq_len=20)
    assert cut.input_ids.shape == (5, 20) and cut.attention_mask.all()


def test_batches_are_seeded_epochs_of_every_row():
    data = sft.SFTData(*(np.arange(10)[:, None].repeat(3, 1) for _ in range(3)))
    cfg = sft.SFTConfig(steps=10, batch_size=5, seed=3)
    first = [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg)]
    assert first == [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg)]
    for epoch in range(5):
        assert sorted(first[2 * epoch] + first[2 * epoch + 1]) == list(range(10))
    resumed = [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg, start_step=4)]
    assert resumed == first[4:]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    tokenizer = _tokenizer()
    rows = generate(16, seed=2, noise_fraction=0.0)
    data = sft.tokenize_sft(tokenizer, rows, seq_len=96)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = Qwen2(config, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    losses, evaluations = sft.train(
        model,
        data,
        sft.SFTConfig(steps=12, batch_size=16, lr=1e-2, warmup_steps=2),
        evaluate=lambda m, step: json.dumps(step),
        eval_every=6,
        progress=False,
    )
    assert losses[-1] < losses[0] - 1.0
    assert evaluations == {6: "6", 12: "12"}
    after = nnx.state(model, nnx.Param)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_small_config_matches_the_shipped_tiny_math_model():
    shipped = json.loads((ASSETS / "model" / "config.json").read_text())
    config = sft.small_qwen2_config(
        len(_tokenizer()),
        hidden_size=shipped["hidden_size"],
        intermediate_size=shipped["intermediate_size"],
        layers=shipped["num_hidden_layers"],
        heads=shipped["num_attention_heads"],
        kv_heads=shipped["num_key_value_heads"],
    )
    for field in ("vocab_size", "tie_word_embeddings", "max_position_embeddings", "head_dim"):
        assert getattr(config, field) == shipped.get(field, getattr(config, field)), field
    assert config.tie_word_embeddings and config.vocab_size == shipped["vocab_size"]


def test_sft_rows_are_seeded_clean_and_apart_from_the_shipped_sets():
    rows = sft.tinymath_sft_rows(50)
    assert rows == sft.tinymath_sft_rows(50)
    shipped_ids = {
        json.loads(line)["id"]
        for name in ("eval.jsonl", "problems.jsonl")
        for line in (ASSETS / name).read_text().splitlines()
        if line.strip()
    }
    assert not shipped_ids & {row["id"] for row in rows}
    assert all(row["final_answer"] in row["r1_solution_1"] for row in rows)  # no noise rows


def test_train_tinymath_sft_script_writes_a_loadable_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tinymath_sft", SCRIPTS / "train_tinymath_sft.py")
    train_tinymath_sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tinymath_sft)
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS / "tokenizer", assets / "tokenizer")
    eval_lines = (ASSETS / "eval.jsonl").read_text().splitlines()[:6]
    (assets / "eval.jsonl").write_text("\n".join(eval_lines) + "\n")
    train_tinymath_sft.main(
        ["--assets", str(assets), "--n-sft", "32", "--steps", "3", "--batch-size", "8", "--seq-len", "96",
         "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
         "--eval-every", "2", "--eval-slice", "3", "--stop-at", "2.0"]
    )  # fmt: skip
    report = json.loads((assets / "model" / "sft_report.json").read_text())
    assert report["steps_run"] == 3 and set(report["evaluations"]) == {"2"}
    assert 0.0 <= report["eval_accuracy"] <= 1.0
    model = load_pretrained(assets / "model")
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 1
