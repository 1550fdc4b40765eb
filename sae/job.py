"""``saerl train-sae``: train an SAE on a Qwen2 model's layer-L activations over a text or problem file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from flax import nnx

from sae.activations import ArraySource, ModelSource, load_activation_shards, token_mask
from sae.io import check_matches_model, saelens_hook_name, save
from sae.metrics import ce_loss_recovered, reconstruction_metrics
from sae.model import Architecture, SAEConfig, SAEMetadata, SparseAutoencoder
from sae.train import TrainConfig, train
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write
from saerl_jax.model import load_pretrained, pad_sequences
from saerl_jax.precision import DType, cast_floating, resolve_compute_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSAEJob:
    """Options of ``saerl train-sae``."""

    model: Path
    """Local HF Qwen2 directory."""
    layer: int
    """Residual stream after this many blocks (``output_hidden_states[layer]``)."""
    out: Path
    """Output directory: SAELens files, ``metrics.json``, ``checkpoints/``."""
    data: Path | None = None
    """Text (``.txt``, one document per line) or ``.jsonl`` rows with ``text`` or ``question`` (+
    ``r1_solution_1``), formatted with the chat template."""
    activations: Path | None = None
    """Directory of cached ``*.npy`` activation shards to train on instead of streaming."""
    tokenizer: Path | None = None
    """Tokenizer directory; defaults to ``model``."""
    architecture: Architecture = "topk"
    """SAE variant."""
    d_sae: int | None = None
    """Latents; default 8 x the hidden size."""
    k: int = 32
    """Active latents per token (topk / batchtopk)."""
    normalize_activations: bool = True
    """Scale inputs to mean squared norm d_in during training (folded into the saved weights)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 4096
    """Activations per step."""
    lr: float | None = None
    """Peak learning rate (default scales with d_sae)."""
    max_tokens: int = 512
    """Tokens kept per document."""
    eval_fraction: float = 0.05
    """Documents held out for the final metrics."""
    seed: int = 0
    """Seed of initialisation and data order."""
    checkpoint_every: int = 500
    """Steps between checkpoints; a rerun with the same ``out`` resumes."""
    param_dtype: DType = "float32"
    """The SAE's master weights and optimizer state during training."""
    compute_dtype: DType | None = None
    """The model's forward (the activations) and the SAE's matmuls; None: bfloat16 on accelerators, float32
    on CPU."""
    progress: bool = True
    """A progress bar on stderr."""


def read_documents(path: Path, tokenizer, max_tokens: int) -> list[np.ndarray]:
    """Token sequences of a ``.txt`` or ``.jsonl`` file; a bad row is an error naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    sequences = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            ids = tokenizer.encode(line, add_special_tokens=False)
        elif path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err})") from err
            if isinstance(row.get("text"), str):
                ids = tokenizer.encode(row["text"], add_special_tokens=False)
            elif isinstance(row.get("question"), str) and row["question"]:
                ids = format_example(tokenizer, row["question"], row.get("r1_solution_1")).input_ids.tolist()
            else:
                raise UserError(f"{path}:{line_no}: row has neither a 'text' nor a non-empty 'question' string")
        else:
            raise UserError(f"{path}: unsupported data format {path.suffix!r} (use .txt or .jsonl)")
        if ids:
            sequences.append(np.asarray(ids[:max_tokens], np.int32))
    if not sequences:
        raise UserError(f"{path}: no documents")
    return sequences


def run_train_sae(job: TrainSAEJob) -> dict[str, float]:
    """Trains, saves and evaluates the SAE; prints a metrics table and returns the metrics."""
    if job.data is None:
        raise UserError("train-sae needs --data (documents for training and evaluation)")
    compute_dtype = resolve_compute_dtype(job.compute_dtype)
    graphdef, weights = nnx.split(load_pretrained(job.model))
    model = nnx.merge(graphdef, cast_floating(weights, compute_dtype))  # computes in compute_dtype
    if not 0 < job.layer < model.config.num_hidden_layers:
        raise UserError(
            f"--layer {job.layer} is out of range for {job.model} ({model.config.num_hidden_layers} layers)"
        )
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    special = sorted(set(tokenizer.all_special_ids))
    sequences = read_documents(job.data, tokenizer, job.max_tokens)
    n_eval = max(1, math.ceil(len(sequences) * job.eval_fraction))
    if len(sequences) <= n_eval:
        raise UserError(f"{job.data}: {len(sequences)} documents are too few to hold out {n_eval} for evaluation")
    train_seqs, eval_seqs = sequences[:-n_eval], sequences[-n_eval:]
    hidden = model.config.hidden_size
    config = SAEConfig(
        d_in=hidden,
        d_sae=job.d_sae or 8 * hidden,
        architecture=job.architecture,
        k=job.k,
        normalize_activations="expected_average_only_in" if job.normalize_activations else "none",
        metadata=SAEMetadata(
            model_name=str(job.model),
            hook_name=saelens_hook_name(job.layer),
            hook_layer=job.layer,
            dataset_path=str(job.activations or job.data),
            context_size=job.max_tokens,
        ),
    )
    if job.activations is not None:
        acts = load_activation_shards(job.activations)
        source = ArraySource(acts, job.batch_size, seed=job.seed)
    else:
        source = ModelSource(
            model, job.layer, train_seqs, batch_size=job.batch_size, special_ids=special, seed=job.seed
        )
    if source.d_in != hidden:
        raise UserError(
            f"{job.activations}: activations have width {source.d_in}, but the model's hidden size is {hidden}"
        )
    sae = SparseAutoencoder(config, rngs=nnx.Rngs(job.seed))
    check_matches_model(sae, hidden, str(job.model))
    cfg = TrainConfig(
        total_steps=job.steps,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed,
        checkpoint_every=job.checkpoint_every,
        param_dtype=job.param_dtype,
        compute_dtype=compute_dtype,
    )
    job.out.mkdir(parents=True, exist_ok=True)
    sae, _ = train(sae, source, cfg, checkpoint_dir=job.out / "checkpoints", progress=job.progress)
    save(sae, job.out)
    eval_source = ModelSource(
        model, job.layer, eval_seqs, batch_size=1, special_ids=special, sequences_per_round=len(eval_seqs)
    )
    metrics = reconstruction_metrics(sae, eval_source.round_activations(0))
    ids, mask = pad_sequences(eval_seqs)
    metrics |= ce_loss_recovered(model, sae, job.layer, ids, mask, token_mask(ids, mask, special))
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    atomic_write(job.out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    print(
        f"\nSAE {config.architecture} d_in={config.d_in} d_sae={config.d_sae} at layer {job.layer}, held-out metrics:"
    )
    for name, value in metrics.items():
        print(f"  {name:<20} {value:10.4f}")
    print(f"wrote {job.out / 'cfg.json'}, {job.out / 'sae_weights.safetensors'}, {job.out / 'metrics.json'}")
    return metrics
