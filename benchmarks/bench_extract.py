"""Samples/s of ``saerl extract`` against a straightforward PyTorch pipeline, on CPU in float32.

Both sides get the same problems (the first ``--samples`` rows of ``assets/tiny-math/problems.jsonl``,
DeepMath schema), the same tokenizer and chat formatting (:func:`saerl_jax.data.format_example`, solution
cut to 512 tokens), the same random Qwen2 (vocab 512; hidden 512, MLP 1,408, 8 layers, 8 query / 2
key-value heads: about 23M parameters, built by transformers and saved with ``save_pretrained``; the
newline token's embedding is scaled to 100x the median residual norm so the outlier mask drops it, like
an attention sink), the same random TopK SAE (``d_sae = 8 * hidden``, k = 32, small random biases, saved
with :func:`sae.save`), the same capture layer L (default ``3 * layers // 4``), the same fixed list of
latents and the same batch size. Each side does the whole job: read the problems, load tokenizer, model
and SAE, tokenize, run the model to layer L, drop special tokens and tokens whose residual norm is over
10x the batch median of the kept ones, TopK-encode, mean- and max-pool the selected latents over the
prompt and solution spans, add the text metadata columns and write the features to disk. Loads and
tokenization are timed on both sides (and also shown apart).

- ours: :func:`saerl_jax.features.run_extract` with an :class:`ExtractJob` (``latent_ids`` = the list),
  a fresh store directory per timed run. Its JIT compiles are paid by an untimed warm-up run on a small
  store holding up to one batch of each length bucket; the timed runs must compile nothing (checked).
- torch: the same host steps, then batches of problems sorted by length and right padded, under
  ``torch.no_grad()`` with ``torch.set_num_threads(os.cpu_count())``; the residual is
  ``model(ids, mask, output_hidden_states=True).hidden_states[L]`` (all layers and the LM head run), and in
  a second variant the model is truncated to its first L blocks (``model.model.layers[:L]``, final norm
  replaced by identity, base model only), which does no more work than ours. TopK in torch: top-k of
  ``(x - b_dec) @ W_enc + b_enc``, ReLU, scattered into dense codes, the selected latents gathered.

The torch features must equal the store's (max abs difference printed; at most 0.01% of values may differ,
from TopK near-ties), which shows both did the same work. The latent list is the 240 most frequent latents
counted by the warm-up run. Run it with::

    .venv/bin/python benchmarks/bench_extract.py            # defaults: minutes on 2 cores
    .venv/bin/python benchmarks/bench_extract.py --quick    # smaller model, 256 samples, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import safetensors.torch
import torch
import transformers
from flax import nnx

import sae as sae_lib
from saerl_jax.data import FormattedExample, format_example, load_problems, load_tokenizer
from saerl_jax.features import ExtractJob, load_store, run_extract, text_metadata
from saerl_jax.features import pooling as our_pooling
from saerl_jax.model import bucket_length, load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
MAX_SOLUTION_TOKENS = 512
OUTLIER_FACTOR = 10.0
SINK_SCALE = 100.0
"""The newline token's embedding norm over the median residual norm at layer L."""
QUICK_ARGS = dict(samples=256, hidden=128, layers=4, intermediate=352, heads=4, kv_heads=2)


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in :data:`QUICK_ARGS` for the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=Path, default=ASSETS / "problems.jsonl", help="DeepMath-schema JSONL")
    parser.add_argument("--tokenizer", type=Path, default=ASSETS / "tokenizer", help="tokenizer directory")
    parser.add_argument("--samples", type=int, default=2048, help="first N problems of --problems")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward batch, both sides")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size D")
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks")
    parser.add_argument("--intermediate", type=int, default=1408, help="MLP width")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key-value heads")
    parser.add_argument("--layer", type=int, default=None, help="capture layer L; default 3 * layers // 4")
    parser.add_argument("--expansion", type=int, default=8, help="SAE latents per hidden unit")
    parser.add_argument("--k", type=int, default=32, help="SAE TopK k")
    parser.add_argument("--n-latents", type=int, default=240, help="latents pooled (most frequent in warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per pipeline; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="small model and 256 samples for a smoke run")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK_ARGS)
        args = parser.parse_args()
    args.layer = 3 * args.layers // 4 if args.layer is None else args.layer
    if not 0 < args.layer <= args.layers or args.repeats < 1 or args.samples < 1:
        parser.error("need 0 < --layer <= --layers, --repeats >= 1 and --samples >= 1")
    return args


def write_checkpoints(args: argparse.Namespace, vocab_size: int, sink_id: int, root: Path) -> tuple[Path, Path]:
    """Saves the random Qwen2 (transformers) and TopK SAE (with small random biases); returns both dirs.

    Token ``sink_id``'s embedding is scaled to :data:`SINK_SCALE` x the median layer-L residual norm, so
    the outlier mask drops it on both sides, as it drops attention sinks of a trained model.
    """
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        ids_BT = torch.randint(vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        median = model(ids_BT, output_hidden_states=True).hidden_states[args.layer].norm(dim=-1).median()
        row_D = model.model.embed_tokens.weight[sink_id]
        row_D *= SINK_SCALE * median / row_D.norm()
    model.save_pretrained(root / "model")
    sae_config = sae_lib.SAEConfig(
        d_in=args.hidden,
        d_sae=args.expansion * args.hidden,
        k=args.k,
        metadata=sae_lib.SAEMetadata(hook_layer=args.layer),
    )
    sae = sae_lib.SparseAutoencoder(sae_config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sae.b_enc[...] = rng.normal(0, 0.01, sae_config.d_sae).astype(np.float32)
    sae.b_dec[...] = rng.normal(0, 0.01, sae_config.d_in).astype(np.float32)
    sae_lib.save(sae, root / "sae")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {config.num_hidden_layers} layers")
    return root / "model", root / "sae"


def write_rows(lines: list[str], rows: list[int], path: Path) -> Path:
    """Writes the chosen JSONL lines to ``path``."""
    path.write_text("".join(lines[i] for i in rows))
    return path


def warmup_rows(examples: list[FormattedExample], batch_size: int) -> list[int]:
    """Up to ``batch_size`` rows of each length bucket, so a warm-up compiles every shape the run needs."""
    by_bucket: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        by_bucket.setdefault(bucket_length(len(example.input_ids)), []).append(i)
    return sorted(i for rows in by_bucket.values() for i in rows[:batch_size])


def run_ours(job: ExtractJob) -> float:
    """Seconds of one ``run_extract`` (its progress bar and messages captured; shown if it fails)."""
    captured = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            run_extract(job)
    except Exception:
        print(captured.getvalue())
        raise
    return time.perf_counter() - start


def ours_setup_seconds(job: ExtractJob) -> float:
    """What ``run_extract`` spends before its first batch: problems, model, tokenizer, SAE, tokenization."""
    start = time.perf_counter()
    problems = load_problems(job.data).problems
    load_pretrained(job.model)
    tokenizer = load_tokenizer(job.tokenizer)
    sae_lib.load(job.sae)
    for p in problems:
        format_example(tokenizer, p.question, p.r1_solution_1, max_solution_tokens=job.max_solution_tokens)
    return time.perf_counter() - start


def torch_residual(model: transformers.Qwen2ForCausalLM, layer: int, truncated: bool) -> Callable:
    """``(ids_BT, mask_BT) -> x_BTD`` at layer L: via ``output_hidden_states``, or from L blocks alone."""
    if not truncated:
        return lambda ids, mask: model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states[layer]
    base = model.model
    base.layers = base.layers[:layer]
    base.norm = torch.nn.Identity()
    return lambda ids, mask: base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def torch_pool(x_BTD, keep_BT, spans_B22, weights: dict, k: int, latents_K) -> tuple[torch.Tensor, int]:
    """Outlier mask, TopK codes of the selected latents, mean/max over both spans: ``[B, 4K]``, outliers."""
    norm_BT = x_BTD.norm(dim=-1)
    median = torch.quantile(norm_BT[keep_BT], 0.5)  # the mean of the two middle values, as jnp.nanmedian
    inlier_BT = norm_BT <= OUTLIER_FACTOR * median
    outliers = int((keep_BT & ~inlier_BT).sum())
    keep_BT = keep_BT & inlier_BT
    pre_BTF = (x_BTD - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top_BTk, index_BTk = pre_BTF.topk(k, dim=-1)
    codes_BTF = torch.zeros_like(pre_BTF).scatter_(-1, index_BTk, top_BTk.relu())
    values_BTK = codes_BTF[..., latents_K]
    t_T = torch.arange(x_BTD.shape[1])
    pooled = []
    for s in range(2):
        in_BT = keep_BT & (t_T >= spans_B22[:, s, :1]) & (t_T < spans_B22[:, s, 1:])
        count_B1 = in_BT.sum(dim=1, keepdim=True)
        mean_BK = (values_BTK * in_BT[..., None]).sum(dim=1) / count_B1.clamp(min=1)
        max_BK = values_BTK.masked_fill(~in_BT[..., None], -torch.inf).amax(dim=1)
        pooled += [mean_BK, torch.where(count_B1 > 0, max_BK, 0.0)]
    return torch.cat(pooled, dim=-1), outliers


def run_torch(paths: dict[str, Path], args: argparse.Namespace, truncated: bool) -> tuple[float, float, int]:
    """The PyTorch pipeline end to end; writes ``paths["out"]``. Returns seconds, setup seconds, outliers."""
    start = time.perf_counter()
    problems = load_problems(paths["data"]).problems
    tokenizer = load_tokenizer(paths["tokenizer"])
    examples = [
        format_example(tokenizer, p.question, p.r1_solution_1, max_solution_tokens=MAX_SOLUTION_TOKENS)
        for p in problems
    ]
    model = transformers.Qwen2ForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    residual = torch_residual(model, args.layer, truncated)
    weights = safetensors.torch.load_file(paths["sae"] / sae_lib.io.WEIGHTS_FILE)
    latents_K = torch.tensor(json.loads(paths["latents"].read_text()))
    special = torch.tensor(tokenizer.all_special_ids)
    setup = time.perf_counter() - start
    features = np.zeros((len(problems), 4 * len(latents_K) + len(our_pooling.METADATA_COLUMNS)), np.float32)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    outliers = 0
    with torch.no_grad():
        for first in range(0, len(order), args.batch_size):
            rows = order[first : first + args.batch_size]
            ids_BT = torch.zeros(len(rows), max(len(examples[i].input_ids) for i in rows), dtype=torch.long)
            mask_BT = torch.zeros_like(ids_BT)
            for b, i in enumerate(rows):
                ids_BT[b, : len(examples[i].input_ids)] = torch.from_numpy(examples[i].input_ids)
                mask_BT[b, : len(examples[i].input_ids)] = 1
            spans_B22 = torch.tensor([[examples[i].prompt_span, examples[i].solution_span] for i in rows])
            keep_BT = mask_BT.bool() & ~torch.isin(ids_BT, special)
            x_BTD = residual(ids_BT, mask_BT)
            pooled_BC, batch_outliers = torch_pool(x_BTD, keep_BT, spans_B22, weights, args.k, latents_K)
            outliers += batch_outliers
            for b, i in enumerate(rows):
                (p0, p1), (s0, s1) = examples[i].prompt_span, examples[i].solution_span
                meta = text_metadata(problems[i].question, problems[i].r1_solution_1, p1 - p0, s1 - s0)
                features[i] = np.concatenate([pooled_BC[b].numpy(), meta])
    np.savez(paths["out"], ids=np.asarray([p.id for p in problems]), features=features)
    return time.perf_counter() - start, setup, outliers


def check_same(store_dir: Path, torch_file: Path, name: str) -> None:
    """Asserts the torch features equal the store's: same ids, equal metadata, pooled codes within float32
    noise except for a rare few (a latent entering or leaving the top k on a near-tie flips one value)."""
    store = load_store(store_dir)
    with np.load(torch_file) as theirs:
        assert theirs["ids"].tolist() == store.ids, f"{name}: sample order differs"
        expected = theirs["features"]
    assert expected.shape == store.features.shape, f"{name}: {expected.shape} != {store.features.shape}"
    pooled = slice(0, -len(our_pooling.METADATA_COLUMNS))
    diff_NC = np.abs(store.features - expected)
    scale = float(np.max(np.abs(expected[:, pooled])))
    tolerance = 1e-4 * max(scale, 1.0)
    over = int(np.sum(diff_NC > tolerance))
    print(
        f"check {name}: max |ours - torch| = {diff_NC.max():.2e}, {over} of {diff_NC.size:,} values over "
        f"{tolerance:.0e} (pooled codes up to {scale:.2f}, {np.mean(expected[:, pooled] != 0):.0%} nonzero)"
    )
    assert not diff_NC[:, pooled.stop :].any(), f"{name}: metadata columns differ"
    assert over <= 1e-4 * diff_NC.size, f"{name}: features differ, so the timings compare different work"


def prepare(args: argparse.Namespace, root: Path) -> tuple[ExtractJob, dict[str, Path], Path]:
    """Writes model, SAE and problems under ``root``; returns our job (no latent list yet), the torch
    pipeline's paths and the warm-up problems (up to one batch per length bucket)."""
    lines = list(itertools.islice(args.problems.open(), args.samples))
    args.samples = len(lines)
    tokenizer = load_tokenizer(args.tokenizer)
    model_dir, sae_dir = write_checkpoints(args, len(tokenizer), tokenizer.encode("\n")[0], root)
    data = write_rows(lines, list(range(len(lines))), root / "problems.jsonl")
    examples = [
        format_example(tokenizer, p.question, p.r1_solution_1, max_solution_tokens=MAX_SOLUTION_TOKENS)
        for p in load_problems(data).problems
    ]
    lengths = [len(e.input_ids) for e in examples]
    warm_rows = warmup_rows(examples, args.batch_size)
    warm_data = write_rows(lines, warm_rows, root / "warmup.jsonl")
    print(
        f"{len(lines)} problems, {sum(lengths):,} tokens (mean {np.mean(lengths):.0f}, max {max(lengths)}); "
        f"warm-up on {len(warm_rows)}"
    )
    job = ExtractJob(
        model=model_dir,
        data=data,
        out=root / "ours",
        sae=sae_dir,
        tokenizer=args.tokenizer,
        n_latents=args.n_latents,
        batch_size=args.batch_size,
        max_solution_tokens=MAX_SOLUTION_TOKENS,
        outlier_factor=OUTLIER_FACTOR,
    )
    paths = dict(data=data, tokenizer=args.tokenizer, model=model_dir, sae=sae_dir, latents=root / "latents.json")
    return job, paths, warm_data


def warm_up(args: argparse.Namespace, job: ExtractJob, paths: dict[str, Path], warm_data: Path) -> ExtractJob:
    """Untimed runs of every pipeline on the warm-up problems; ours compiles there and counts latent
    frequencies, whose top ``--n-latents`` become the fixed list of both sides. Returns the timed job."""
    warm_out = job.out.with_name("warm-ours")
    seconds = run_ours(dataclasses.replace(job, data=warm_data, out=warm_out))
    selection = json.loads((warm_out / "selection.json").read_text())
    paths["latents"].write_text(json.dumps(selection["latent_ids"]))
    print(f"our warm-up (JIT compiles, latent counts over {selection['tokens']:,} tokens): {seconds:.1f} s")
    for truncated in (False, True):
        run_torch({**paths, "data": warm_data, "out": job.out.with_name("warm-torch.npz")}, args, truncated)
    return dataclasses.replace(job, latent_ids=paths["latents"])


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (seconds, setup seconds) of the run with the median time."""
    return sorted(runs)[(len(runs) - 1) // 2]


def report(samples: int, times: dict[str, tuple[float, float]]) -> None:
    """The table: end-to-end and setup-excluded samples/s per pipeline, and ours over each."""
    ours = next(iter(times.values()))[0]
    print(f"\n{'pipeline':<30}{'seconds':>9}{'setup s':>9}{'samples/s':>11}{'excl. setup':>13}{'ours/this':>11}")
    for name, (total, setup) in times.items():
        row = f"{name:<30}{total:>9.2f}{setup:>9.2f}{samples / total:>11.1f}{samples / (total - setup):>13.1f}"
        print(f"{row}{total / ours:>10.2f}x")
    for name, (total, _) in list(times.items())[1:]:
        print(f"goal ours >= 2x {name}: {'met' if total / ours >= 2 else 'NOT met'} ({total / ours:.2f}x)")


def main() -> None:
    """Builds the shared inputs, warms every pipeline up, times them in turn, checks them and reports."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(f"layer {args.layer}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, jax {jax.devices()}")
    names = ("saerl-jax run_extract", "torch output_hidden_states", f"torch truncated to {args.layer} layers")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as directory:
        root = Path(directory)
        job, paths, warm_data = prepare(args, root)
        job = warm_up(args, job, paths, warm_data)
        compiled = our_pooling.pooled_codes._cache_size()
        for repeat in range(args.repeats):
            our_job = dataclasses.replace(job, out=root / f"ours-{repeat}")
            runs[names[0]].append((run_ours(our_job), ours_setup_seconds(our_job)))
            for name, truncated in zip(names[1:], (False, True), strict=True):
                out = root / f"torch-{truncated}-{repeat}.npz"
                seconds, setup, outliers = run_torch({**paths, "out": out}, args, truncated)
                runs[name].append((seconds, setup))
                check_same(our_job.out, out, f"{name} ({outliers} outlier tokens masked)")
        compiles = our_pooling.pooled_codes._cache_size() - compiled
    print(f"JIT compiles during the timed runs: {compiles}")
    report(args.samples, {name: median_run(r) for name, r in runs.items()})


if __name__ == "__main__":
    main()
