"""Every ``saerl`` command reports a user error as one line ``saerl <command>: error: ...`` naming the file,
field or value, exits non-zero, and leaves nothing behind that a rerun would trust; ``--debug`` shows the
traceback, and a bug keeps its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import save_hf_qwen2
from flax import nnx

import sae as sae_lib
import saerl_jax.cli as cli
from saerl_jax.cli import main
from saerl_jax.data.problems import ProblemDataError
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS

TOKENIZER = ASSETS / "tokenizer"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model (hidden size 64), an SAE of width 32 (wrong for it), good and malformed problem files, and a
    feature store whose manifest.json is cut off mid-way."""
    root = tmp_path_factory.mktemp("cli-errors")
    save_hf_qwen2(root / "model", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    config = sae_lib.SAEConfig(d_in=32, d_sae=48, k=4, metadata=sae_lib.SAEMetadata(hook_layer=2))
    sae_lib.save(sae_lib.SparseAutoencoder(config, rngs=nnx.Rngs(0)), root / "sae-32")
    rows = [json.loads(line) for line in (ASSETS / "problems.jsonl").read_text().splitlines()[:4]]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1] | {"question": ""}) + "\n")
    (root / "store").mkdir()
    (root / "store" / "manifest.json").write_text('{"format_version": 1, "model": {"path": "m')
    return root


def _fails(argv: list[str], *named: str) -> str:
    """Runs ``saerl argv`` in-process; checks it exits non-zero with one line that names everything in ``named``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str), f"expected a one-line message, got exit code {message!r}"  # str: exit status 1
    assert message.startswith(f"saerl {argv[0]}: error: ") and "\n" not in message
    for name in named:
        assert str(name) in message
    return message


def _extract(inputs, out, **options) -> list[str]:
    argv = ["extract", "--model", str(inputs / "model"), "--tokenizer", str(TOKENIZER), "--layer", "2"]
    argv += ["--data", str(inputs / "problems.jsonl"), "--out", str(out)]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return argv


def test_extract_with_a_missing_model_directory(inputs, tmp_path):
    _fails(_extract(inputs, tmp_path / "store", model=tmp_path / "no-model", dense=True), tmp_path / "no-model")
    assert not (tmp_path / "store").exists()


def test_extract_with_an_sae_of_another_width(inputs, tmp_path):
    message = _fails(_extract(inputs, tmp_path / "store", sae=inputs / "sae-32"), inputs / "sae-32" / "cfg.json")
    assert "d_in=32" in message and "hidden size 64" in message
    assert not (tmp_path / "store").exists()


def test_extract_with_a_malformed_row(inputs, tmp_path):
    _fails(_extract(inputs, tmp_path / "store", data=inputs / "bad.jsonl", dense=True), "bad.jsonl:2", "question")
    assert not (tmp_path / "store").exists()


def test_extract_option_checks_are_user_errors(inputs, tmp_path):
    _fails(_extract(inputs, tmp_path / "store", batch_size=0, dense=True), "batch_size must be >= 1, got 0")
    _fails(_extract(inputs, tmp_path / "store", dense=True, layer=7), "capture layer 7", "--layer", "3 layers")
    assert not (tmp_path / "store").exists()


def test_engineer_on_a_truncated_manifest(inputs, tmp_path):
    argv = ["engineer", "--store", str(inputs / "store"), "--data", str(inputs / "problems.jsonl")]
    _fails([*argv, "--out", str(tmp_path / "plan")], inputs / "store" / "manifest.json", "not valid JSON")
    assert not (tmp_path / "plan" / "plan.json").exists()
    _fails([*argv, "--out", str(tmp_path / "plan")][:-2], "--out")  # a required option given nowhere


def test_report_without_a_plan(tmp_path):
    _fails(["report", "--plan", str(tmp_path)], tmp_path / "plan.json")
    assert not (tmp_path / "report.md").exists()


def test_train_sae_with_a_missing_model_and_a_bad_row(inputs, tmp_path):
    argv = ["train-sae", "--layer", "2", "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "sae")]
    _fails([*argv, "--model", str(tmp_path / "nothing"), "--data", str(inputs / "problems.jsonl")], "nothing")
    (tmp_path / "docs.jsonl").write_text('{"text": "1 + 1"}\n{"text": \n')
    _fails([*argv, "--model", str(inputs / "model"), "--data", str(tmp_path / "docs.jsonl")], "docs.jsonl:2")
    assert not (tmp_path / "sae").exists()


def test_train_fails_before_the_trainer_is_built(inputs, tmp_path):
    argv = ["train", "--data", str(inputs / "problems.jsonl"), "--out", str(tmp_path / "run")]
    _fails([*argv, "--model", str(tmp_path / "no-model")], tmp_path / "no-model")
    bad = ["train", "--model", str(inputs / "model"), "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "run")]
    _fails([*bad, "--data", str(inputs / "bad.jsonl")], "bad.jsonl:2", "question")
    _fails(["train", "--algo", "grpo", "--loss-type", "nope", *argv[1:]], "loss_type")
    assert not (tmp_path / "run").exists()


def test_eval_with_a_missing_model_or_benchmark_file(inputs, tmp_path):
    argv = ["eval", "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "eval")]
    bench = f"gsm8k={tmp_path / 'gsm8k.jsonl'}"
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    _fails([*argv, "--model", str(tmp_path / "no-model"), "--bench", bench], tmp_path / "no-model")
    _fails([*argv, "--model", str(inputs / "model"), "--bench", "gsm8k=missing.jsonl"], "missing.jsonl")
    assert not (tmp_path / "eval").exists()


def test_demo_with_missing_assets(tmp_path):
    _fails(["demo", "--assets", str(tmp_path), "--out", str(tmp_path / "out")], tmp_path / "tokenizer")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_debug_shows_the_traceback_globally_or_per_command(inputs, tmp_path):
    argv = _extract(inputs, tmp_path / "store", data=inputs / "bad.jsonl", dense=True)
    with pytest.raises(ProblemDataError, match=r"bad\.jsonl:2"):
        main(["--debug", *argv])
    with pytest.raises(ProblemDataError, match=r"bad\.jsonl:2"):
        main([*argv, "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(directory):
        raise RuntimeError("a bug, not the user's doing")

    monkeypatch.setattr(cli, "render_report", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", "--plan", str(tmp_path)])


def test_the_installed_command_prints_one_line_to_stderr(inputs, tmp_path):
    argv = _extract(inputs, tmp_path / "store", model=tmp_path / "no-model", dense=True)
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "saerl_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"saerl extract: error: {tmp_path / 'no-model'}: not a directory"]
