"""``saerl extract``: problems -> chat-formatted tokens -> layer-L residual -> SAE codes -> pooled features.

Work is cut into parts of ``part_size`` samples in dataset order; worker ``shard_index`` of ``num_shards``
(defaults: this JAX process of all) handles parts ``shard_index, shard_index + num_shards, ...`` and
skips parts already on disk, so a killed run resumes with the same command.

The "prompt" span is the question's own tokens by default (``prompt_span="question"``): the chat template's
system turn and role words are the same in every sample, and would otherwise make up most of a short
prompt's pooled tokens. ``prompt_span="template"`` pools the whole rendered prompt, as earlier stores did.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import sae as sae_lib
from sae.activations import token_mask
from saerl_jax.data import FormattedExample, format_example, load_tokenizer
from saerl_jax.data.problems import Problem, column_mapping, load_problems
from saerl_jax.errors import UserError
from saerl_jax.features import pooling
from saerl_jax.features.store import (
    FORMAT_VERSION,
    check_store,
    file_hash,
    finished_parts,
    open_store,
    part_ranges,
    write_part,
)
from saerl_jax.io import atomic_write
from saerl_jax.model import bucket_length, load_pretrained, pad_sequences

SELECTION = "selection.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractJob:
    """Options of ``saerl extract``."""

    model: Path
    """Local HF Qwen2 directory."""
    data: Path
    """Problems, ``.jsonl`` or ``.parquet`` in the DeepMath-103K schema."""
    out: Path
    """Feature store directory."""
    sae: Path | None = None
    """SAE directory (SAELens layout); not needed with ``dense``."""
    tokenizer: Path | None = None
    """Tokenizer directory; defaults to ``model``."""
    layer: int | None = None
    """Capture layer; defaults to the SAE's ``metadata.hook_layer``."""
    dense: bool = False
    """Pool the dense residual stream instead of SAE codes (the paper's dense baseline)."""
    n_latents: int = 240
    """Keep the latents most frequently active on the pooled tokens (of the data, or a sample of it)."""
    latent_ids: Path | None = None
    """A JSON list of latent ids to keep instead of choosing by frequency."""
    selection_sample: int | None = None
    """Count latent frequencies on a seeded sample of this many problems; None counts on all."""
    prompt_span: Literal["question", "template"] = "question"
    """Prompt tokens pooled: the question's own tokens, or the whole chat-formatted prompt (system turn, role
    words and all)."""
    solution_field: str = "r1_solution_1"
    """Reference solution pooled as the solution span."""
    max_solution_tokens: int = 512
    """Solution tokens kept (the budget)."""
    batch_size: int = 16
    """Sequences per forward batch (speed only: a sample's features do not depend on its batch)."""
    part_size: int = 1024
    """Samples per store part."""
    outlier_factor: float = 10.0
    """Tokens with a residual norm over this x their sequence's median are not pooled (attention sinks)."""
    num_shards: int | None = None
    """Workers sharing the store; defaults to ``jax.process_count()``."""
    shard_index: int | None = None
    """This worker; defaults to ``jax.process_index()``."""
    skip_invalid: bool = False
    """Skip invalid problem rows (reported) instead of stopping at the first."""
    column: tuple[str, ...] = ()
    """``field=column`` mappings for datasets with other column names, e.g. ``question=problem``."""
    seed: int = 0
    """Seed of the selection sample."""
    progress: bool = True
    """Progress bars on stderr (latent selection, extraction)."""

    def __post_init__(self) -> None:
        if not self.dense and self.sae is None:
            raise UserError("extract needs --sae (or --dense for pooled hidden states)")
        if self.prompt_span not in ("question", "template"):
            raise UserError(f"prompt_span must be question or template, got {self.prompt_span!r}")
        if self.solution_field not in ("r1_solution_1", "r1_solution_2", "r1_solution_3"):
            raise UserError(f"solution_field must be r1_solution_1..3, got {self.solution_field!r}")
        for name in ("batch_size", "part_size", "n_latents"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


def format_problems(tokenizer, problems: list[Problem], job: ExtractJob) -> list[FormattedExample]:
    """Chat-formatted token ids with prompt and solution spans, the solution cut to its budget."""
    return [
        format_example(
            tokenizer, p.question, getattr(p, job.solution_field), max_solution_tokens=job.max_solution_tokens
        )
        for p in problems
    ]


def pooled_spans(example: FormattedExample, prompt_span: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``[start, end)`` token ranges pooled as the prompt and the solution."""
    return example.question_span if prompt_span == "question" else example.prompt_span, example.solution_span


def bucketed_batches(examples: list[FormattedExample], indices: list[int], batch_size: int, prompt_span: str):
    """Yields ``(rows, ids_BT, mask_BT, spans_B22)``: ``batch_size`` rows of one length bucket each.

    A short last batch of a bucket is filled with copies of its first row (dropped by the caller), so each
    bucket compiles once.
    """
    by_bucket: dict[int, list[int]] = {}
    for i in indices:
        by_bucket.setdefault(bucket_length(len(examples[i].input_ids)), []).append(i)
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            filled = [examples[i] for i in rows + [rows[0]] * (batch_size - len(rows))]
            ids, mask = pad_sequences([e.input_ids for e in filled])
            spans = np.array([pooled_spans(e, prompt_span) for e in filled], np.int32)
            yield rows, ids, mask, spans


class _Encoder:
    """The model (and SAE) split once, with the special-token ids, for the jitted pooling functions."""

    def __init__(self, model, sae, layer: int, special_ids, outlier_factor: float):
        self.model_def, self.model_state = nnx.split(model)
        self.sae_def, self.sae_state = nnx.split(sae) if sae is not None else (None, None)
        self.layer, self.outlier_factor = layer, outlier_factor
        self.special = np.asarray(sorted(special_ids), np.int32)

    def keep(self, ids, mask):
        return jnp.asarray(token_mask(ids, mask, self.special))

    def pooled(self, ids, mask, spans, latents_K):
        return pooling.pooled_codes(
            self.model_def, self.model_state, self.sae_def, self.sae_state,
            jnp.asarray(ids), jnp.asarray(mask), self.keep(ids, mask), jnp.asarray(spans), latents_K,
            layer=self.layer, outlier_factor=self.outlier_factor,
        )  # fmt: skip

    def counts(self, ids, mask, spans):
        return pooling.latent_counts(
            self.model_def, self.model_state, self.sae_def, self.sae_state,
            jnp.asarray(ids), jnp.asarray(mask), self.keep(ids, mask), jnp.asarray(spans),
            layer=self.layer, outlier_factor=self.outlier_factor,
        )  # fmt: skip


def _choose_latents(job, encoder, examples, identity) -> np.ndarray:
    """Latent ids from ``--latent-ids``, from a matching ``selection.json`` in the store, or by counting."""
    if job.latent_ids is not None:
        try:
            ids = json.loads(Path(job.latent_ids).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{job.latent_ids}: not valid JSON ({err})") from err
        d_sae = encoder.sae_state["W_enc"][...].shape[1]
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < d_sae for i in ids) or not ids:
            raise UserError(f"{job.latent_ids}: expected a non-empty JSON list of latent ids in [0, {d_sae})")
        return np.asarray(sorted(set(ids)), np.int32)
    path = job.out / SELECTION
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["identity"] == identity:
            return np.asarray(saved["latent_ids"], np.int32)
    n = len(examples)
    sample = list(range(n))
    if job.selection_sample is not None and job.selection_sample < n:
        sample = sorted(np.random.default_rng(job.seed).choice(n, job.selection_sample, replace=False).tolist())
    counts_F, tokens = 0, 0
    bar = tqdm(total=len(sample), desc="select latents", unit="sample", disable=not job.progress)
    for rows, ids, mask, spans in bucketed_batches(examples, sample, job.batch_size, job.prompt_span):
        mask[len(rows) :] = 0  # filler rows do not count
        batch_counts, batch_tokens = encoder.counts(ids, mask, spans)
        counts_F, tokens = counts_F + np.asarray(batch_counts, np.int64), tokens + int(batch_tokens)
        bar.update(len(rows))
    bar.close()
    latents = pooling.select_latents(counts_F, job.n_latents)
    record = {"identity": identity, "latent_ids": latents.tolist(), "tokens": tokens, "counts": counts_F.tolist()}
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
    return latents


def run_extract(job: ExtractJob) -> Path:
    """Extracts (or resumes) this worker's parts of the store; returns the store directory."""
    loaded = load_problems(job.data, columns=column_mapping(job.column) or None, skip_invalid=job.skip_invalid)
    if loaded.skipped:
        print(loaded.summary())
    problems = loaded.problems
    if not problems:
        raise UserError(f"{job.data}: no valid problems")
    model = load_pretrained(job.model)
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    sae = None if job.dense else sae_lib.load(job.sae)
    layer = _capture_layer(job, model, sae)
    num_shards = jax.process_count() if job.num_shards is None else job.num_shards
    shard_index = jax.process_index() if job.shard_index is None else job.shard_index
    if not 0 <= shard_index < num_shards:
        raise UserError(f"shard_index {shard_index} is not in [0, {num_shards})")

    examples = format_problems(tokenizer, problems, job)
    encoder = _Encoder(model, sae, layer, tokenizer.all_special_ids, job.outlier_factor)
    identity = {
        "model": {"path": str(job.model), "config_hash": file_hash(Path(job.model) / "config.json")},
        "layer": layer,
        "sae": None if sae is None else {"path": str(job.sae), "hash": file_hash(*_sae_files(job.sae))},
        "dataset": {"path": str(job.data), "hash": file_hash(job.data), "columns": column_mapping(job.column)},
        "options": {
            "dense": job.dense,
            "prompt_span": job.prompt_span,
            "solution_field": job.solution_field,
            "max_solution_tokens": job.max_solution_tokens,
            "outlier_factor": job.outlier_factor,
            "n_latents": job.n_latents,
            "selection_sample": job.selection_sample,
            "latent_ids_file": None if job.latent_ids is None else str(job.latent_ids),
            "seed": job.seed,
        },
    }
    # Refuse a store made differently before anything is written to it (selection.json included).
    check_store(job.out, {"format_version": FORMAT_VERSION, **identity}, ("format_version", *identity))
    latents = None if job.dense else _choose_latents(job, encoder, examples, identity)
    columns = pooling.feature_columns(latents, model.config.hidden_size)
    manifest = open_store(
        job.out,
        {
            "format_version": FORMAT_VERSION,
            **identity,
            "latent_ids": None if latents is None else latents.tolist(),
            "columns": columns,
            "ids": [p.id for p in problems],
            "part_size": job.part_size,
        },
    )
    ranges = part_ranges(len(problems), manifest["part_size"])
    done = finished_parts(job.out, manifest)
    todo = [i for i in range(len(ranges)) if i % num_shards == shard_index and i not in done]
    latents_K = jnp.asarray(latents if latents is not None else np.zeros(0, np.int32))
    bar = tqdm(
        total=sum(ranges[i][1] - ranges[i][0] for i in todo), desc="extract", unit="sample", disable=not job.progress
    )
    for index in todo:
        start, end = ranges[index]
        features = np.zeros((end - start, len(columns)), np.float32)
        batches = bucketed_batches(examples, list(range(start, end)), job.batch_size, job.prompt_span)
        for rows, ids, mask, spans in batches:
            pooled = np.asarray(encoder.pooled(ids, mask, spans, latents_K))
            for b, i in enumerate(rows):
                (p0, p1), (s0, s1) = pooled_spans(examples[i], job.prompt_span)
                meta = pooling.text_metadata(
                    problems[i].question, getattr(problems[i], job.solution_field), p1 - p0, s1 - s0
                )
                features[i - start] = np.concatenate([pooled[b], meta])
            bar.update(len(rows))
        write_part(job.out, index, manifest["ids"][start:end], features)
    bar.close()
    left = len(ranges) - len(finished_parts(job.out, manifest))
    status = "complete" if left == 0 else f"{left} of {len(ranges)} parts left for other workers"
    print(f"wrote {job.out} ({len(problems)} samples x {len(columns)} columns, layer {layer}; {status})")
    return job.out


def _capture_layer(job: ExtractJob, model, sae) -> int:
    """``--layer``, else the SAE's capture layer; checked against the model (and the SAE's width)."""
    cfg_file = None if sae is None else Path(job.sae) / sae_lib.io.CFG_FILE
    if sae is not None:
        sae_lib.check_matches_model(sae, model.config.hidden_size, str(job.model), str(cfg_file))
    layer = job.layer if job.layer is not None or sae is None else sae.config.metadata.hook_layer
    if layer is None:
        given = "--dense gives none" if sae is None else f"{cfg_file}: metadata.hook_name is no residual-stream hook"
        raise UserError(f"no capture layer: pass --layer ({given})")
    if not 0 < layer < model.config.num_hidden_layers:
        source = "--layer" if job.layer is not None else cfg_file
        raise UserError(
            f"capture layer {layer} (from {source}) is out of range for {job.model} "
            f"({model.config.num_hidden_layers} layers)"
        )
    return layer


def _sae_files(directory: Path) -> list[Path]:
    return [Path(directory) / sae_lib.io.CFG_FILE, Path(directory) / sae_lib.io.WEIGHTS_FILE]
