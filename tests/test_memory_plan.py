"""The compiled memory plan: what it counts, the per-layer extrapolation, the estimate against the measured
peak of the same step on CPU, the parameters split over 8 simulated devices, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rl.memory
from rl.config import GRPOConfig
from rl.memory import (
    Phase,
    Plan,
    PlanSetting,
    Usage,
    host_device_env,
    parse_bytes,
    plan,
    planned_config,
    search,
    search_table,
)
from rl.sharding import batch_sharding, make_mesh, tree_shardings
from rl.step import init_state, jit_train_step, make_optimizer
from saerl_jax.cli import main
from saerl_jax.model import Qwen2, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
MODEL = Qwen2Config(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
CONFIG = GRPOConfig(
    batch_size=4, num_generations=4, max_prompt_length=32, max_completion_length=64, beta=0.04, compute_dtype="float32"
)
MEASURED_FACTOR = 2.0
"""The compiled estimate of the train step's peak is within this factor of the measured RSS peak."""


@pytest.fixture(scope="module")
def tiny_plan():
    return plan(PlanSetting(model=MODEL, config=CONFIG, mesh=(1, 1, 1)))


@pytest.mark.slow  # compiles several programs: about 30-60 s each on 2 cores
def test_plan_counts_the_state_the_batch_and_the_donation(tiny_plan):
    params = (
        MODEL.vocab_size * MODEL.hidden_size
        + MODEL.num_hidden_layers
        * (
            3 * MODEL.hidden_size**2  # q, o: D x D; k, v: D x D/2 (2 of 4 heads)
            + 2 * 64
            + MODEL.hidden_size  # biases of q (D), k and v (D/2 each)
            + 3 * MODEL.hidden_size * MODEL.intermediate_size
            + 2 * MODEL.hidden_size
        )
        + MODEL.hidden_size
    )
    param_count = sum(
        x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Qwen2(MODEL, rngs=nnx.Rngs(0)))))
    )
    assert tiny_plan.reference_bytes == 4 * param_count
    assert abs(param_count - params) < 0.01 * params
    # params + two AdamW moments (+ small counters), float32
    assert 3 * 4 * param_count <= tiny_plan.state_bytes <= 3 * 4 * param_count + 64
    step = next(p for p in tiny_plan.phases if p.name == "train step")
    rows, n, p = CONFIG.rows, CONFIG.max_completion_length, CONFIG.max_prompt_length
    batch_bytes = 4 * (2 * rows * p + 2 * rows * n + rows + rows * n)  # ids, masks, rewards, ref log-probs
    assert step.usage.argument_bytes == tiny_plan.state_bytes + batch_bytes
    assert step.usage.alias_bytes == tiny_plan.state_bytes  # the state is donated and updated in place
    assert step.resident_bytes == tiny_plan.reference_bytes
    names = [p.name for p in tiny_plan.phases]
    engine = [f"rollout prefill ({rows} slots)", f"rollout decode ({rows} slots)"]
    assert names == ["train step", *engine, "reference log-probs"]
    head_dim = MODEL.hidden_size // MODEL.num_attention_heads
    cache = 2 * MODEL.num_hidden_layers * rows * MODEL.num_key_value_heads * (p + n) * head_dim * 4
    for phase in tiny_plan.phases[1:3]:  # the slots, their cache included, are donated and updated in place
        assert phase.usage.alias_bytes >= cache, phase.name
    static = plan(PlanSetting(model=MODEL, config=dataclasses.replace(CONFIG, rollout_engine="static"), mesh=(1, 1, 1)))
    assert [p.name for p in static.phases] == ["train step", f"rollout ({rows} rows per call)", "reference log-probs"]
    assert tiny_plan.peak_bytes == max(p.usage.peak_bytes + p.resident_bytes for p in tiny_plan.phases)


@pytest.mark.slow  # compiles several programs: about 30-60 s each on 2 cores
def test_per_layer_extrapolation_matches_compiling_every_layer(tiny_plan):
    extrapolated = plan(PlanSetting(model=MODEL, config=CONFIG, mesh=(1, 1, 1), compile_layers=1))
    assert extrapolated.state_bytes == tiny_plan.state_bytes
    for full, guess in zip(tiny_plan.phases, extrapolated.phases, strict=True):
        assert guess.total_bytes == pytest.approx(full.total_bytes, rel=0.1), full.name


@pytest.mark.slow  # compiles several programs: about 30-60 s each on 2 cores
def test_a_smaller_rollout_chunk_and_accumulation_need_less(tiny_plan):
    lean = dataclasses.replace(CONFIG, rollout_batch_size=4, gradient_accumulation_steps=4)
    leaner = plan(PlanSetting(model=MODEL, config=lean, mesh=(1, 1, 1)))
    for name in ("train step", "rollout"):
        before = next(p for p in tiny_plan.phases if p.name.startswith(name))
        after = next(p for p in leaner.phases if p.name.startswith(name))
        assert after.usage.temp_bytes < before.usage.temp_bytes, name


def _rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the RSS peak")
@pytest.mark.parametrize(
    "options",
    [{}, pytest.param({"remat": True, "attention_chunk": 16, "max_completion_length": 224}, marks=pytest.mark.slow)],
    ids=["plain", "remat-chunked"],
)
def test_compiled_estimate_is_within_a_factor_of_the_measured_peak(options):
    config = dataclasses.replace(CONFIG, **options)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = Qwen2(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(config)
    shardings = tree_shardings(jax.eval_shape(lambda p: init_state(p, optimizer), params), mesh)
    step = jit_train_step(graphdef, config, optimizer, state_shardings=shardings, batch_shardings=batch_sharding(mesh))
    rows, p, n = config.rows, config.max_prompt_length, config.max_completion_length
    rng = np.random.default_rng(0)
    host = {
        "prompt_ids_BP": rng.integers(0, MODEL.vocab_size, (rows, p), dtype=np.int32),
        "prompt_mask_BP": np.ones((rows, p), np.int32),
        "completion_ids_BN": rng.integers(0, MODEL.vocab_size, (rows, n), dtype=np.int32),
        "loss_mask_BN": np.ones((rows, n), np.int32),
        "rewards_B": rng.normal(size=rows).astype(np.float32),
        "ref_logp_BN": np.full((rows, n), -7.0, np.float32),
    }
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    compiled = step.lower(jax.eval_shape(lambda p: init_state(p, optimizer), params), abstract).compile()
    usage = Usage.of(compiled)
    state = jax.device_put(init_state(params, optimizer), shardings)
    batch = jax.device_put(host)
    jax.block_until_ready((state, batch))
    before = _rss("VmRSS")  # the arguments are resident already
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    measured = _rss("VmHWM") - before
    predicted = usage.peak_bytes - usage.argument_bytes  # outputs not aliased + temporaries
    assert predicted > 50 * 10**6  # large enough to stand out of the allocator's noise
    assert predicted / MEASURED_FACTOR <= measured <= predicted * MEASURED_FACTOR, (measured, predicted)


def _train_step_temp_bytes(layers: int, **options) -> int:
    """Temporary bytes of the compiled train step (one device) for MODEL cut to ``layers`` blocks."""
    cfg = dataclasses.replace(CONFIG, max_completion_length=224, compute_dtype="float32", **options)
    model = nnx.eval_shape(lambda: Qwen2(dataclasses.replace(MODEL, num_hidden_layers=layers), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(cfg)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    rows, p, n = cfg.rows, cfg.max_prompt_length, cfg.max_completion_length
    batch = {
        "prompt_ids_BP": jax.ShapeDtypeStruct((rows, p), jnp.int32),
        "prompt_mask_BP": jax.ShapeDtypeStruct((rows, p), jnp.int32),
        "completion_ids_BN": jax.ShapeDtypeStruct((rows, n), jnp.int32),
        "loss_mask_BN": jax.ShapeDtypeStruct((rows, n), jnp.int32),
        "rewards_B": jax.ShapeDtypeStruct((rows,), jnp.float32),
        "ref_logp_BN": jax.ShapeDtypeStruct((rows, n), jnp.float32),
    }
    return Usage.of(jit_train_step(graphdef, cfg, optimizer).lower(state, batch).compile()).temp_bytes


def test_remat_and_attention_chunks_bound_the_compiled_step_memory():
    t = CONFIG.max_prompt_length + 224
    scores = CONFIG.rows * MODEL.num_attention_heads * t * t * 4  # one block's float32 attention scores
    one, three = (_train_step_temp_bytes(n, remat=True) for n in (1, 3))
    # remat keeps each block's input ([rows, T, D], 1/8 of its scores here), not its attention
    assert three - one < scores / 2, (one, three, scores)
    chunked = _train_step_temp_bytes(3, remat=True, attention_chunk=32)
    assert chunked < three - scores, (chunked, three, scores)  # the one block recomputed holds 32 of 256 queries


@pytest.mark.slow  # compiles several programs: about 30-60 s each on 2 cores
def test_parameters_split_over_eight_simulated_devices(tiny_plan, tmp_path):
    script = (
        "import json, dataclasses, jax\n"
        "from rl.memory import PlanSetting, plan\n"
        "from tests.test_memory_plan import MODEL, CONFIG\n"
        "assert jax.device_count() == 8\n"
        "p = plan(PlanSetting(model=MODEL, config=CONFIG, mesh=(1, 8, 1)))\n"
        "print(json.dumps({'state': p.state_bytes, 'reference': p.reference_bytes}))\n"
    )
    env = host_device_env(8)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    # every tensor but the norms' weights divides by 8 along D
    assert tiny_plan.state_bytes / 8 <= sharded["state"] <= tiny_plan.state_bytes / 8 * 1.05
    assert tiny_plan.reference_bytes / 8 <= sharded["reference"] <= tiny_plan.reference_bytes / 8 * 1.05


def test_a_plan_resolves_default_dtypes_as_an_accelerator_does():
    planned = planned_config(GRPOConfig())  # compiled on a CPU, planned for a GPU / TPU
    assert (planned.compute_dtype, planned.reference_dtype, planned.cache_dtype) == ("bfloat16",) * 3
    chosen = planned_config(GRPOConfig(compute_dtype="float32", cache_dtype="bfloat16"))
    assert (chosen.compute_dtype, chosen.reference_dtype, chosen.cache_dtype) == ("float32", "float32", "bfloat16")


def test_search_finds_the_cheapest_fitting_rung_and_compiles_each_setting_once(monkeypatch):
    """With a stand-in for the compiler: peak bytes = rows per micro-batch (halved by remat), so the
    cheapest fitting rung is known, and a second device size reuses every plan already made."""
    calls = []

    def fake_plan(setting: PlanSetting) -> Plan:
        calls.append(setting)
        cfg = setting.config
        rows = cfg.rows // cfg.gradient_accumulation_steps
        usage = Usage(0, 0, 0, (rows + 1) // 2 if cfg.remat else rows)
        return Plan(setting, [Phase("train step", usage, 0)], 0, 0)

    monkeypatch.setattr(rl.memory, "plan", fake_plan)
    setting = PlanSetting(model=MODEL, config=CONFIG, mesh=(1, 1, 1))  # 16 rows: rungs 16, 8, 4, 2, 1
    compiled: dict = {}
    fitting, missed = search(setting, 4, [(1, 1, 1)], compiled)
    (best,) = fitting
    assert (best.setting.config.gradient_accumulation_steps, best.setting.config.remat) == (4, False)
    assert best.setting.config.rollout_batch_size == 4  # none given: it halves with the micro-batch
    assert all(p.peak_bytes > 4 for p in missed)
    first = len(calls)
    fitting, _ = search(setting, 8, [(1, 1, 1)], compiled)
    assert fitting[0].setting.config.gradient_accumulation_steps == 2
    (tight,) = search(setting, 0, [(1, 1, 1)], compiled)[0] or [None]  # nothing fits in 0 bytes
    assert tight is None
    assert len(calls) == len(compiled) and len(set(calls)) == len(calls)  # never the same setting twice
    assert first < len(calls)
    table = search_table(list(compiled.values()), [4, 8])
    rows = [line for line in table.splitlines()[2:] if line]
    assert len(rows) == len(compiled)
    assert "| 1x1x1 | 4 | 4 | 4 | False | 0.00 | 0.00 | yes | yes |" in table


def test_parse_bytes_reads_decimal_units():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("141 gb") == 141 * 10**9
    assert parse_bytes("512MB") == 512 * 10**6
    with pytest.raises(ValueError, match="80GB"):
        parse_bytes("lots")


@pytest.mark.slow  # compiles several programs: about 30-60 s each on 2 cores
def test_cli_plans_in_a_child_with_the_simulated_devices(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"model_type": "qwen2", **dataclasses.asdict(dataclasses.replace(MODEL, num_hidden_layers=2))})
    )
    argv = ["plan-memory", "--model-config", str(config), "--devices", "2", "--mesh", "1", "2", "1"]
    argv += [
        "--batch-size",
        "2",
        "--num-generations",
        "2",
        "--max-prompt-length",
        "16",
        "--max-completion-length",
        "16",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "on 2 device(s)" in out and "| train step |" in out and "mesh 1x2x1" in out
    with pytest.raises(SystemExit, match="needs 3 devices, have 2"):
        main([*argv[:5], "--mesh", "3", "1", "1", *argv[9:]])


def test_full_size_fixtures_match_the_published_architectures():
    small = Qwen2Config.from_pretrained(ROOT / "assets/configs/qwen2.5-math-1.5b")
    big = Qwen2Config.from_pretrained(ROOT / "assets/configs/qwen2.5-math-7b")
    assert (small.hidden_size, small.num_attention_heads, small.num_key_value_heads) == (1536, 12, 2)
    assert small.tie_word_embeddings and small.vocab_size == 151936 and small.rope_theta == 10000.0
    assert (big.hidden_size, big.intermediate_size, big.num_attention_heads, big.num_key_value_heads) == (
        3584,
        18944,
        28,
        4,
    )
    assert not big.tie_word_embeddings and big.vocab_size == 152064
    count = sum(
        x.size
        for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Qwen2(small, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))))
    )
    assert count == 1_543_714_304  # as in tests/test_model.py
