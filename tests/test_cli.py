"""The ``saerl`` command: the demo on the shipped tiny-math assets, and YAML option files."""

from __future__ import annotations

import json

import pytest

import sae
import saerl_jax.cli as cli
from saerl_jax.cli import main
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.demo import DemoConfig


@pytest.mark.slow  # the whole pipeline, about 60 s of CPU; `make demo` runs it at full size
def test_demo_smoke_run_on_a_few_dozen_problems(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--problems", "24", "--eval-problems", "16", "--batch-size", "16"]
    argv += ["--feature-problems", "200", "--n-clusters", "4"]
    argv += ["--grpo-steps", "2", "--grpo-batch-size", "4", "--grpo-generations", "2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == sae.load(ASSETS / "sae").config.metadata.hook_layer == 3
    assert summary["problems"] == 24 and summary["eval_problems"] == 16
    assert 0.0 <= summary["sae"]["fvu"] < 1.0
    assert summary["sae"]["l0"] > 0
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert set(summary["not_run"]) == {"comparison"}
    grpo = summary["grpo"]
    assert grpo["steps"] == 2 and len(grpo["reward"]) == 2 and 0.0 <= grpo["accuracy_after"] <= 1.0
    assert (out / "grpo" / "hf" / "model.safetensors").is_file()
    plan = json.loads((out / "plan" / "plan.json").read_text())["batches"]
    trained = [json.loads(line)["ids"] for line in (out / "grpo" / "batches.jsonl").read_text().splitlines()]
    assert trained == plan[:2]  # the plan's batches (of the GRPO batch size), in order
    assert summary["features"]["samples"] == 200 and summary["features"]["columns"] == 4 * 240 + 5
    probes = summary["engineering"]["probes"]["sae"]
    assert probes["topic"]["accuracy"]["mean"] > probes["topic"]["majority_baseline"]
    assert summary["engineering"]["plan"]["n_samples"] <= 200
    assert (out / "plan" / "plan.json").is_file() and (out / "features" / "manifest.json").is_file()
    report = (out / "report.md").read_text()
    assert "| ce_loss_recovered |" in report and "![accuracy](accuracy.png)" in report
    assert "topic probe accuracy: SAE" in report and "![plan](plan/plan.png)" in report
    assert "## GRPO on the curriculum plan" in report and "![grpo](grpo.png)" in report
    for name in ("accuracy.png", "latent_frequency.png", "features_pca.png", "plan/plan.png", "grpo.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.md'}" in printed and "skipped:" in printed


def test_yaml_config_sets_options_and_flags_override_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_demo", seen.append)
    config = tmp_path / "demo.yaml"
    config.write_text(f"out: {tmp_path / 'from-yaml'}\nproblems: 7\neval-problems: 5\n")
    main(["demo", "--config", str(config), "--eval-problems", "3"])
    assert seen == [DemoConfig(out=tmp_path / "from-yaml", problems=7, eval_problems=3)]


@pytest.mark.parametrize(
    ("text", "refused"),
    [("layers: 3\n", "layers"), ("run: nothing\ncommand: train\n", "command, run")],  # unknown; the parser's own
)
def test_yaml_config_with_an_unknown_key_is_refused(tmp_path, capsys, text, refused):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        main(["demo", "--config", str(config)])
    assert f"unknown option(s) {refused}" in capsys.readouterr().err


def test_demo_names_missing_assets(tmp_path):
    with pytest.raises(SystemExit, match=r"^saerl demo: error: .*tokenizer"):
        main(["demo", "--assets", str(tmp_path), "--out", str(tmp_path / "out")])


def test_train_and_extract_pass_column_skip_invalid_and_prompt_span(tmp_path, monkeypatch):
    jobs = []
    monkeypatch.setattr(cli, "run_train", lambda job: jobs.append(job) or {"out": job.out})
    monkeypatch.setattr(cli, "run_extract", jobs.append)
    common = ["--model", str(tmp_path), "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]
    mapping = ["--column", "question=problem", "--column", "final_answer=answer", "--skip-invalid"]
    main(["train", *common, *mapping])
    main(["extract", *common, "--dense", *mapping, "--prompt-span", "template"])
    main(["extract", *common, "--dense"])
    train, extract, default = jobs
    assert train.column == extract.column == ("question=problem", "final_answer=answer")
    assert train.skip_invalid and extract.skip_invalid
    assert (extract.prompt_span, default.prompt_span) == ("template", "question")
