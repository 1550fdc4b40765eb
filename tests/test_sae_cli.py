"""``saerl train-sae`` end to end on a random Qwen2 with its own tokenizer and a problem file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_hf_qwen2, save_tiny_tokenizer

import sae
from saerl_jax.cli import main
from saerl_jax.data import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model-with-tokenizer")
    save_tiny_tokenizer(directory, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    vocab = len(load_tokenizer(directory))
    save_hf_qwen2(directory, vocab_size=vocab, initializer_range=0.2)
    return directory


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    rng = np.random.default_rng(0)
    file = tmp_path_factory.mktemp("data") / "problems.jsonl"
    rows = []
    for _ in range(60):
        a, b = rng.integers(1, 99, size=2)
        rows.append({"question": f"What is {a}+{b}?", "r1_solution_1": f"{a}+{b} = {a + b}. \\boxed{{{a + b}}}"})
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return file


def _args(model_dir, data, out, steps):
    return [
        "train-sae", "--model", str(model_dir), "--layer", "2", "--data", str(data), "--out", str(out),
        "--d-sae", "128", "--k", "8", "--steps", str(steps), "--batch-size", "256", "--lr", "3e-3",
        "--checkpoint-every", "20", "--eval-fraction", "0.1",
    ]  # fmt: skip


def test_train_sae_writes_saelens_files_and_metrics(model_dir, problems, tmp_path, capsys):
    out = tmp_path / "sae"
    main(_args(model_dir, problems, out, steps=60))
    printed = capsys.readouterr().out
    assert "ce_loss_recovered" in printed and f"wrote {out / 'cfg.json'}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"fvu", "explained_variance", "l0", "dead_fraction", "ce_loss_recovered"}
    assert metrics["fvu"] < 0.5
    assert metrics["l0"] == pytest.approx(8.0)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 64 and cfg["d_sae"] == 128 and cfg["k"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["normalize_activations"] == "none"
    loaded = sae.load(out)
    assert loaded.config.metadata.model_name == str(model_dir) and loaded.config.metadata.hook_layer == 2
    # A rerun with the same --out resumes from the final checkpoint: no extra steps, same SAE.
    main(_args(model_dir, problems, out, steps=60))
    again = sae.load(out)
    np.testing.assert_array_equal(np.asarray(again.W_enc[...]), np.asarray(loaded.W_enc[...]))


def test_bad_data_row_is_named(model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "What is 1+1?"}\n{"answer": 3}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: row has neither a 'text' nor a non-empty 'question'"):
        main(_args(model_dir, data, tmp_path / "out", steps=1))
