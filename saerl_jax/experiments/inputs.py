"""The experiments' inputs, built once under the experiment directory and reused: the training pool (a
subset of the problems when asked), the SAE and dense feature stores (``saerl extract``) and curriculum
plans (``saerl engineer``), with the demo's data-engineering defaults for tiny-math."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import sae as sae_lib
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.engineering.planner import Plan
from saerl_jax.engineering.run import EngineerJob, run_engineer
from saerl_jax.features import ExtractJob, run_extract
from saerl_jax.features.store import MANIFEST, file_hash
from saerl_jax.io import atomic_write

N_CLUSTERS = 32
"""Clusters of the demo's tiny-math data engineering."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sources:
    """Where the model, SAE, tokenizer and problems come from (the tiny-math assets by default)."""

    assets: Path = ASSETS
    """The tiny-math directory; the defaults of the fields below."""
    model: Path | None = None
    """HF Qwen2 directory (``assets/model``): the policy, and the model the features come from."""
    sae: Path | None = None
    """SAE directory (``assets/sae``)."""
    tokenizer: Path | None = None
    """Tokenizer directory (``assets/tokenizer``)."""
    problems: Path | None = None
    """Training pool (``assets/problems.jsonl``)."""
    eval_data: Path | None = None
    """Held-out problems (``assets/eval.jsonl``)."""
    feature_problems: int | None = None
    """Keep only the first this many pool problems (for the stores and for training); None keeps all."""
    extract_batch_size: int = 64
    """Sequences per forward batch when extracting features."""

    @property
    def model_dir(self) -> Path:
        return self.model or self.assets / "model"

    @property
    def sae_dir(self) -> Path:
        return self.sae or self.assets / "sae"

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer or self.assets / "tokenizer"

    @property
    def problems_file(self) -> Path:
        return self.problems or self.assets / "problems.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.eval_data or self.assets / "eval.jsonl"


def training_pool(sources: Sources, out: Path) -> Path:
    """The problems file every arm trains on: the pool, or its first ``feature_problems`` rows written once
    to ``out/pool-N.jsonl`` (left alone when it already holds them, so its hash stays put)."""
    if sources.feature_problems is None:
        return sources.problems_file
    with open(sources.problems_file, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][: sources.feature_problems]
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    path = out / f"pool-{sources.feature_problems}.jsonl"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def build_store(sources: Sources, data: Path, out: Path, *, dense: bool, seed: int = 0, progress: bool = True) -> Path:
    """Extracts (or finishes) the SAE feature store of ``data``, or with ``dense`` the pooled hidden states
    at the SAE's layer (the paper's dense baseline); ``saerl extract`` skips the parts already written."""
    layer = sae_lib.load(sources.sae_dir).config.metadata.hook_layer
    job = ExtractJob(
        model=sources.model_dir,
        tokenizer=sources.tokenizer_dir,
        sae=None if dense else sources.sae_dir,
        dense=dense,
        layer=layer,
        data=data,
        out=out,
        batch_size=sources.extract_batch_size,
        part_size=4096,
        selection_sample=4096,
        seed=seed,
        progress=progress,
    )
    return run_extract(job)


def build_plan(job: EngineerJob) -> tuple[Path, dict]:
    """``run_engineer(job)`` unless ``job.out`` already holds the plan of these options, store and data;
    returns the plan file and its :meth:`Plan.summary`."""
    path, report_path = job.out / "plan.json", job.out / "report.json"
    config = json.loads(json.dumps(dataclasses.asdict(job), default=str))
    if path.is_file() and report_path.is_file():
        plan = Plan.load(path)
        same_inputs = plan.meta.get("store_manifest") == file_hash(job.store / MANIFEST)
        same_inputs = same_inputs and plan.meta.get("data") == file_hash(job.data)
        if same_inputs and json.loads(report_path.read_text())["config"] == config:
            print(f"plan {path}: built before with these options, reused")
            return path, plan.summary()
    report = run_engineer(job)
    return path, report["plan"]


def plan_job(store: Path, data: Path, out: Path, *, batch_size: int, n_clusters: int, seed: int, **options):
    """The :class:`EngineerJob` of an experiment plan: plans only (the probes script runs the probes)."""
    return EngineerJob(
        store=store,
        data=data,
        out=out,
        n_clusters=n_clusters,
        batch_size=batch_size,
        seed=seed,
        probes=False,
        **options,
    )
