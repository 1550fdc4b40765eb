"""The loader is strict and names what is wrong; saved models load back in transformers."""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import padded_batch, save_hf_qwen2
from flax import nnx
from safetensors.numpy import load_file, save_file

from saerl_jax.model import Qwen2, Qwen2Config, forward, load_pretrained, save_pretrained
from saerl_jax.model.weights import hf_to_path, path_to_hf


@pytest.fixture
def checkpoint(tmp_path, small_checkpoint):
    """A writable copy of the small single-file checkpoint."""
    directory = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint[0], directory)
    return directory


def _rewrite(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    message = r"model\.safetensors: missing tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.bias"
    with pytest.raises(ValueError, match=message):
        load_pretrained(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    def add(tensors):
        tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)

    file = _rewrite(checkpoint, add)
    with pytest.raises(ValueError, match=re.escape(f"{file}: unexpected tensor model.layers.0.self_attn.o_proj.bias")):
        load_pretrained(checkpoint)


def test_unexpected_layer_beyond_config_is_named(checkpoint):
    def add(tensors):
        tensors["model.layers.7.input_layernorm.weight"] = np.ones(64, np.float32)

    _rewrite(checkpoint, add)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.7\.input_layernorm\.weight"):
        load_pretrained(checkpoint)


def test_misshaped_tensor_is_named_with_both_shapes(checkpoint):
    def shrink(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"][:100]

    file = _rewrite(checkpoint, shrink)
    message = re.escape(f"{file}: tensor model.layers.2.mlp.up_proj.weight has shape [100, 64], expected [112, 64]")
    with pytest.raises(ValueError, match=message):
        load_pretrained(checkpoint)


def test_tied_checkpoint_may_carry_a_redundant_lm_head(checkpoint):
    def add(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

    _rewrite(checkpoint, add)
    assert load_pretrained(checkpoint).lm_head is None


def test_untied_checkpoint_without_lm_head_is_missing_it(tmp_path):
    save_hf_qwen2(tmp_path, tie_word_embeddings=False)
    _rewrite(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) lm_head\.weight"):
        load_pretrained(tmp_path)


def test_directory_errors(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a directory"):
        load_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        load_pretrained(empty)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_pretrained(checkpoint)


def test_other_model_type_is_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'llama', expected 'qwen2'"):
        load_pretrained(checkpoint)


def test_sharded_index_naming_a_missing_file(tmp_path):
    save_hf_qwen2(tmp_path, shard="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    message = re.escape(f"model.safetensors.index.json names {shard}, which does not exist")
    with pytest.raises(FileNotFoundError, match=message):
        load_pretrained(tmp_path)


def test_name_table_round_trips_every_parameter():
    cfg = Qwen2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, p))
        assert hf_to_path(path_to_hf(key))[0] == key


def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path):
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    model = Qwen2(cfg, rngs=nnx.Rngs(7))
    save_pretrained(model, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    hf_model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf_model.config.rope_parameters["rope_theta"] == 5000.0
    ids, mask = padded_batch([10, 5], 10, 96, side="right")
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(forward(model, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    reloaded = load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(forward(reloaded, ids, mask)), ours)
    assert reloaded.config == cfg
    assert reloaded.dtype == jnp.float32
