"""The shipped tiny-math model and SAE: loadable by saerl-jax and transformers alike, and as good as
``assets/tiny-math/README.md`` says."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import sae
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.model import forward, load_pretrained
from saerl_jax.sft import greedy_accuracy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(ASSETS / "model"), load_tokenizer(ASSETS / "tokenizer")


def test_saerl_and_transformers_agree_on_the_shipped_model(shipped):
    model, tokenizer = shipped
    rows = _rows("eval.jsonl")[:6]
    examples = [format_example(tokenizer, r["question"], r["r1_solution_1"]).input_ids for r in rows]
    width = max(len(e) for e in examples)
    ids = np.zeros((len(examples), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(examples):  # left padding, as generation sees prompts
        ids[i, width - len(e) :], mask[i, width - len(e) :] = e, 1
    ours = np.asarray(forward(model, ids, mask))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(ASSETS / "model", local_files_only=True).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.slow  # 13 s: `make test-slow`
def test_greedy_accuracy_is_in_the_documented_range(shipped):
    model, tokenizer = shipped
    text = (ASSETS / "README.md").read_text()
    found = re.search(r"first (\d+) problems of `eval.jsonl`.*?accepted range \[([\d.]+), ([\d.]+)\]", text, re.S)
    assert found, "assets/tiny-math/README.md must state the held-out accuracy and its accepted range"
    n, low, high = int(found[1]), float(found[2]), float(found[3])
    accuracy, _ = greedy_accuracy(model, tokenizer, _rows("eval.jsonl")[:n], batch_size=64)
    assert low <= accuracy <= high, f"greedy accuracy {accuracy:.3f} on {n} held-out problems"
    assert low >= 0.3 and high <= 0.6 + 1e-9  # the model solves some problems, not all: room for RL


def test_shipped_sae_fits_the_model_and_its_metrics(shipped):
    model, _ = shipped
    shipped_sae = sae.load(ASSETS / "sae")
    sae.check_matches_model(shipped_sae, model.config.hidden_size)
    layer = shipped_sae.config.metadata.hook_layer
    assert 0 < layer < model.config.num_hidden_layers
    metrics = json.loads((ASSETS / "sae" / "metrics.json").read_text())
    assert metrics["fvu"] < 0.3 and metrics["ce_loss_recovered"] > 0.8


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    assert total < 30 * 2**20, f"assets/tiny-math holds {total / 2**20:.1f} MiB"
