"""The ``saerl`` command: the demo job and YAML option files."""

from __future__ import annotations

import json

import pytest

from saerl_jax.cli import main
from saerl_jax.model import load_pretrained


def test_demo_runs_and_writes_a_loadable_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layer"] == 3
    assert [c["shape"] for c in summary["capture"]] == [[2, 20, 256], [2, 45, 256], [2, 100, 256]]
    assert summary["generate"]["tokens_shape"] == [2, 4]
    assert summary["generate"]["mean_logprob"] < 0
    assert load_pretrained(tmp_path / "model").config.num_hidden_layers == 4
    assert f"wrote {tmp_path / 'summary.json'}" in capsys.readouterr().out


def test_yaml_config_sets_options_and_flags_override_it(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(f"out: {tmp_path / 'from-yaml'}\nlayer: 1\nbatch_size: 1\nmax-new-tokens: 2\n")
    main(["demo", "--config", str(config), "--layer", "2"])
    summary = json.loads((tmp_path / "from-yaml" / "summary.json").read_text())
    assert summary["layer"] == 2
    assert summary["generate"]["tokens_shape"] == [1, 2]


def test_yaml_config_with_an_unknown_key_is_refused(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("layers: 3\n")
    with pytest.raises(SystemExit):
        main(["demo", "--config", str(config)])
    assert "unknown option(s) layers" in capsys.readouterr().err
