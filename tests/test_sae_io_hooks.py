"""SAE hook names: capture layer L (``output_hidden_states[L]``) is SAELens' ``blocks.{L-1}.hook_resid_post``."""

from __future__ import annotations

import json

import pytest
from flax import nnx

import sae
from sae import SAEConfig, SAEMetadata, SparseAutoencoder
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS


def _saved(tmp_path, metadata: SAEMetadata):
    model = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=2, metadata=metadata), rngs=nnx.Rngs(0))
    return sae.save(model, tmp_path / "sae")


def _with_metadata(directory, metadata: dict, *, nested: bool = True):
    cfg = json.loads((directory / "cfg.json").read_text())
    del cfg["metadata"]
    cfg |= {"metadata": metadata} if nested else metadata
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return sae.load(directory).config.metadata


@pytest.mark.parametrize("layer", [1, 3, 27])
def test_write_then_read_gives_the_same_capture_layer(tmp_path, layer):
    path = _saved(tmp_path, SAEMetadata(hook_layer=layer))
    written = json.loads((path / "cfg.json").read_text())["metadata"]
    assert (written["hook_name"], written["hook_layer"]) == (f"blocks.{layer - 1}.hook_resid_post", layer - 1)
    assert sae.load(path).config.metadata.hook_layer == layer


@pytest.mark.parametrize(
    ("metadata", "layer"),
    [
        ({"hook_name": "blocks.26.hook_resid_post", "hook_layer": 26}, 27),  # SAELens: after block 26
        ({"hook_name": "blocks.27.hook_resid_pre", "hook_layer": 27}, 27),  # the same site, before block 27
        ({"hook_name": "model.layers.3", "hook_layer": 3}, 3),  # what saerl wrote before
        ({"hook_name": "blocks.5.hook_mlp_out", "hook_layer": 5}, None),  # not the residual stream: ask --layer
        ({"hook_layer": 5}, None),
    ],
)
def test_saelens_hook_names_load_as_capture_layers(tmp_path, metadata, layer):
    path = _saved(tmp_path, SAEMetadata())
    assert _with_metadata(path, metadata).hook_layer == layer


def test_older_saelens_cfg_with_hook_fields_at_top_level(tmp_path):
    path = _saved(tmp_path, SAEMetadata())
    loaded = _with_metadata(path, {"hook_name": "blocks.26.hook_resid_post", "model_name": "qwen"}, nested=False)
    assert (loaded.hook_layer, loaded.model_name) == (27, "qwen")


def test_shipped_tiny_math_sae_reads_layer_3_from_saelens_names():
    written = json.loads((ASSETS / "sae" / "cfg.json").read_text())["metadata"]
    assert (written["hook_name"], written["hook_layer"]) == ("blocks.2.hook_resid_post", 2)
    assert sae.load(ASSETS / "sae").config.metadata.hook_layer == 3  # trained with saerl train-sae --layer 3
