"""``scripts/smoke_real.py`` at the cut Qwen2.5-Math-1.5B shape: every stage runs, parity and export hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_real_cut_1p5b(tmp_path):
    """About 3 minutes and 9 GB of memory on a 2-core CPU."""
    script = ROOT / "scripts" / "smoke_real.py"
    subprocess.run([sys.executable, script, "--shapes", "1.5b-2l", "--out", tmp_path], cwd=ROOT, check=True)
    result = json.loads((tmp_path / "results.json").read_text())["1.5b-2l"]
    stages = ["make-model", "load", "parity", "train-sae", "extract", "engineer", "train", "export-check"]
    assert list(result["stages"]) == stages
    assert all(f["seconds"] > 0 and f["peak_rss_gib"] > 0 for f in result["stages"].values())
    parity, export = result["checks"]["parity"], result["checks"]["export-check"]
    assert parity["capture_layer"] == 1
    assert parity["hidden_max_abs_diff"] < 1e-4 < parity["hidden_max_abs"]
    assert parity["logits_max_abs_diff"] < 1e-4 < parity["logits_max_abs"]
    assert export["logits_max_abs_diff"] < 1e-4 < export["logits_max_abs"]
    assert export["max_abs_update"] > 0
    config = json.loads((tmp_path / "1.5b-2l" / "run" / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (1536, 2, 151936)
    plan = json.loads((tmp_path / "1.5b-2l" / "plan" / "plan.json").read_text())
    assert {len(batch) for batch in plan["batches"]} == {2}
