"""The GRPO update (forward, backward, AdamW) against its FLOP count and against PyTorch, on CPU in float32.

Setting: that of ``bench_grpo.py`` at its defaults: the tiny-math policy (``assets/tiny-math/model``),
B = 8 prompts x G = 4 completions, prompts left-padded to P = 64 (bench_grpo's width: its longest prompt
rounded up to 8), N = 48 completion slots, loss ``grpo``, beta 0.04, epsilon 0.2, float32. The batch is
what ``Trainer._batch`` builds: random token ids, each prompt (seeded length P/2..P) repeated G times,
completions of seeded lengths 1..N ending in EOS with pad after (about one row in eight runs to N without
an EOS), loss mask = completion mask, random 0/1 rewards, ``ref_logp_BN`` from ``logprobs_fn`` on a copy
of the params.

Timed, each the median of ``--repeats`` calls after ``--warmup`` (every call blocked on), all functions
called in turn so that background load falls on each alike:

- ``step``: :func:`rl.step.jit_train_step` on :func:`rl.step.init_state`, the trainer's update;
- ``grad``: ``jax.value_and_grad`` of the step's own micro-batch loss (``rl.step._micro_loss``);
- ``forward``: :func:`rl.rollout.logprobs_fn` as the trainer calls it for the reference log-probs;
- ``optimizer``: the step's optimizer (global-norm clipping, AdamW) alone, on fixed gradients.

Backward = grad - forward. Each is set against its FLOP-ideal time: the analytic count (2 x matmul params
x tokens, the LM head on the N completion positions only, dense attention score and value matmuls;
backward = 2 x forward) at this CPU's matmul rate: that of jitted float32 ``jnp.dot`` at the model's
largest matmul shapes, the weight gradient's transposed form included, timed in the same rounds as the
update (numpy and torch at the same shapes are printed for reference). XLA's own FLOP count
(``cost_analysis`` of each compiled function) is printed beside the analytic one.
PyTorch does the same work in the same run: transformers' ``Qwen2ForCausalLM`` from the same directory
(float32, SDPA), the head on the last N + 1 positions as TRL does, the same loss, ``clip_grad_norm_`` and
``torch.optim.AdamW``; its log-probs are checked against ours first. ``--hlo-profile`` traces a few calls of
the forward and of the step with ``jax.profiler`` and sums their kernels' time by kind, read from the
compiled HLO (matmuls run as YNNPACK fusions or XLA dots, elementwise loop fusions, ...), and the step's
by pass (its HLO metadata: forward, backward, other). Run it with::

    .venv/bin/python benchmarks/bench_update.py           # about a minute on 2 idle cores
    .venv/bin/python benchmarks/bench_update.py --quick   # fewer repeats
"""

from __future__ import annotations

import os

# As in bench_grpo.py: spinning OpenMP workers stall torch when other jobs share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from bench_accelerator import matmul_params  # a sibling script: the same weight count as its MFU
from flax import nnx

from rl import losses
from rl.config import GRPOConfig
from rl.rollout import logprobs_fn
from rl.step import _micro_loss, init_state, jit_train_step, make_optimizer
from saerl_jax.data.prompt import load_tokenizer, stop_ids
from saerl_jax.model import Qwen2Config, load_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"
QUICK_ARGS = dict(repeats=3, warmup=1)
GOAL = 1.5
PARTS = {
    "forward": "forward (log-probs)",
    "backward": "backward (grad - forward)",
    "grad": "forward + backward",
    "optimizer": "clip + AdamW",
    "step": "train step",
}


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in :data:`QUICK_ARGS` for the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ASSETS / "model", help="Hugging Face Qwen2 directory")
    parser.add_argument("--tokenizer", type=Path, default=ASSETS / "tokenizer", help="tokenizer (for the EOS id)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--prompt-length", type=int, default=64, help="padded prompt width P (bench_grpo's)")
    parser.add_argument("--max-completion-length", type=int, default=48, help="completion slots N")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1, the first compiles)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--hlo-profile", action="store_true", help="profile the kernels by kind and pass")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK_ARGS)
        args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    return args


def time_round_robin(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (each must return only once done)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_batch(args: argparse.Namespace, vocab: int, eos: int, pad: int) -> dict[str, np.ndarray]:
    """The host arrays ``Trainer._batch`` gathers from a rollout: prompts repeated G times, seeded lengths."""
    rng = np.random.default_rng(args.seed)
    p, n, g = args.prompt_length, args.max_completion_length, args.num_generations
    rows = args.batch_size * g
    prompt_len_B = np.repeat(rng.integers(p // 2, p + 1, size=args.batch_size), g)
    prompt_mask_BP = (np.arange(p)[None] >= (p - prompt_len_B)[:, None]).astype(np.int32)
    prompt_ids_BP = np.repeat(rng.integers(0, vocab, size=(args.batch_size, p)), g, axis=0) * prompt_mask_BP
    length_B, truncated_B = rng.integers(1, n + 1, size=rows), rng.random(rows) < 1 / 8
    length_B[truncated_B] = n
    completion_mask_BN = (np.arange(n)[None] < length_B[:, None]).astype(np.int32)
    completion_ids_BN = np.where(completion_mask_BN, rng.integers(0, vocab, size=(rows, n)), pad)
    completion_ids_BN[~truncated_B, length_B[~truncated_B] - 1] = eos
    return {
        "prompt_ids_BP": prompt_ids_BP.astype(np.int32),
        "prompt_mask_BP": prompt_mask_BP,
        "completion_ids_BN": completion_ids_BN.astype(np.int32),
        "loss_mask_BN": completion_mask_BN,
        "rewards_B": rng.integers(0, 2, size=rows).astype(np.float32),
    }


def analytic_flops(c: Qwen2Config, rows: int, p: int, n: int) -> dict[str, float]:
    """Matmul FLOPs: the decoder on all P + N positions, the LM head on the N completion positions only;
    the backward is twice the forward; the optimizer's few FLOPs per parameter are not counted."""
    t, hd = p + n, c.hidden_size // c.num_attention_heads
    decoder = matmul_params(c) - c.vocab_size * c.hidden_size  # projection weights per token, every layer
    linear = 2 * decoder * rows * t
    attention = 2 * 2 * rows * c.num_attention_heads * t * t * hd * c.num_hidden_layers
    forward = linear + attention + 2 * c.hidden_size * c.vocab_size * rows * n
    return {"forward": forward, "backward": 2 * forward, "grad": 3 * forward, "step": 3 * forward}


def matmul_cases(c: Qwen2Config, tokens: int, head_tokens: int) -> tuple[dict[str, Callable], dict[str, float]]:
    """Float32 ``a @ b`` (five per call) in jax (jitted), numpy and torch at the MLP's ``[tokens, D] x [D, I]``,
    its weight gradient ``[tokens, D]^T x [tokens, I]`` and the LM head's ``[head_tokens, D] x [D, V]``, as
    closures named ``"{library} {shape}"``, and their FLOPs per call."""
    d, rng = c.hidden_size, np.random.default_rng(0)
    cases = {  # name: (a, b, whether a enters transposed)
        f"[{tokens},{d}]x[{d},{c.intermediate_size}]": ((tokens, d), (d, c.intermediate_size), False),
        f"[{tokens},{d}]^Tx[{tokens},{c.intermediate_size}]": ((tokens, d), (tokens, c.intermediate_size), True),
        f"[{head_tokens},{d}]x[{d},{c.vocab_size}]": ((head_tokens, d), (d, c.vocab_size), False),
    }
    fns, flops = {}, {}
    for name, (a_shape, b_shape, transposed) in cases.items():
        a, b = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
        dot = jax.jit(lambda x, y, t=transposed: (x.T if t else x) @ y)
        aj, bj, at, bt = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        libs = {
            "jax": lambda aj=aj, bj=bj, dot=dot: dot(aj, bj).block_until_ready(),
            "numpy": lambda a=a, b=b, t=transposed: (a.T if t else a) @ b,
            "torch": lambda at=at, bt=bt, t=transposed: (at.T if t else at) @ bt,
        }
        for lib, fn in libs.items():
            fns[f"{lib} {name}"] = lambda fn=fn: [fn() for _ in range(5)]
            flops[f"{lib} {name}"] = 5 * 2 * a.size * b.shape[1]
    return fns, flops


def compiled_flops(jitted, *args, **kwargs) -> tuple[float, str]:
    """XLA's FLOP count of the compiled function, and its HLO text."""
    compiled = jitted.lower(*args, **kwargs).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))), compiled.as_text()


def profile_kernels(run: Callable[[], object], hlo: str, calls: int = 3) -> dict[str, dict[str, list[float]]]:
    """``{kind: {pass: [kernels, ms]}}`` per call of ``run``, from a ``jax.profiler`` trace of ``calls`` calls.

    A kernel's time runs from its start to its ``end:`` event (an XLA dot returns at once and ends later).
    Its pass comes from its HLO metadata (``transpose(jvp``: backward, ``jvp(``: forward, else other), its
    kind from its HLO (YNNPACK fusion, elementwise loop fusion, XLA op). Kernels overlap on the threads.
    """
    kernels = {}
    for name, body in re.findall(r"^\s+%?([\w.-]+) = (.*)$", hlo.split("\nENTRY ", 1)[1], re.M):
        op = (re.findall(r'op_name="([^"]*)"', body) or [""])[0]
        where = "backward" if "transpose(jvp" in op else "forward" if "jvp(" in op else "other"
        if "__ynn_fusion" in body:
            kind = "YNNPACK " + ("matmul" if op.endswith("dot_general") else "other")
        elif fusion := re.search(r"kind=k(\w+)", body):
            kind = f"{fusion.group(1).lower()} fusion"
        else:
            kind = "XLA " + re.search(r"\s([a-z][\w-]*)\(", body).group(1)
        kernels[name] = where, kind
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                run()
        events = json.loads(gzip.decompress(next(Path(tmp).rglob("*.trace.json.gz")).read_bytes()))["traceEvents"]
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for event in events:
        name = event.get("name", "").removeprefix("end: ")
        if event.get("ph") == "X" and name in kernels:
            (ends if event["name"].startswith("end: ") else starts)[name].append(event["ts"])
    totals = collections.defaultdict(dict)
    for name, times in starts.items():
        where, kind = kernels[name]
        cell = totals[kind].setdefault(where, [0.0, 0.0])
        cell[0] += len(times) / calls
        cell[1] += sum(end - start for start, end in zip(sorted(times), sorted(ends[name]), strict=True)) / 1e3 / calls
    return dict(totals)


def print_profile(forward: dict, step: dict) -> None:
    """The kernel time of the forward function and of the step's passes, one row per kernel kind."""
    columns = [(forward, "other", "forward fn")] + [(step, w, f"step: {w}") for w in ("forward", "backward", "other")]
    print("\n| kernel kind | " + " | ".join(f"{title} ms (kernels)" for *_, title in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    kinds = sorted(set(forward) | set(step), key=lambda k: -sum(c[1] for c in step.get(k, {}).values()))
    for kind in [*kinds, "total"]:
        cells = []
        for table, where, _ in columns:
            rows = table.values() if kind == "total" else [table.get(kind, {})]
            count, ms = (sum(row.get(where, [0, 0])[i] for row in rows) for i in (0, 1))
            cells.append(f"{ms:.1f} ({count:.0f})" if count else "")
        print(f"| {kind} | " + " | ".join(cells) + " |")


def our_update(
    args: argparse.Namespace, cfg: GRPOConfig, host: dict[str, np.ndarray]
) -> tuple[dict[str, Callable[[], object]], dict[str, float], dict[str, str]]:
    """The trainer's update and its parts as timed closures, their XLA FLOPs and HLO (forward, step); adds the
    reference log-probs and advantages to ``host`` (for the torch side)."""
    graphdef, params = nnx.split(load_pretrained(args.model, jnp.float32))
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    fwd_args = [batch[k] for k in ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BN", "loss_mask_BN")]
    fwd_kw = dict(temperature=cfg.temperature, chunk=cfg.logprob_chunk, compute_dtype=cfg.compute_dtype)
    batch["ref_logp_BN"] = logprobs_fn(graphdef, jax.tree.map(jnp.copy, params), *fwd_args, **fwd_kw)
    optimizer = make_optimizer(cfg)
    step_fn = jit_train_step(graphdef, cfg, optimizer)
    state = init_state(jax.tree.map(jnp.copy, params), optimizer)  # its buffers are donated to every step
    advantages_B = losses.group_advantages(batch["rewards_B"], cfg.num_generations, cfg.scale_rewards)
    num_items = jnp.maximum(jnp.sum(batch["loss_mask_BN"]), 1.0)
    grad_fn = jax.jit(
        lambda p, b: jax.value_and_grad(_micro_loss, has_aux=True)(p, graphdef, cfg, b, advantages_B, num_items)
    )
    grads, opt_state = grad_fn(params, batch)[1], optimizer.init(params)
    opt_fn = jax.jit(lambda g, s, p: optax.apply_updates(p, optimizer.update(g, s, p)[0]))
    host |= {"ref_logp_BN": np.array(batch["ref_logp_BN"]), "advantages_B": np.array(advantages_B)}
    xla, hlo = {}, {}
    xla["forward"], hlo["forward"] = compiled_flops(logprobs_fn, graphdef, params, *fwd_args, **fwd_kw)
    xla["grad"] = compiled_flops(grad_fn, params, batch)[0]
    xla["optimizer"] = compiled_flops(opt_fn, grads, opt_state, params)[0]
    xla["step"], hlo["step"] = compiled_flops(step_fn, state, batch)
    xla["backward"] = xla["grad"] - xla["forward"]

    def run_step() -> None:
        nonlocal state
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))

    fns = {
        "forward": lambda: logprobs_fn(graphdef, params, *fwd_args, **fwd_kw).block_until_ready(),
        "grad": lambda: jax.block_until_ready(grad_fn(params, batch)),
        "optimizer": lambda: jax.block_until_ready(opt_fn(grads, opt_state, params)),
        "step": run_step,
    }
    return fns, xla, hlo


def torch_update(
    args: argparse.Namespace, cfg: GRPOConfig, host: dict[str, np.ndarray]
) -> dict[str, Callable[[], object]]:
    """transformers doing the same forward, forward + backward, optimizer and step, as timed closures."""
    torch.set_num_threads(args.threads)
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(args.model.resolve()), dtype=torch.float32)
    t = {k: torch.from_numpy(v) for k, v in host.items()}
    ids_BT = torch.cat([t["prompt_ids_BP"], t["completion_ids_BN"]], 1).long()
    mask_BT = torch.cat([t["prompt_mask_BP"], t["loss_mask_BN"]], 1).long()
    positions_BT, mask_BN = (mask_BT.cumsum(-1) - 1).clamp(min=0), t["loss_mask_BN"].float()
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = torch.optim.AdamW(model.parameters(), cfg.learning_rate, betas, weight_decay=cfg.weight_decay)

    def logp() -> torch.Tensor:
        n = mask_BN.shape[1]
        out = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_BT, logits_to_keep=n + 1)
        logp_BNV = torch.log_softmax(out.logits[:, :-1] / cfg.temperature, dim=-1)
        return logp_BNV.gather(-1, t["completion_ids_BN"].long()[..., None]).squeeze(-1)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return logp()

    def grad() -> None:  # grpo: the surrogate at ratio 1 plus beta * k3 KL, per-sequence mean
        model.zero_grad(set_to_none=True)
        logp_BN = logp()
        diff_BN = t["ref_logp_BN"] - logp_BN
        surrogate_BN = torch.exp(logp_BN - logp_BN.detach()) * t["advantages_B"][:, None]
        per_BN = cfg.beta * (diff_BN.exp() - diff_BN - 1) - surrogate_BN
        ((per_BN * mask_BN).sum(1) / mask_BN.sum(1).clamp(min=1)).mean().backward()

    def optimize() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()

    return {"forward": forward, "grad": grad, "optimizer": optimize, "step": lambda: (grad(), optimize())}


def report(ms: dict[str, dict[str, float]], xla: dict, analytic: dict, rate: float) -> dict[str, dict[str, float]]:
    """Prints the markdown table of the parts; returns its rows."""
    print("| part | ours ms | XLA GFLOP | analytic GFLOP | ideal ms | ours / ideal | torch ms | ours / torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    table = {}
    for part, name in PARTS.items():
        flops = analytic.get(part, 0.0) / 1e9
        ideal = 1e3 * flops / rate if flops else float("nan")
        row = {"ours_ms": ms["ours"][part], "xla_gflop": xla[part] / 1e9, "analytic_gflop": flops}
        row |= {"ideal_ms": ideal, "ours_over_ideal": ms["ours"][part] / ideal, "torch_ms": ms["torch"][part]}
        table[part] = row | {"ours_over_torch": ms["ours"][part] / ms["torch"][part]}
        print(f"| {name} | " + " | ".join(f"{v:.3g}" for v in table[part].values()) + " |")
    return table


def main() -> None:
    """Builds both updates on one batch, checks their log-probs agree, times them and prints the table."""
    args = parse_args()
    cfg = GRPOConfig(
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_prompt_length=args.prompt_length,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        loss_type="grpo",
        scale_rewards="group",
        beta=0.04,
        epsilon=0.2,
        learning_rate=1e-5,
        compute_dtype="float32",
    ).with_resolved_precision()
    print(f"jax {jax.__version__} on {jax.devices()[0]}; cores {os.cpu_count()}; torch threads {args.threads}")
    print(f"load average before: {os.getloadavg()}")
    c = Qwen2Config.from_pretrained(args.model)
    eos_ids, pad = stop_ids(load_tokenizer(args.tokenizer))
    host = make_batch(args, c.vocab_size, eos_ids[0], pad)
    ours, xla, hlo = our_update(args, cfg, host)
    theirs = torch_update(args, cfg, host)
    mask = host["loss_mask_BN"].astype(bool)
    gap = np.max(np.abs(host["ref_logp_BN"][mask] - theirs["forward"]().numpy()[mask]))
    print(f"log-prob check: max |ours - transformers| = {gap:.2e} over {mask.sum()} completion tokens")
    assert gap < 1e-3, f"log-probs differ by {gap}: the timings would compare different work"

    rows, p, n = cfg.rows, args.prompt_length, args.max_completion_length
    matmuls, flops = matmul_cases(c, rows * (p + n), rows * n)
    fns = {f"{side} {k}": f for side, d in (("ours", ours), ("torch", theirs)) for k, f in d.items()}
    seconds = time_round_robin(fns | matmuls, args.warmup, args.repeats)
    print(f"load average after: {os.getloadavg()}")
    rates = {key: flops[key] / seconds[key] / 1e9 for key in matmuls}
    for lib in ("jax", "numpy", "torch"):
        keys = [key for key in matmuls if key.startswith(f"{lib} ")]
        rates[lib] = sum(flops[key] for key in keys) / sum(seconds[key] for key in keys) / 1e9
    print("matmul GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    ms = {side: {k: 1e3 * seconds[f"{side} {k}"] for k in ours} for side in ("ours", "torch")}
    for side in ms.values():
        side["backward"] = side["grad"] - side["forward"]

    print(f"\nB={rows} P={p} N={n}; ideal = analytic FLOPs at {rates['jax']:.1f} GFLOP/s (jitted jnp.dot)")
    table = report(ms, xla, analytic_flops(c, rows, p, n), rates["jax"])
    print(f"goal: forward + backward within {GOAL}x of FLOP-ideal; measured {table['grad']['ours_over_ideal']:.2f}x")
    figures = {"config": cfg.to_dict(), "matmul_gflops": rates, "table": table, "load_after": os.getloadavg()}
    if args.hlo_profile:
        figures["kernels"] = {part: profile_kernels(ours[part], hlo[part]) for part in hlo}
        print_profile(figures["kernels"]["forward"], figures["kernels"]["step"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
