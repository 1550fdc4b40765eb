"""Sharding: the mesh, the partition rules on every Qwen2 tensor, the sharded step on 8 host devices
against one device, and the trainer over two processes against one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from rl.config import GRPOConfig
from rl.metrics import read_metrics
from rl.sharding import AXES, batch_sharding, make_mesh, path_name, shard_batch, spec_for, tree_shardings
from rl.step import init_state, make_optimizer
from saerl_jax.model import Qwen2, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sharding_worker.py")
TRAIN_WORKER = Path(__file__).with_name("multihost_worker.py")
MESHES = ("2x2x2", "8x1x1", "1x4x2")
FAST_MESH = "2x2x2"
"""The mesh ``make test`` checks (all three axes at once); the others run under ``make test-slow``."""
FAST_LOSSES = ("grpo", "dapo")
"""The losses ``make test`` checks on it; PPO's and DPO's steps run under ``make test-slow``."""
LOSSES = ("grpo", "dapo", "ppo", "dpo")
METRICS = {
    "grpo": {"loss", "grad_norm", "kl", "entropy", "clip_region"},
    "dapo": {"loss", "grad_norm", "kl", "entropy", "clip_region"},
    "ppo": {"loss", "grad_norm", "kl", "entropy", "pg_clipfrac", "vf_loss", "vf_clipfrac", "return_mean"},
    "dpo": {"loss", "grad_norm", "entropy", "chosen_rewards", "reward_accuracy", "pairs"},
}
"""Metrics each loss must report (at least)."""
TOL = 1e-5

# What each Qwen2 tensor gets: embedding [V, D] and the LM head [D, V] split on V by tensor and D by fsdp;
# projections into heads / the MLP split columns, projections back split rows; norms replicated.
EXPECTED = {
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),
    "q_proj/kernel": P("fsdp", "tensor"),
    "k_proj/kernel": P("fsdp", "tensor"),
    "v_proj/kernel": P("fsdp", "tensor"),
    "q_proj/bias": P("tensor"),
    "k_proj/bias": P("tensor"),
    "v_proj/bias": P("tensor"),
    "o_proj/kernel": P("tensor", "fsdp"),
    "gate_proj/kernel": P("fsdp", "tensor"),
    "up_proj/kernel": P("fsdp", "tensor"),
    "down_proj/kernel": P("tensor", "fsdp"),
    "input_layernorm/weight": P(),
    "post_attention_layernorm/weight": P(),
    "norm/weight": P(),
}


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    """A mesh of any shape without devices (spec_for only reads axis sizes)."""
    return AbstractMesh((data, fsdp, tensor), AXES, axis_types=(AxisType.Auto,) * 3)


def tiny_params(tied: bool, **overrides) -> nnx.State:
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    kwargs.update(num_key_value_heads=2, tie_word_embeddings=tied)
    kwargs.update(overrides)
    return nnx.split(nnx.eval_shape(lambda: Qwen2(Qwen2Config(**kwargs), rngs=nnx.Rngs(0))))[1]


# --- mesh -------------------------------------------------------------------------------------------------
def test_make_mesh_fills_data_axis_and_names_axes():
    mesh = make_mesh(-1, 1, 1)
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(1, 1, 1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_make_mesh_rejects_wrong_products():
    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"needs 4 devices, have 1"):
        make_mesh(2, 2, 1, devices=devices)
    with pytest.raises(ValueError, match=r"needs 2 devices, have 1"):
        make_mesh(1, 1, 2, devices=devices)
    with pytest.raises(ValueError, match=r"1 devices cannot be split into fsdp=2 x tensor=1"):
        make_mesh(-1, 2, 1, devices=devices)


# --- partition rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_qwen2_tensor_gets_its_rule(tied):
    params = tiny_params(tied)
    mesh = abstract_mesh(2, 4, 2)
    seen = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        rule = next(key for key in EXPECTED if name == key or name.endswith("/" + key))
        seen[name] = spec_for(name, leaf.shape, mesh)
        assert seen[name] == EXPECTED[rule], name
    assert ("lm_head/kernel" in seen) is not tied
    assert "layers/1/self_attn/k_proj/bias" in seen
    assert len(seen) == 2 + (not tied) + 2 * 12


def test_optimizer_state_follows_params_and_scalars_replicate():
    params = tiny_params(False)
    state = jax.eval_shape(lambda: init_state(params, make_optimizer(GRPOConfig())))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = tree_shardings(state, mesh)
    named = {path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    q = "layers/0/self_attn/q_proj/kernel"
    moments = [name for name in named if name.endswith(q)]
    assert len(moments) == 3  # the param, Adam's mu and nu
    assert all(named[name] == P("fsdp", "tensor") for name in moments)
    assert named["step"] == P()
    assert [name for name in named if name.endswith("count")] and all(
        named[name] == P() for name in named if name.endswith("count")
    )


def test_indivisible_dimension_names_the_tensor():
    params = tiny_params(True, num_key_value_heads=1)  # k_proj: kernel [64, 16], bias [16]
    message = r"'layers/0/self_attn/k_proj/bias' \(16,\): dimension 16 does not divide over mesh axes tensor \(32\)"
    with pytest.raises(ValueError, match=message):
        tree_shardings(params, abstract_mesh(1, 1, 32))
    with pytest.raises(ValueError, match=r"'embed_tokens/embedding' \(256, 64\): dimension 64 .*fsdp"):
        spec_for("embed_tokens/embedding", (256, 64), abstract_mesh(1, 128, 1))


def test_unmatched_parameter_raises_and_scalars_replicate():
    mesh = abstract_mesh(1, 1, 1)
    with pytest.raises(ValueError, match=r"no partition rule matches parameter 'layers/0/rotary/inv_freq' \(8,\)"):
        spec_for("layers/0/rotary/inv_freq", (8,), mesh)
    assert spec_for("opt_state/0/count", (), mesh) == P()


def test_shard_batch_on_one_device_keeps_the_rows():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = {"rewards_B": np.arange(6, dtype=np.float32), "ids_BN": np.arange(12, dtype=np.int32).reshape(6, 2)}
    out = shard_batch(batch, mesh)
    assert out["ids_BN"].sharding == batch_sharding(mesh)
    for name, value in batch.items():
        np.testing.assert_array_equal(np.asarray(out[name]), value)


# --- 8 host devices ---------------------------------------------------------------------------------------
def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker_runs(tmp_path_factory, meshes: list[str], losses: tuple[str, ...] = LOSSES) -> dict[str, np.ndarray]:
    """What the worker recorded for one device and ``meshes``, ``{loss}/{mesh}/...`` (one process)."""
    out = tmp_path_factory.mktemp("sharded") / "runs.npz"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), "1x1x1", *meshes, *(f"loss={loss}" for loss in losses)],
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    return _worker_runs(tmp_path_factory, [FAST_MESH], FAST_LOSSES)  # about 30 s


@pytest.fixture(scope="module")
def algo_runs(tmp_path_factory):
    return _worker_runs(tmp_path_factory, [FAST_MESH], tuple(loss for loss in LOSSES if loss not in FAST_LOSSES))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    return _worker_runs(tmp_path_factory, [m for m in MESHES if m != FAST_MESH])


def _mesh_params(meshes):
    """``meshes`` as parameters, all but :data:`FAST_MESH` marked slow."""
    return [m if m in (FAST_MESH, "1x1x1") else pytest.param(m, marks=pytest.mark.slow) for m in meshes]


def _loss_params():
    """:data:`LOSSES` as parameters, all but :data:`FAST_LOSSES` marked slow."""
    return [loss if loss in FAST_LOSSES else pytest.param(loss, marks=pytest.mark.slow) for loss in LOSSES]


@pytest.fixture
def sharded_runs(request, mesh, loss):
    """The worker's record holding ``mesh`` and ``loss`` (and the one-device runs)."""
    if mesh not in (FAST_MESH, "1x1x1"):
        return request.getfixturevalue("slow_runs")
    return request.getfixturevalue("fast_runs" if loss in FAST_LOSSES else "algo_runs")


def _series(runs, mesh):
    return {k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith(mesh + "/") and k.count("/") == 1}


def _tree(runs, prefix):
    return {k.removeprefix(prefix): v for k, v in runs.items() if k.startswith(prefix)}


@pytest.mark.parametrize("loss", _loss_params())
@pytest.mark.parametrize("mesh", _mesh_params(MESHES))
def test_sharded_step_matches_one_device(sharded_runs, loss, mesh):
    runs = _tree(sharded_runs, f"{loss}/")
    one, many = _series(runs, "1x1x1"), _series(runs, mesh)
    assert set(many) == set(one) >= METRICS[loss]
    for name in one:
        np.testing.assert_allclose(many[name], one[name], rtol=0, atol=TOL, err_msg=name)
    initial = _tree(runs, "initial/")
    ref, got = _tree(runs, "1x1x1/param/"), _tree(runs, f"{mesh}/param/")
    assert set(got) == set(ref) == set(initial)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=TOL, err_msg=name)
    # The updates dwarf the tolerance, so a gradient pointing elsewhere could not pass; one off by a constant
    # factor (which Adam's update would hide) shows in grad_norm and the loss above.
    assert max(np.abs(ref[name] - initial[name]).max() for name in ref) > 10 * TOL


# Per-device blocks of q_proj [64, 64] and the embedding [256, 64] after the steps.
LAYOUTS = {
    "1x1x1": (1, (64, 64), (256, 64)),
    "8x1x1": (8, (64, 64), (256, 64)),
    "2x2x2": (8, (32, 32), (128, 32)),
    "1x4x2": (8, (16, 32), (128, 16)),
}


@pytest.mark.parametrize("loss", _loss_params())
@pytest.mark.parametrize("mesh", _mesh_params(sorted(LAYOUTS)))
def test_params_stay_sharded_by_the_rules(sharded_runs, loss, mesh):
    runs = _tree(sharded_runs, f"{loss}/")
    devices, q_block, embed_block = LAYOUTS[mesh]
    for name, spec, block in [
        ("layers/0/self_attn/q_proj/kernel", "P('fsdp', 'tensor')", q_block),
        ("embed_tokens/embedding", "P('tensor', 'fsdp')", embed_block),
    ]:
        assert str(runs[f"{mesh}/spec/{name}"]) == spec
        assert int(runs[f"{mesh}/devices/{name}"]) == devices
        assert runs[f"{mesh}/shards/{name}"].tolist() == [list(block)] * devices


# --- two processes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """Ten tiny-math problems: batches of 4, 4 and 2 per epoch, so a step straddles the short batch and
    carries prompts over (on every host) to the next step."""
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    lines = (ROOT / "assets" / "tiny-math" / "problems.jsonl").read_text().splitlines()[:10]
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, data: Path, *, processes: int, devices: int, resume: bool = False) -> None:
    """Runs the trainer worker as ``processes`` processes on localhost, each with ``devices`` CPU devices;
    on a failure or a hang, stops the others and shows every process's output."""
    command = [sys.executable, str(TRAIN_WORKER), "--out", str(out), "--data", str(data)]
    command += ["--resume"] if resume else []
    if processes > 1:
        command += ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(processes)]
    procs = [
        subprocess.Popen(
            command + (["--process-id", str(i)] if processes > 1 else []),
            env=_env(devices),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outputs, failed = [], False
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
            failed |= proc.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                outputs.append(proc.communicate()[0])
    assert not failed, "\n\n".join(out[-3000:] for out in outputs)


def _ids(path: Path) -> list[list[str]]:
    return [json.loads(line)["ids"] for line in path.read_text().splitlines()]


def _final_params(run: Path) -> dict[str, np.ndarray]:
    return load_file(run / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def two_processes(problems, tmp_path_factory):
    """A 4-step run of two processes with one CPU device each (gloo collectives), checkpoints at 3 and 4."""
    out = tmp_path_factory.mktemp("two")
    _train(out, problems, processes=2, devices=1)
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_process(two_processes, problems, tmp_path):
    """Against one process with two devices: the same prompts per step (host h holding rows h::2 of each
    global batch), the same metrics and the same final params; the rollouts decode in the slot engine
    across both processes without gathering the parameters."""
    _train(tmp_path, problems, processes=1, devices=2)

    one = _ids(tmp_path / "batches.jsonl")
    hosts = [_ids(two_processes / f"batches.{h}.jsonl") for h in range(2)]
    assert len(one) == 4 and all(len(ids) == 4 for ids in one)
    for step, ids in enumerate(one):
        assert [hosts[0][step], hosts[1][step]] == [ids[0::2], ids[1::2]]

    for h in range(2):  # each host decoded its own rows with the parameters as sharded
        gathers = json.loads((two_processes / f"gathers.{h}.json").read_text())
        assert "_collect" not in gathers and "export" in gathers, gathers

    metrics = [read_metrics(run) for run in (tmp_path, two_processes)]
    assert [row["step"] for row in metrics[1]] == [1, 2, 3, 4]  # one writer, not one per process
    for a, b in zip(*metrics, strict=True):
        for name in ("loss", "grad_norm", "kl", "reward_mean", "completion_length", "frac_reward_zero_std"):
            assert a[name] == pytest.approx(b[name], abs=TOL), (a["step"], name)
    # Every step has a real gradient (not float noise, which Adam would scale up to the learning rate).
    assert min(row["grad_norm"] for row in metrics[0]) > 0.1

    initial = load_file(ROOT / "assets" / "tiny-math" / "model" / "model.safetensors")
    single, multi = _final_params(tmp_path), _final_params(two_processes)
    assert set(single) == set(multi) == set(initial)
    for name in single:
        np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=TOL, err_msg=name)
    assert max(np.abs(single[name] - initial[name]).max() for name in single) > 10 * TOL


@pytest.mark.slow
def test_two_processes_resume_exactly(two_processes, problems, tmp_path):
    """Resuming both processes from the step-3 checkpoint, where each host has taken its slices of the same
    three sampler batches, gives the uninterrupted run's prompts and params."""
    meta = json.loads((two_processes / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert [queue["taken"] for queue in meta["queues"]] == [3, 3]
    for h in range(2):
        data = two_processes / "checkpoints" / "3" / "data" / f"process_{h}-of-2.json"
        assert data.exists()

    resumed = tmp_path / "resumed"
    shutil.copytree(two_processes, resumed, ignore=shutil.ignore_patterns("hf"))
    shutil.rmtree(resumed / "checkpoints" / "4")
    _train(resumed, problems, processes=2, devices=1, resume=True)

    for h in range(2):
        assert _ids(resumed / f"batches.{h}.jsonl") == _ids(two_processes / f"batches.{h}.jsonl")
    expected, got = _final_params(two_processes), _final_params(resumed)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
