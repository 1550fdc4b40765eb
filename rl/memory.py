"""A memory plan compiled ahead of time: the real jitted train step, rollout and log-prob passes lowered
from abstract shapes (``nnx.eval_shape``, ``jax.ShapeDtypeStruct`` with the shardings of
:mod:`rl.sharding`), compiled, and read with ``compiled.memory_analysis()``. No weights are needed; a
mesh of N devices is simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (see
:func:`host_device_env`), which must be set before JAX starts.

The bytes are per device and come from XLA's buffer assignment for the backend that compiled them (the
host CPU when planning on a laptop): an accelerator's compiler fuses and schedules differently, so read
them as estimates, checked against the measured peak of the same step on CPU in the tests.

A phase's device total is its program's peak (arguments + outputs - aliased + temporaries) plus what stays
resident without being one of its arguments: the optimizer state during a rollout, the frozen reference
during the update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl.config import DAPOConfig, GRPOConfig, config_from_dict
from rl.rollout import logprobs_fn, rollout_sampling
from rl.sharding import batch_sharding, make_mesh, tree_shardings
from rl.step import init_state, jit_train_step, make_optimizer
from saerl_jax.model import Qwen2, Qwen2Config, generate_fn
from saerl_jax.model.engine import (
    BATCH_AXES,
    EngineConfig,
    admit_fn,
    batch_ways,
    decode_fn,
    init_slots,
    slot_shardings,
)

GB = 10**9


class Usage(NamedTuple):
    """Per-device bytes of one compiled program, as ``compiled.memory_analysis()`` reports them."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    """Outputs that reuse a donated argument's buffer (counted once)."""
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Live at once while the program runs: arguments, outputs not aliased, temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> Usage:
        stats = compiled.memory_analysis()
        return cls(
            stats.argument_size_in_bytes,
            stats.output_size_in_bytes,
            stats.alias_size_in_bytes,
            stats.temp_size_in_bytes,
        )

    def extrapolate(self, other: Usage, steps: float) -> Usage:
        """``self + steps * (other - self)`` per field (a linear fit through two layer counts)."""
        return Usage(*(round(a + steps * (b - a)) for a, b in zip(self, other, strict=True)))


class Phase(NamedTuple):
    """One compiled program and the device memory it needs."""

    name: str
    usage: Usage
    resident_bytes: int
    """Held on the device during the phase without being an argument of its program."""

    @property
    def total_bytes(self) -> int:
        return self.usage.peak_bytes + self.resident_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSetting:
    """What one plan compiles: the architecture, the training config and the mesh."""

    model: Qwen2Config
    """Architecture (from a ``config.json``; no weights)."""
    config: GRPOConfig
    """Batch, lengths, accumulation, rollout chunk, remat, KL (a reference when ``beta > 0``)."""
    mesh: tuple[int, int, int] = (-1, 1, 1)
    """(data, fsdp, tensor) over the visible devices; -1 fills the data axis."""
    param_dtype: str = "float32"
    """Dtype of the parameters (and so of the optimizer moments)."""
    compile_layers: int = 0
    """0 compiles every layer; k > 0 compiles two layer counts k apart (:attr:`layer_counts`) and
    extrapolates linearly per layer."""

    def __post_init__(self) -> None:
        if type(self.config) not in (GRPOConfig, DAPOConfig):
            raise ValueError(
                f"the memory plan compiles GRPO / DAPO steps; {type(self.config).__name__} (the PPO value model, "
                "DPO's pair batches) is not planned yet"
            )
        if self.compile_layers < 0 or (self.compile_layers and self.layer_counts[1] > self.model.num_hidden_layers):
            raise ValueError(
                f"compile_layers must be 0 or in [1, {self.model.num_hidden_layers // 2}] "
                f"(the layer counts compiled must fit in {self.model.num_hidden_layers} layers), "
                f"got {self.compile_layers}"
            )

    @property
    def layer_counts(self) -> tuple[int, int]:
        """The two layer counts compiled with ``compile_layers = k``: k and 2k, but never fewer than 2
        layers: with remat the blocks are a scan, and XLA compiles a one-step scan as straight-line code
        whose memory is off the per-layer line (7B, 4 rows: 24.2 GB of temporaries at 1 layer, 22.8 at 2,
        then +2.5 GB per layer)."""
        low = max(self.compile_layers, 2)
        return low, low + self.compile_layers


def host_device_env(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with JAX on the CPU and ``devices`` simulated host devices."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _sharded(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _as_dtype(tree, dtype):
    """Abstract ``tree`` with its floating leaves in ``dtype``, shardings kept."""

    def cast(x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(x.shape, dtype if floating else x.dtype, sharding=x.sharding)

    return jax.tree.map(cast, tree)


def _device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry their sharding."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def _batch(cfg: GRPOConfig, rows: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract update batch of :mod:`rl.step` (``rows`` completions)."""
    p, n = cfg.max_prompt_length, cfg.max_completion_length
    shapes = {
        "prompt_ids_BP": ((rows, p), jnp.int32),
        "prompt_mask_BP": ((rows, p), jnp.int32),
        "completion_ids_BN": ((rows, n), jnp.int32),
        "loss_mask_BN": ((rows, n), jnp.int32),
        "rewards_B": ((rows,), jnp.float32),
    }
    if cfg.beta > 0:
        shapes["ref_logp_BN"] = ((rows, n), jnp.float32)
    if cfg.num_iterations > 1:
        shapes["old_logp_BN"] = ((rows, n), jnp.float32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def planned_config(cfg: GRPOConfig) -> GRPOConfig:
    """``cfg`` with its dtypes as an accelerator resolves them: compute (and so the cache and the frozen
    reference, unless set) bfloat16 when left to the default, whatever host the plan is compiled on."""
    return dataclasses.replace(cfg, compute_dtype=cfg.compute_dtype or "bfloat16").with_resolved_precision()


def _compile(model_cfg: Qwen2Config, cfg: GRPOConfig, mesh, dtype) -> tuple[list[Phase], int, int]:
    """The phases, train-state bytes and reference bytes for one layer count; see :func:`plan`."""
    cfg = planned_config(cfg)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen2(model_cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    optimizer = make_optimizer(cfg)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    state_shardings = tree_shardings(state, mesh)
    state = _sharded(state, state_shardings)
    state_bytes = _device_bytes(state)
    # the rollout samples with the params cast to the compute dtype; the reference is stored in its own
    compute_params = _as_dtype(state.params, cfg.compute_dtype)
    reference = _as_dtype(state.params, cfg.reference_dtype)
    ref_bytes = _device_bytes(reference) if cfg.beta > 0 else 0
    rows_sharding = batch_sharding(mesh)
    step = jit_train_step(graphdef, cfg, optimizer, state_shardings=state_shardings, batch_shardings=rows_sharding)
    phases = [
        Phase("train step", Usage.of(step.lower(state, _batch(cfg, cfg.rows, rows_sharding)).compile()), ref_bytes)
    ]

    # besides its parameters the train state and the reference stay on the device; the params cast to the
    # compute dtype are a copy unless it is their own dtype
    resident = state_bytes + ref_bytes - (_device_bytes(state.params) if jnp.dtype(cfg.compute_dtype) == dtype else 0)
    rollout_phases = _engine_phases if cfg.rollout_engine == "continuous" else _static_phases
    phases += rollout_phases(graphdef, compute_params, cfg, mesh, resident)

    if cfg.beta > 0 or cfg.num_iterations > 1:
        batch = _batch(cfg, cfg.rows, rows_sharding)
        args = [batch[k] for k in ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BN", "loss_mask_BN")]
        lowered = logprobs_fn.lower(
            graphdef,
            reference if cfg.beta > 0 else state.params,
            *args,
            cfg.temperature,
            cfg.logprob_chunk,
            compute_dtype=cfg.compute_dtype,
            micro_batches=cfg.gradient_accumulation_steps,
            attention_chunk=cfg.attention_chunk,
        )
        name = "reference log-probs" if cfg.beta > 0 else "old log-probs"
        resident = state_bytes if cfg.beta > 0 else state_bytes - _device_bytes(state.params) + ref_bytes
        phases.append(Phase(name, Usage.of(lowered.compile()), resident))
    return phases, state_bytes, ref_bytes


def _static_phases(graphdef, params, cfg: GRPOConfig, mesh, resident: int) -> list[Phase]:
    """The static sampler's one program: ``rollout_batch_size`` rows decoded to the budget together."""
    chunk = cfg.rollout_batch_size or cfg.rows
    whole = NamedSharding(mesh, P())
    prompts = jax.ShapeDtypeStruct((chunk, cfg.max_prompt_length), jnp.int32, sharding=whole)
    keys = jax.ShapeDtypeStruct((chunk,), jax.random.key(0).dtype, sharding=whole)
    eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=whole)
    pad = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
    lowered = generate_fn.lower(graphdef, params, prompts, prompts, keys, eos, pad, rollout_sampling(cfg))
    return [Phase(f"rollout ({chunk} rows per call)", Usage.of(lowered.compile()), resident)]


def _engine_phases(graphdef, params, cfg: GRPOConfig, mesh, resident: int) -> list[Phase]:
    """The slot engine's two programs (:mod:`saerl_jax.model.engine`) with S = ``rollout_batch_size``
    slots split over the mesh as the trainer splits them: an admission at its largest (a prefill of S
    distinct prompts into every slot) and the decode loop. Each holds the S-slot cache."""
    ways = batch_ways(mesh)
    s = -(-(cfg.rollout_batch_size or cfg.rows) // ways) * ways  # as generate_continuous rounds them
    sampling = rollout_sampling(cfg)
    whole = NamedSharding(mesh, P())
    keys = jax.ShapeDtypeStruct((s,), jax.random.key(0).dtype, sharding=whole)
    slots = jax.eval_shape(lambda p, k: init_slots(graphdef, p, k, cfg.max_prompt_length, sampling), params, keys)
    slots = _sharded(slots, slot_shardings(slots, mesh))
    rows = NamedSharding(mesh, P(BATCH_AXES))  # the engine's prompts, sources and keys (one row per slot)
    prompts = jax.ShapeDtypeStruct((s, cfg.max_prompt_length), jnp.int32, sharding=rows)
    source = jax.ShapeDtypeStruct((s,), jnp.int32, sharding=rows)
    row_keys = jax.ShapeDtypeStruct((s,), jax.random.key(0).dtype, sharding=rows)
    eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=whole)
    pad = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
    admit = admit_fn.lower(graphdef, params, slots, prompts, prompts, source, row_keys, pad, sampling)
    decode = decode_fn.lower(graphdef, params, slots, eos, pad, sampling, EngineConfig().sync_steps)
    return [
        Phase(f"rollout prefill ({s} slots)", Usage.of(admit.compile()), resident),
        Phase(f"rollout decode ({s} slots)", Usage.of(decode.compile()), resident),
    ]


class Plan(NamedTuple):
    """Per-device bytes of every phase of a training step under one setting."""

    setting: PlanSetting
    phases: list[Phase]
    state_bytes: int
    """Parameters, optimizer state and step counter, per device."""
    reference_bytes: int
    """The frozen reference's parameters (``beta > 0``), per device."""

    @property
    def peak_bytes(self) -> int:
        """The device memory the step needs: its largest phase."""
        return max(phase.total_bytes for phase in self.phases)


PROGRESS = "plan-memory: "
"""Prefix of the progress lines printed to stderr (a compile of a full-size model takes about a minute)."""


def _describe(setting: PlanSetting) -> str:
    cfg = setting.config
    return (
        f"mesh {'x'.join(map(str, setting.mesh))}, accumulation {cfg.gradient_accumulation_steps}, "
        f"{cfg.rollout_engine} rollout of {cfg.rollout_batch_size or cfg.rows} rows at once, remat {cfg.remat}"
    )


def plan(setting: PlanSetting) -> Plan:
    """Compiles the train step, the rollout (the static sampler at its chunk's shape, or the slot engine's
    prefill and decode programs) and the log-prob passes of ``setting``.

    With ``compile_layers = k`` the programs are compiled for two layer counts k apart
    (:attr:`PlanSetting.layer_counts`) and every byte count is extrapolated linearly to the model's layer
    count (compiling 28 unrolled blocks is slow on a laptop).

    Raises:
      ValueError: the mesh does not match the device count, or a tensor does not divide over it.
    """
    print(f"{PROGRESS}compiling {_describe(setting)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = _plan(setting)
    took = time.perf_counter() - started
    print(f"{PROGRESS}  peak {_gb(result.peak_bytes)} GB per device ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


def _plan(setting: PlanSetting) -> Plan:
    mesh = make_mesh(*setting.mesh)
    dtype = jnp.dtype(setting.param_dtype)
    if setting.compile_layers == 0:
        return Plan(setting, *_compile(setting.model, setting.config, mesh, dtype))
    (first, second), layers = setting.layer_counts, setting.model.num_hidden_layers
    low, high = (
        _compile(dataclasses.replace(setting.model, num_hidden_layers=n), setting.config, mesh, dtype)
        for n in (first, second)
    )
    steps = (layers - first) / (second - first)

    def line(a: int, b: int) -> int:
        return round(a + steps * (b - a))

    phases = [
        Phase(a.name, a.usage.extrapolate(b.usage, steps), line(a.resident_bytes, b.resident_bytes))
        for a, b in zip(low[0], high[0], strict=True)
    ]
    return Plan(setting, phases, line(low[1], high[1]), line(low[2], high[2]))


def parse_bytes(text: str) -> int:
    """``80GB`` / ``141 GB`` / ``512MB`` / ``1e9`` -> bytes (decimal units, as accelerators are sold)."""
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    clean = text.strip().upper().replace(" ", "")
    for unit, size in units.items():
        if clean.endswith(unit):
            clean, scale = clean[: -len(unit)], size
            break
    else:
        scale = 1
    try:
        return round(float(clean) * scale)
    except ValueError:
        raise ValueError(f"device memory must look like 80GB or 512MB, got {text!r}") from None


def _gb(n: int) -> str:
    return f"{n / GB:.2f}"


def plan_table(result: Plan, device_bytes: int | None = None) -> str:
    """A markdown table of the plan: one row per phase, GB per device (10^9 bytes)."""
    s = result.setting
    cfg = s.config
    planned = planned_config(cfg)
    head = (
        f"{s.param_dtype} params, {planned.compute_dtype} compute, {planned.reference_dtype} reference, "
        f"{planned.cache_dtype} KV cache, mesh {'x'.join(map(str, s.mesh))}, "
        f"{cfg.batch_size} prompts x {cfg.num_generations}, prompt {cfg.max_prompt_length} + completion "
        f"{cfg.max_completion_length}, accumulation "
        f"{cfg.gradient_accumulation_steps}, {cfg.rollout_engine} rollout of {cfg.rollout_batch_size or cfg.rows} "
        f"rows at once, remat {cfg.remat}, "
        f"attention chunk {cfg.attention_chunk or 'none'}, beta {cfg.beta}"
        + (f" (extrapolated from {s.layer_counts[0]} and {s.layer_counts[1]} layers)" if s.compile_layers else "")
    )
    lines = [
        head,
        "",
        "| phase | arguments | outputs | aliased | temporaries | program peak | resident besides | device total |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in result.phases:
        u = phase.usage
        cells = [u.argument_bytes, u.output_bytes, u.alias_bytes, u.temp_bytes, u.peak_bytes, phase.resident_bytes]
        lines.append(f"| {phase.name} | " + " | ".join(map(_gb, [*cells, phase.total_bytes])) + " |")
    lines.append(
        f"\ntrain state (params + optimizer) {_gb(result.state_bytes)} GB, frozen reference "
        f"{_gb(result.reference_bytes)} GB per device; step peak {_gb(result.peak_bytes)} GB per device"
    )
    if device_bytes is not None:
        verdict = "fits" if result.peak_bytes <= device_bytes else "does NOT fit"
        lines[-1] += f": {verdict} in {_gb(device_bytes)} GB"
    return "\n".join(lines)


def _ladder(setting: PlanSetting, remat: bool) -> list[PlanSetting]:
    """Settings from cheapest to leanest: accumulation steps doubling (each rung's micro-batch still splits
    over the mesh's batch axes). The rollout keeps the setting's chunk when it has one (rows per
    ``generate`` call are a throughput choice of their own: a search that halved them with the micro-batch
    ended at 2 rows per call); without one it halves with the micro-batch."""
    cfg, (data, fsdp, _) = setting.config, setting.mesh
    ways = max(data, 1) * fsdp
    rungs, a = [], 1
    while cfg.rows % a == 0 and (cfg.rows // a) % ways == 0:
        chunk = cfg.rollout_batch_size or max(cfg.rows // a, 1)
        new = dataclasses.replace(cfg, gradient_accumulation_steps=a, rollout_batch_size=chunk, remat=remat)
        rungs.append(dataclasses.replace(setting, config=new))
        a *= 2
    return rungs


def search(
    setting: PlanSetting,
    device_bytes: int,
    meshes: list[tuple[int, int, int]],
    compiled: dict[PlanSetting, Plan] | None = None,
) -> tuple[list[Plan], list[Plan]]:
    """The cheapest fitting setting per mesh: without remat first, then with; on each ladder
    (:func:`_ladder`) a bisection, assuming fewer rows per program never needs more memory.

    ``compiled`` holds the plans already made (and gains the new ones), so that searching several device
    sizes compiles each setting once.

    Returns:
      ``(fitting, not_fitting)``: a plan per mesh that has a fitting rung, and every plan compiled that did
      not fit (the ones just short of fitting among them).
    """
    compiled = {} if compiled is None else compiled
    fitting, missed = [], []
    for mesh in meshes:
        for remat in (False, True):
            rungs = _ladder(dataclasses.replace(setting, mesh=mesh), remat)
            lo, hi, best = 0, len(rungs) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                if rungs[mid] not in compiled:
                    compiled[rungs[mid]] = plan(rungs[mid])
                result = compiled[rungs[mid]]
                if result.peak_bytes <= device_bytes:
                    best, hi = result, mid - 1
                else:
                    missed.append(result)
                    lo = mid + 1
            if best is not None:
                fitting.append(best)
                break
    return fitting, missed


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlanJob:
    """Options of ``saerl plan-memory``."""

    model_config: Path
    """A Hugging Face ``config.json`` (or the directory holding it); no weights are read."""
    config: GRPOConfig
    """The training settings planned for."""
    devices: int = 1
    """Devices simulated on the host CPU (``--xla_force_host_platform_device_count``)."""
    mesh: tuple[int, int, int] = (-1, 1, 1)
    """(data, fsdp, tensor); -1 fills the data axis."""
    param_dtype: str = "float32"
    """Parameter dtype."""
    compile_layers: int = 0
    """0 compiles every layer; k compiles k and 2k layers and extrapolates per layer."""
    device_memory: tuple[str, ...] = ()
    """Memory of one device (``80GB``), or several sizes: also search the cheapest settings that fit each."""
    search_meshes: bool = False
    """With ``device_memory``: search pure data, pure fsdp and fsdp x 2-way tensor layouts too, not only
    ``mesh`` (each layout costs a few compiles)."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        for size in self.device_memory:
            parse_bytes(size)

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps({**fields, "model_config": str(self.model_config), "config": self.config.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> MemoryPlanJob:
        raw = json.loads(text)
        config = config_from_dict(raw.pop("config"))
        return cls(
            **{
                **raw,
                "model_config": Path(raw["model_config"]),
                "mesh": tuple(raw["mesh"]),
                "device_memory": tuple(raw["device_memory"]),
                "config": config,
            }
        )


def _meshes(devices: int, first: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The job's mesh, then pure data, pure fsdp and fsdp x 2-way tensor parallelism."""
    data, fsdp, tensor = first
    candidates = [(devices // (fsdp * tensor) if data == -1 else data, fsdp, tensor), (devices, 1, 1), (1, devices, 1)]
    if devices % 2 == 0 and devices > 2:
        candidates.append((1, devices // 2, 2))
    return list(dict.fromkeys(candidates))


def report(job: MemoryPlanJob) -> str:
    """Plans ``job`` in this process (which must already see ``job.devices`` devices) as markdown text."""
    path = job.model_config / "config.json" if job.model_config.is_dir() else job.model_config
    model = Qwen2Config.from_hf_dict(json.loads(path.read_text()), source=str(path))
    setting = PlanSetting(
        model=model,
        config=job.config,
        mesh=_meshes(job.devices, job.mesh)[0],
        param_dtype=job.param_dtype,
        compile_layers=job.compile_layers,
    )
    sizes = [parse_bytes(size) for size in job.device_memory]
    compiled = {setting: plan(setting)}
    parts = [f"# Compiled memory plan: {path} on {job.devices} device(s)\n", plan_table(compiled[setting])]
    meshes = _meshes(job.devices, job.mesh) if job.search_meshes else [setting.mesh]
    for device_bytes in sizes:
        fitting, _ = search(setting, device_bytes, meshes, compiled)
        parts.append(f"\n## Cheapest settings that fit in {_gb(device_bytes)} GB per device\n")
        parts += [plan_table(p, device_bytes) + "\n" for p in fitting] or ["none of the settings tried fits\n"]
    if sizes:
        parts += ["## Every setting compiled\n", search_table(list(compiled.values()), sizes)]
    return "\n".join(parts)


def search_table(plans: list[Plan], sizes: list[int]) -> str:
    """One row per compiled setting: its knobs, each phase's device total and whether it fits each size."""
    names = [phase.name.split(" (")[0] for phase in plans[0].phases]
    head = ["mesh", "accumulation", "rows per micro-batch", "rollout rows at once", "remat", *names, "peak"]
    head += [f"fits {_gb(size)} GB" for size in sizes]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + " |"]
    order = sorted(
        plans,
        key=lambda p: (
            p.setting.mesh,
            p.setting.config.remat,
            p.setting.config.rows // p.setting.config.gradient_accumulation_steps,
        ),
    )
    for p in order:
        cfg = p.setting.config
        cells = [
            "x".join(map(str, p.setting.mesh)),
            cfg.gradient_accumulation_steps,
            cfg.rows // cfg.gradient_accumulation_steps,
        ]
        cells += [cfg.rollout_batch_size or cfg.rows, cfg.remat, *(_gb(ph.total_bytes) for ph in p.phases)]
        cells += [_gb(p.peak_bytes), *("yes" if p.peak_bytes <= size else "no" for size in sizes)]
        row = "| " + " | ".join(map(str, cells)) + " |"
        if row not in lines:  # the job's own setting may also be a rung of the search
            lines.append(row)
    return "\n".join(lines) + "\n"


def run_plan_memory(job: MemoryPlanJob) -> str:
    """:func:`report` in a child process that simulates ``job.devices`` host devices (JAX reads the device
    count once, when it starts), or in this one when its environment already does."""
    env = host_device_env(job.devices)
    if os.environ.get("XLA_FLAGS") == env["XLA_FLAGS"] and os.environ.get("JAX_PLATFORMS") == "cpu":
        return report(job)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl.memory", job.to_json()],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = ""
    for line in proc.stderr:  # progress lines pass through; the last line names a failure
        if line.startswith(PROGRESS):
            print(line, end="", file=sys.stderr, flush=True)
        elif line.strip():
            last = line.strip()
    out = proc.stdout.read()
    if proc.wait():
        raise ValueError(last or "the memory plan failed")
    return out


if __name__ == "__main__":
    try:
        print(report(MemoryPlanJob.from_json(sys.argv[1])))
    except (ValueError, OSError) as err:  # the parent reports the last line of stderr
        sys.exit(f"{err}")
