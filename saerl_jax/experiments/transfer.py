"""Cross-model transfer (``scripts/transfer.py``): a plan built from model A's SAE features drives GRPO of a
model B of another size, against B's vanilla (shuffled) run on the same budget over seeds.

Without a given model B, a smaller tiny-math Qwen2 is trained once by the project's SFT
(:mod:`saerl_jax.sft`, on the same generated SFT problems as the shipped model) and saved under
``OUT/model-b``; it is reused while its settings match (the SFT itself has no mid-run checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from saerl_jax import sft
from saerl_jax.data import load_tokenizer
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.inputs import training_pool
from saerl_jax.experiments.report import SEED_NOTE, arms_table, budget_line, plans_table, plot_curves, write_results
from saerl_jax.experiments.runs import Arm, run_arms
from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2, save_pretrained

SFT_REPORT = "sft_report.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmallModel:
    """Model B when none is given: a smaller tiny-math Qwen2 and its SFT budget."""

    layers: int = 2
    """Decoder blocks."""
    hidden_size: int = 96
    """Residual width."""
    intermediate_size: int = 288
    """MLP width."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads."""
    steps: int = 1500
    """SFT steps (about 0.35 s each on a 2-core CPU; 400 steps gave 10% held-out greedy accuracy)."""
    problems: int = 20_000
    """Generated SFT problems (no noise)."""
    batch_size: int = 64
    """Sequences per SFT step."""
    seq_len: int = 128
    """SFT sequence length."""
    lr: float = 3e-3
    """Peak SFT learning rate."""
    seed: int = 0
    """Initialisation and batch-order seed."""


def train_small_model(spec: SmallModel, tokenizer_dir: Path, out: Path) -> Path:
    """Trains and saves (config, weights, tokenizer, ``sft_report.json``) model B under ``out``, unless ``out``
    already holds one trained with ``spec``; returns ``out``."""
    report_path = out / SFT_REPORT
    if report_path.is_file() and json.loads(report_path.read_text())["spec"] == dataclasses.asdict(spec):
        print(f"model B: trained before with these settings, reused {out}")
        return out
    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = sft.tinymath_sft_rows(spec.problems)
    cfg = sft.SFTConfig(steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=spec.lr, seed=spec.seed)
    config = sft.small_qwen2_config(
        len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
    )
    model = Qwen2(config, rngs=nnx.Rngs(spec.seed))
    print(f"model B: SFT of a {spec.layers}-layer, {spec.hidden_size}-wide Qwen2 for {spec.steps} steps", flush=True)
    losses, _ = sft.train(model, sft.tokenize_sft(tokenizer, rows, cfg.seq_len), cfg)
    save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    report = {
        "spec": dataclasses.asdict(spec),
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(f"wrote {out} (final SFT loss {report['final_loss']:.3f}, {report['seconds']:.0f} s)")
    return out


def describe_model(directory: Path) -> dict:
    """Path, blocks, width and parameter count of an HF Qwen2 directory."""
    config = json.loads((directory / "config.json").read_text())
    parameters = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            parameters += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118
    return {
        "path": str(directory),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "parameters": parameters,
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferConfig(StudyConfig):
    """Options of the transfer study; ``sources`` describes model A (the one whose SAE builds the plan)."""

    out: Path = Path("runs/transfer")
    model_b: Path | None = None
    """Model B (HF Qwen2 directory sharing A's tokenizer); trained per ``small`` under ``out/model-b`` when None."""
    small: SmallModel = dataclasses.field(default_factory=SmallModel)
    """Model B's architecture and SFT budget when it is trained here."""


def _markdown(summary: dict) -> str:
    a, b = summary["model_a"], summary["model_b"]
    sizes = (
        f"Model A `{a['path']}` ({a['layers']} layers, width {a['hidden_size']}, {a['parameters']:,} parameters) "
        f"gave the SAE features of the plan; model B `{b['path']}` ({b['layers']} layers, width {b['hidden_size']}, "
        f"{b['parameters']:,} parameters) is trained with it and without it (vanilla shuffle)."
    )
    return "\n".join(
        [
            "# Cross-model transfer of the SAERL plan",
            "",
            sizes,
            "",
            budget_line(summary),
            "",
            SEED_NOTE,
            "",
            arms_table(summary),
            "## Plan (from model A)",
            "",
            plans_table(summary["plans"]),
            "![curves](curves.png)",
            "",
        ]
    )


def run_transfer(cfg: TransferConfig) -> dict:
    """Builds A's SAE store and plan (unless given), model B (unless given), runs both arms on B over the
    seeds, writes the results."""
    data = training_pool(cfg.sources, cfg.out)
    plan, plan_summary = cfg.make_plan(cfg.sae_store(data), data, "saerl-from-a")
    model_b = cfg.model_b or train_small_model(cfg.small, cfg.sources.tokenizer_dir, cfg.out / "model-b")
    arms = [Arm(name="vanilla", sampler="shuffle"), Arm(name="saerl_plan_from_a", sampler="plan", plan=plan)]
    summary = run_arms(cfg.experiment(model_b, data), arms, target=cfg.target)
    summary["plans"] = {"saerl_plan_from_a": plan_summary}
    summary["model_a"] = describe_model(cfg.sources.model_dir)
    summary["model_b"] = describe_model(model_b)
    draw = functools.partial(plot_curves, summary=summary, title="model B: held-out accuracy (mean, min-max)")
    write_results(cfg.out, summary, _markdown(summary), {"curves.png": draw})
    return summary
