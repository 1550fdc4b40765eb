"""Decodes with the slot engine on several meshes and saves the tokens and the slots' layout.

Run by ``tests/test_engine.py`` in a fresh process with 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``)::

    python tests/engine_worker.py OUT.npz MESH [MESH ...]      # MESH: 1x1x1, 8x1x1, 2x2x2, 1x4x2

The parameters are placed with the trainer's partition rules for the mesh (fsdp / tensor sharded), the
slots with :func:`~saerl_jax.model.engine.slot_shardings`; ``1x1x1`` is one device without a mesh.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from rl.sharding import make_mesh, tree_shardings
from saerl_jax.model import Qwen2, Qwen2Config, SamplingConfig
from saerl_jax.model import engine as engine_module
from saerl_jax.model.engine import EngineConfig, generate_continuous

MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}


def main(out: str, meshes: list[str]) -> None:
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    graphdef, params = nnx.split(Qwen2(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, size=6)
    ids = np.zeros((6, 8), np.int32)
    mask = (np.arange(8)[None] >= 8 - lengths[:, None]).astype(np.int32)
    ids[mask == 1] = rng.integers(1, 256, size=int(mask.sum()))
    ids, mask = np.repeat(ids, 4, axis=0), np.repeat(mask, 4, axis=0)
    keys = jax.random.split(jax.random.key(5), len(ids))
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0)
    results = {}
    seen = {}
    original = engine_module.decode_fn

    def watched(graphdef, state, slots, *args, **kwargs):  # record how the decode loop's slots are laid out
        slots, ran, produced = original(graphdef, state, slots, *args, **kwargs)
        seen["cache"] = slots.cache[0].k_BKSH.sharding
        seen["tokens"] = slots.tokens_SN.sharding
        return slots, ran, produced

    engine_module.decode_fn = watched
    for name in meshes:
        mesh = None if name == "1x1x1" else make_mesh(*MESHES[name])
        placed = params if mesh is None else jax.device_put(params, tree_shardings(params, mesh))
        sampled, stats = generate_continuous(
            graphdef,
            placed,
            ids,
            mask,
            keys,
            sampling=cfg,
            eos_ids=list(range(3, 40)),
            pad_id=0,
            engine=EngineConfig(slots=8, sync_steps=2),
            mesh=mesh,
        )
        results[f"{name}/tokens"] = sampled.tokens_BN
        results[f"{name}/mask"] = sampled.mask_BN
        results[f"{name}/logprobs"] = sampled.logprobs_BN
        results[f"{name}/admissions"] = stats.admissions
        if mesh is not None:
            results[f"{name}/cache_spec"] = str(seen["cache"].spec)
            results[f"{name}/tokens_spec"] = str(seen["tokens"].spec)
            results[f"{name}/cache_devices"] = len(seen["cache"].device_set)
            q = placed["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
            results[f"{name}/q_proj_shards"] = len({str(s.index) for s in q.addressable_shards})
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
