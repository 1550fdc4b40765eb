"""Cross-model transfer (``scripts/transfer.py``): a plan built from model A's SAE features drives GRPO of a
model B of another size (or family), against B's vanilla (shuffled) run on the same budget over seeds.

Two directions. ``down`` (the default): A is the given model (the shipped tiny-math model) with its SAE, and
B a smaller Qwen2 trained here. ``up``, the paper's way round: A is a smaller Qwen2 trained here, with an
SAE trained here on its residual stream, and B the given (larger) model. The model trained here learns by
the project's SFT (:mod:`saerl_jax.sft`, on the generated SFT problems of the shipped model) and may have
a tokenizer of its own (``SmallModel.vocab_size``: another BPE vocabulary, so token ids mean other things;
plans are over problem ids, so nothing about tokens carries over): another model family. What is trained
here is saved under ``OUT/model-a`` or ``OUT/model-b`` (and ``OUT/model-a-sae``) and reused while its
settings match.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from saerl_jax import sft
from saerl_jax.data import load_tokenizer
from saerl_jax.data.tinymath import build_tokenizer
from saerl_jax.experiments.aggregate import paired_summary
from saerl_jax.experiments.config import StudyConfig
from saerl_jax.experiments.inputs import build_store, training_pool
from saerl_jax.experiments.report import (
    SEED_NOTE,
    arms_table,
    budget_line,
    paired_table,
    plans_table,
    plot_curves,
    write_results,
)
from saerl_jax.experiments.runs import Arm, run_arms
from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2, save_pretrained

SFT_REPORT = "sft_report.json"
SAE_SPEC = "transfer_spec.json"
REFERENCE = "vanilla"

Direction = Literal["down", "up"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmallModel:
    """The model trained here (B with ``direction="down"``, A with ``"up"``): a tiny-math Qwen2 and its SFT."""

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
    vocab_size: int | None = None
    """A tokenizer of its own: a byte-level BPE of this many tokens trained here on the SFT problems (another
    model family); None shares the given tokenizer."""
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmallSAE:
    """The SAE of the small model when it is model A (``direction="up"``), trained by ``saerl train-sae`` on
    the training pool, as the shipped SAE was on the shipped model."""

    layer: int | None = None
    """Residual stream after this many blocks; None: the last block but one (the shipped SAE reads 3 of 4)."""
    d_sae: int | None = None
    """Latents; None: 8 x the small model's width."""
    k: int = 16
    """Active latents per token."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 2048
    """Activations per step."""
    seed: int = 0
    """Initialisation and data-order seed."""


def train_small_model(spec: SmallModel, tokenizer_dir: Path, out: Path, *, progress: bool = True) -> Path:
    """Trains and saves (config, weights, tokenizer, ``sft_report.json``) the small model under ``out``,
    unless ``out`` already holds one trained with ``spec``; returns ``out``. With ``spec.vocab_size`` its
    tokenizer is a new BPE trained on the SFT problems, else the one in ``tokenizer_dir``."""
    report_path = out / SFT_REPORT
    if report_path.is_file() and json.loads(report_path.read_text())["spec"] == dataclasses.asdict(spec):
        print(f"small model: trained before with these settings, reused {out}")
        return out
    started = time.perf_counter()
    rows = sft.tinymath_sft_rows(spec.problems)
    if spec.vocab_size is not None:
        build_tokenizer(rows, out, vocab_size=spec.vocab_size)
    tokenizer = load_tokenizer(out if spec.vocab_size is not None else tokenizer_dir)
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
    shape = f"{spec.layers}-layer, {spec.hidden_size}-wide"
    print(f"small model: SFT of a {shape} Qwen2 for {spec.steps} steps", flush=True)
    losses, _ = sft.train(model, sft.tokenize_sft(tokenizer, rows, cfg.seq_len), cfg, progress=progress)
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


def train_small_sae(spec: SmallSAE, model_dir: Path, data: Path, out: Path, *, progress: bool = True) -> Path:
    """Trains the SAE of ``model_dir`` on ``data`` into ``out`` (SAELens layout), unless ``out`` holds one of
    these settings; an interrupted training of the same settings resumes, one of other settings starts over.
    Returns ``out``."""
    from sae.job import TrainSAEJob, run_train_sae  # the SAE trainer is only needed in this direction

    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    layer = spec.layer if spec.layer is not None else max(1, layers - 1)
    settings = {"spec": dataclasses.asdict(spec), "layer": layer, "model": _sft_report(model_dir), "data": str(data)}
    spec_path = out / SAE_SPEC
    if spec_path.is_file():
        if json.loads(spec_path.read_text()) == settings:
            if (out / "metrics.json").is_file():
                print(f"small model's SAE: trained before with these settings, reused {out}")
                return out
        else:
            shutil.rmtree(out)  # another model or other settings: its checkpoints must not be resumed
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(spec_path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1) + "\n"))
    job = TrainSAEJob(
        model=model_dir,
        layer=layer,
        out=out,
        data=data,
        d_sae=spec.d_sae,
        k=spec.k,
        steps=spec.steps,
        batch_size=spec.batch_size,
        seed=spec.seed,
        checkpoint_every=max(1, spec.steps // 4),
        progress=progress,
    )
    run_train_sae(job)
    return out


def _sft_report(model_dir: Path) -> dict | None:
    """The SFT report of a model trained here (its identity for the SAE trained on it), or None."""
    path = model_dir / SFT_REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def tokenizer_of(model_dir: Path, default: Path) -> Path:
    """The model directory when it holds a tokenizer of its own, else ``default``."""
    own = (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file()
    return model_dir if own else default


def describe_model(directory: Path, tokenizer: Path) -> dict:
    """Path, blocks, width, parameter count and tokenizer (directory, vocabulary size and hash) of an HF Qwen2
    directory."""
    config = json.loads((directory / "config.json").read_text())
    vocab = load_tokenizer(tokenizer).get_vocab()
    parameters = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            parameters += sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())  # noqa: SIM118
    return {
        "path": str(directory),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "parameters": parameters,
        "tokenizer": str(tokenizer),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferConfig(StudyConfig):
    """Options of the transfer study; ``sources`` describes the given model (A when ``down``, B when ``up``)."""

    out: Path = Path("runs/transfer")
    direction: Direction = "down"
    """``down``: the given model's SAE plans for a smaller model trained here; ``up`` (the paper's way round):
    a smaller model trained here, with its own SAE, plans for the given model."""
    model_b: Path | None = None
    """``down``: model B (HF Qwen2 directory; its own tokenizer if it holds one), trained per ``small`` under
    ``out/model-b`` when None. ``up``: model B instead of the sources' model."""
    small: SmallModel = dataclasses.field(default_factory=SmallModel)
    """The small model's architecture, tokenizer and SFT budget when it is trained here."""
    small_sae: SmallSAE = dataclasses.field(default_factory=SmallSAE)
    """The small model's SAE (``up`` only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in ("down", "up"):
            raise ValueError(f"direction is 'down' or 'up', got {self.direction!r}")
        if self.direction == "up" and self.store is not None:
            raise ValueError("a given SAE store is the given model's, but with direction 'up' the small model plans")


def _markdown(summary: dict) -> str:
    a, b = summary["model_a"], summary["model_b"]

    def what(m: dict) -> str:
        return (
            f"`{m['path']}` ({m['layers']} layers, width {m['hidden_size']}, {m['parameters']:,} parameters, "
            f"tokenizer `{m['tokenizer']}` of {m['vocab_size']} tokens)"
        )

    family = (
        "the same tokenizer" if a["vocab_sha256"] == b["vocab_sha256"] else "different tokenizers (other vocabularies)"
    )
    return "\n".join(
        [
            f"# Cross-model transfer of the SAERL plan ({summary['direction']})",
            "",
            f"Model A {what(a)} gave the SAE features of the plan; model B {what(b)} is trained with it and "
            f"without it (vanilla shuffle). A and B have {family}."
            + (
                " `saerl_own_plan` is B's plan from its own SAE, for comparison."
                if "saerl_own_plan" in summary["plans"]
                else ""
            ),
            "",
            budget_line(summary),
            "",
            SEED_NOTE,
            "",
            arms_table(summary),
            f"## Paired differences to {REFERENCE}",
            "",
            paired_table(summary["paired"], REFERENCE, summary["budget"]["k"]),
            "## Plans",
            "",
            plans_table(summary["plans"]),
            "![curves](curves.png)",
            "",
        ]
    )


def run_transfer(cfg: TransferConfig) -> dict:
    """Builds model A's SAE store and plan, model B, runs both arms on B over the seeds, writes the results.
    What is trained here (the small model, its SAE, the store, the plan) is built once and reused."""
    data = training_pool(cfg.sources, cfg.out)
    if cfg.direction == "down":
        model_a, tokenizer_a = cfg.sources.model_dir, cfg.sources.tokenizer_dir
        store = cfg.sae_store(data)
        model_b = cfg.model_b or train_small_model(
            cfg.small, cfg.sources.tokenizer_dir, cfg.out / "model-b", progress=cfg.progress
        )
    else:
        model_a = train_small_model(cfg.small, cfg.sources.tokenizer_dir, cfg.out / "model-a", progress=cfg.progress)
        tokenizer_a = tokenizer_of(model_a, cfg.sources.tokenizer_dir)
        sae_a = train_small_sae(cfg.small_sae, model_a, data, cfg.out / "model-a-sae", progress=cfg.progress)
        sources_a = dataclasses.replace(cfg.sources, model=model_a, sae=sae_a, tokenizer=tokenizer_a)
        store = build_store(
            sources_a, data, cfg.out / "stores" / "sae-a", dense=False, seed=cfg.plan_seed, progress=cfg.progress
        )
        model_b = cfg.model_b or cfg.sources.model_dir
    tokenizer_b = tokenizer_of(model_b, cfg.sources.tokenizer_dir)
    plan, plan_summary = cfg.make_plan(store, data, "saerl-from-a")
    arms = [Arm(name=REFERENCE, sampler="shuffle"), Arm(name="saerl_plan_from_a", sampler="plan", plan=plan)]
    plans = {"saerl_plan_from_a": plan_summary}
    if cfg.direction == "up" and cfg.model_b is None:  # B is the given model, whose own SAE is at hand
        own, plans["saerl_own_plan"] = cfg.make_plan(cfg.sae_store(data), data, "saerl-own")
        arms.append(Arm(name="saerl_own_plan", sampler="plan", plan=own))
    exp = dataclasses.replace(cfg.experiment(model_b, data), tokenizer=tokenizer_b)
    summary = run_arms(exp, arms, target=cfg.target)
    summary["direction"] = cfg.direction
    summary["paired"] = paired_summary(summary["results"], REFERENCE, summary["target"])
    summary["plans"] = plans
    summary["model_a"] = describe_model(model_a, tokenizer_a)
    summary["model_b"] = describe_model(model_b, tokenizer_b)
    draw = functools.partial(plot_curves, summary=summary, title="model B: held-out accuracy (mean, min-max)")
    write_results(cfg.out, summary, _markdown(summary), {"curves.png": draw})
    return summary
