"""Throughput of saerl-jax's Qwen2 against the transformers reference (CPU and float32 unless told otherwise).

A random Qwen2-shaped model (vocab 32,000, hidden 512, MLP 2,048, 8 layers, 8 query / 2 key-value
heads, untied embeddings as in Qwen2.5-1.5B and larger: about 63M parameters) is built with
transformers, saved with ``save_pretrained`` and loaded with :func:`saerl_jax.model.load_pretrained`,
so both sides hold identical weights. On the same left-padded random batches it times:

1. Residual-stream capture at layer L (tokens/s over all ``B * T`` positions):
   ``forward_fn(graphdef, state, ids, mask, capture_layer=L)`` with ``nnx.split`` done once (the
   hot-loop usage), and the convenience ``forward(model, ids, mask, capture_layer=L)``, against
   ``model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[L]``.
2. Sampling (generated tokens/s), greedy and at temperature 1: ``generate`` against
   ``model.generate``, both forced to emit exactly N tokens per row (our EOS id is ``vocab_size``,
   which is never sampled; transformers gets no EOS at all, and no top-k).

The first call of each JAX function compiles; it is reported apart and excluded from throughput,
which is the median of ``--repeats`` timed calls after ``--warmup`` calls. JAX runs on its default
device; transformers on ``--device``. Both sides hold the weights in ``--dtype`` (bfloat16 is for
accelerators: it is very slow on CPU). Run it with::

    .venv/bin/python benchmarks/bench_model.py            # defaults: a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_model.py --quick    # smaller model and batches, seconds
    python benchmarks/bench_model.py --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from saerl_jax.model import Qwen2, forward, forward_fn, generate, load_pretrained

ARCH = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
QUICK_ARCH = dict(ARCH, vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4)
QUICK_ARGS = dict(batch_size=2, seq_len=32, new_tokens=8, prompt_len=16, repeats=2, warmup=1)
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
"""``--dtype`` -> (JAX dtype, torch dtype) of the weights and activations on both sides."""
CAPTURE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}
"""Largest accepted ``max |ours - transformers|`` of the captured states: absolute in float32, a fraction of
``max |x|`` in bfloat16 (8-bit mantissa, rounded differently on the two sides)."""


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in :data:`QUICK_ARGS` for the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="rows B of every batch")
    parser.add_argument("--seq-len", type=int, default=256, help="forward length T")
    parser.add_argument("--layer", type=int, default=None, help="capture layer L; default num_layers - 2")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens N generated per row")
    parser.add_argument("--prompt-len", type=int, default=64, help="padded prompt length for generation")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1, the first compiles)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device of transformers")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights on both sides")
    parser.add_argument("--quick", action="store_true", help="small model and sizes for a smoke run")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK_ARGS)
        args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    return args


def left_padded_batch(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and mask ``[B, length]``: row 0 is full, the others hold 1/2 to all of ``length``."""
    rng = np.random.default_rng(seed)
    ids_BT = rng.integers(1, vocab, size=(batch, length))
    lengths_B = rng.integers(length // 2, length + 1, size=batch)
    lengths_B[0] = length
    mask_BT = (np.arange(length)[None, :] >= (length - lengths_B)[:, None]).astype(np.int64)
    return ids_BT * mask_BT, mask_BT


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """Seconds of the first call (compile included) and median seconds of the timed calls.

    ``fn`` must return only once its work is done (block on JAX outputs, synchronize CUDA inside it).
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def report(name: str, ours_s: float, theirs_s: float, first_s: float, work: int, goal: float) -> None:
    """Prints both throughputs (``work`` tokens per median call) and their ratio against the goal."""
    x, y = work / ours_s, work / theirs_s
    print(
        f"{name}: saerl-jax {x:,.0f} tok/s, transformers {y:,.0f} tok/s, "
        f"ratio X/Y = {x / y:.2f}x (goal >= {goal}x); first JAX call {first_s:.2f} s"
    )


def bench_forward(args: argparse.Namespace, model: Qwen2, hf_model: transformers.Qwen2ForCausalLM, layer: int) -> None:
    """Checks that both sides capture the same residual stream, then times the capture."""
    ids_BT, mask_BT = left_padded_batch(args.batch_size, args.seq_len, model.config.vocab_size, seed=0)
    graphdef, state = nnx.split(model)
    ids_j, mask_j = jnp.asarray(ids_BT, jnp.int32), jnp.asarray(mask_BT, jnp.int32)
    ids_t, mask_t = torch.from_numpy(ids_BT).to(args.device), torch.from_numpy(mask_BT).to(args.device)

    def ours() -> jax.Array:
        return forward_fn(graphdef, state, ids_j, mask_j, capture_layer=layer).block_until_ready()

    def ours_convenience() -> jax.Array:
        return forward(model, ids_BT, mask_BT, capture_layer=layer).block_until_ready()

    def theirs() -> torch.Tensor:
        with torch.inference_mode():
            hidden = hf_model(ids_t, attention_mask=mask_t, output_hidden_states=True).hidden_states[layer]
        if args.device == "cuda":
            torch.cuda.synchronize()
        return hidden

    real = mask_BT.astype(bool)
    expected = theirs().float().cpu().numpy()[real]
    start = time.perf_counter()
    captured = np.asarray(ours(), np.float32)[real]
    compile_s = time.perf_counter() - start
    diff = float(np.max(np.abs(captured - expected)))
    scale = float(np.max(np.abs(expected)))
    print(f"capture check: max |ours - transformers| = {diff:.2e} over real tokens (max |x| = {scale:.2f})")
    tolerance = CAPTURE_TOLERANCE[args.dtype] * (1.0 if args.dtype == "float32" else scale)
    assert diff < tolerance, f"captured hidden states differ by {diff}: the timings would compare different work"

    tokens = args.batch_size * args.seq_len
    their_s = time_calls(theirs, args.warmup, args.repeats)[1]
    our_s = time_calls(ours, args.warmup, args.repeats)[1]
    report(f"forward capture_layer={layer}", our_s, their_s, compile_s, tokens, 1.5)
    first_s, convenience_s = time_calls(ours_convenience, args.warmup, args.repeats)
    report(f"forward capture_layer={layer} via forward()", convenience_s, their_s, first_s, tokens, 1.5)


def bench_generate(
    args: argparse.Namespace, model: Qwen2, hf_model: transformers.Qwen2ForCausalLM, temperature: float
) -> None:
    """Times ``generate`` against ``model.generate`` at one temperature (0 is greedy)."""
    ids_BT, mask_BT = left_padded_batch(args.batch_size, args.prompt_len, model.config.vocab_size, seed=1)
    n, vocab = args.new_tokens, model.config.vocab_size
    ids_t, mask_t = torch.from_numpy(ids_BT).to(args.device), torch.from_numpy(mask_BT).to(args.device)
    hf_sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature else {}
    last: dict[str, np.ndarray] = {}

    def ours() -> None:
        out = generate(
            model, ids_BT, mask_BT, max_new_tokens=n, temperature=temperature, eos_token_id=vocab, rng=jax.random.key(0)
        )
        last["ours"], last["ours_mask"] = np.asarray(out.tokens_BN), np.asarray(out.mask_BN)

    def theirs() -> None:
        with torch.inference_mode():
            out = hf_model.generate(
                ids_t, attention_mask=mask_t, max_new_tokens=n, eos_token_id=None, pad_token_id=0, **hf_sampling
            )
        last["theirs"] = out[:, ids_BT.shape[1] :].cpu().numpy()

    their_s = time_calls(theirs, args.warmup, args.repeats)[1]
    first_s, our_s = time_calls(ours, args.warmup, args.repeats)
    counts = (int(last["ours_mask"].sum()), last["theirs"].size)
    assert counts == (args.batch_size * n,) * 2, f"generated token counts (ours, theirs) = {counts}, not B * N"
    mode = "greedy" if temperature == 0 else f"sampling T={temperature}"
    report(
        f"generate {mode} (B={args.batch_size}, prompt {args.prompt_len}, N={n})", our_s, their_s, first_s, counts[0], 3
    )
    if temperature == 0:
        print(f"greedy tokens equal to transformers': {np.mean(last['ours'] == last['theirs']):.1%}")


def main() -> None:
    """Builds the shared random checkpoint, prints the setup and runs every comparison."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(**(QUICK_ARCH if args.quick else ARCH))
    hf_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    jax_dtype, torch_dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = load_pretrained(directory, dtype=jax_dtype)
    hf_model.to(device=args.device, dtype=torch_dtype)
    layer = model.config.num_hidden_layers - 2 if args.layer is None else args.layer
    print(f"config: {model.config}")
    print(f"parameters: {sum(p.numel() for p in hf_model.parameters()):,} ({args.dtype})")
    print(
        f"torch {torch.__version__} on {args.device}, threads: {torch.get_num_threads()}, "
        f"attention: {hf_model.config._attn_implementation}"
    )
    print(f"jax device: {jax.devices()[0]} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"batch {args.batch_size}, repeats {args.repeats} (median), warmup {args.warmup}")
    bench_forward(args, model, hf_model, layer)
    bench_generate(args, model, hf_model, temperature=0.0)
    bench_generate(args, model, hf_model, temperature=1.0)


if __name__ == "__main__":
    main()
