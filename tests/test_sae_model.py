"""SAE variants against a float64 numpy reference; SAELens save/load; sparsify and Gemma Scope importers."""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import sae
from sae import SAEConfig, SAEMetadata, SparseAutoencoder
from sae.model import batch_topk_codes

D, F, K = 24, 48, 5  # non-square (F = 2 D, a whole sparsify expansion factor), so a transpose cannot pass
VARIANTS = ["topk", "batchtopk", "relu", "jumprelu"]
SAELENS_NAMES = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}
METADATA = SAEMetadata(model_name="tiny-qwen", hook_name="blocks.1.hook_resid_post", hook_layer=2)


def _random_params(rng: np.random.Generator, *, threshold: bool) -> dict[str, np.ndarray]:
    """SAELens-named float32 weights; thresholds straddle zero so both sides of the jump are exercised."""
    params = {
        "W_enc": rng.normal(size=(D, F)) / np.sqrt(D),
        "b_enc": 0.5 * rng.normal(size=F),
        "W_dec": rng.normal(size=(F, D)) / np.sqrt(F),
        "b_dec": 0.3 * rng.normal(size=D),
    }
    if threshold:
        params["threshold"] = rng.uniform(-0.5, 1.0, size=F)
    return {name: value.astype(np.float32) for name, value in params.items()}


def _random_sae(architecture: str, *, seed: int = 0, **overrides) -> tuple[SparseAutoencoder, dict[str, np.ndarray]]:
    """An SAE whose every parameter is random (not the initialisation), and those parameters in float64."""
    config = SAEConfig(d_in=D, d_sae=F, architecture=architecture, k=K, metadata=METADATA, **overrides)
    model = SparseAutoencoder(config, rngs=nnx.Rngs(seed))
    params = _random_params(np.random.default_rng(seed), threshold=architecture in ("jumprelu", "batchtopk"))
    for name, value in params.items():
        getattr(model, name).set_value(jnp.asarray(value))
    return model, {name: value.astype(np.float64) for name, value in params.items()}


def _inputs(*leading: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*leading, D)).astype(np.float32)


def _dense_topk(pre: np.ndarray, k: int) -> np.ndarray:
    """Keeps each row's k largest entries of ``pre [..., F]``, zeros elsewhere."""
    idx = np.argsort(-pre, axis=-1)[..., :k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, idx, np.take_along_axis(pre, idx, axis=-1), axis=-1)
    return codes


def ref_encode(p, x, architecture, *, norm_scale=1.0, apply_b_dec_to_input=True) -> np.ndarray:
    """The SAELens encode in float64."""
    x = np.asarray(x, np.float64) * norm_scale
    pre = (x - p["b_dec"] * apply_b_dec_to_input) @ p["W_enc"] + p["b_enc"]
    if architecture == "topk":
        return np.maximum(_dense_topk(pre, K), 0.0)
    if architecture == "relu":
        return np.maximum(pre, 0.0)
    # jumprelu, and batchtopk at inference (a JumpReLU with its estimated threshold)
    return np.maximum(pre, 0.0) * (pre > p["threshold"])


def ref_decode(p, codes, *, norm_scale=1.0) -> np.ndarray:
    return (np.asarray(codes, np.float64) @ p["W_dec"] + p["b_dec"]) / norm_scale


def _assert_codes_close(actual, expected) -> None:
    actual = np.asarray(actual)
    np.testing.assert_array_equal(actual != 0, expected != 0)  # same support, not just close values
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _write_saelens(directory, cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}, directory / sae.io.WEIGHTS_FILE
    )


def _saelens_cfg(**overrides) -> dict:
    return {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
    } | overrides


# ---------------------------------------------------------------------------------------------------- variants


@pytest.mark.parametrize("architecture", VARIANTS)
@pytest.mark.parametrize("leading", [(16,), (3, 5)], ids=["N", "BxT"])
def test_encode_decode_match_numpy_reference(architecture, leading):
    model, p = _random_sae(architecture)
    x = _inputs(*leading)
    codes = model.encode(jnp.asarray(x))
    assert codes.shape == (*leading, F)
    expected = ref_encode(p, x, architecture)
    assert 0 < np.count_nonzero(expected) < expected.size  # the rule really sparsifies, and something fires
    _assert_codes_close(codes, expected)

    x_hat = model.decode(codes)
    assert x_hat.shape == (*leading, D)
    np.testing.assert_allclose(x_hat, ref_decode(p, codes), rtol=1e-5, atol=1e-5)

    out = model(jnp.asarray(x))
    np.testing.assert_array_equal(out.codes, codes)
    np.testing.assert_array_equal(out.x_hat, x_hat)


@pytest.mark.parametrize("leading", [(16,), (3, 5)], ids=["N", "BxT"])
def test_topk_keeps_exactly_k_per_sample(leading):
    model, p = _random_sae("topk")
    x = _inputs(*leading, seed=7)
    codes = np.asarray(model.encode(jnp.asarray(x)))
    np.testing.assert_array_equal(np.count_nonzero(codes, axis=-1), np.full(leading, K))
    # The kept latents are each sample's k largest pre-activations.
    pre = (x.astype(np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    kept = np.sort(np.where(codes != 0, pre, -np.inf), axis=-1)[..., -K:]
    np.testing.assert_allclose(kept, np.sort(pre, axis=-1)[..., -K:], rtol=1e-5, atol=1e-6)


def test_jumprelu_threshold_matters():
    """Latents with ``0 < pre <= threshold`` are dropped, and with ``threshold < pre`` kept as ``pre``."""
    model, p = _random_sae("jumprelu")
    x = _inputs(64)
    pre = (x.astype(np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    codes = np.asarray(model.encode(jnp.asarray(x)))
    dropped = (pre > 0) & (pre <= p["threshold"])
    assert dropped.any()
    assert not codes[dropped].any()
    below_zero = (pre > p["threshold"]) & (pre <= 0)  # negative threshold: relu still zeroes these
    assert below_zero.any()
    assert not codes[below_zero].any()


def test_batch_topk_codes_keeps_k_times_n_largest_over_the_batch():
    n, k = 8, 3
    pre = np.random.default_rng(3).normal(size=(n, F)).astype(np.float32)
    pre[0] += 5.0  # one sample with large pre-activations takes more than k of the batch's budget
    codes = np.asarray(batch_topk_codes(jnp.asarray(pre), k))
    assert np.count_nonzero(codes) == k * n
    assert np.count_nonzero(codes[0]) > k
    largest = np.sort(np.maximum(pre, 0).ravel())[-k * n :]
    np.testing.assert_array_equal(np.sort(codes[codes != 0]), largest)
    np.testing.assert_array_equal(codes[codes != 0], pre[codes != 0])  # kept values are the pre-activations


def test_batch_topk_codes_keeps_no_non_positive_values():
    pre = np.full((4, F), -1.0, np.float32)
    pre[1, 7] = 2.0
    codes = np.asarray(batch_topk_codes(jnp.asarray(pre), 3))
    expected = np.zeros_like(pre)
    expected[1, 7] = 2.0
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("architecture", VARIANTS)
def test_apply_b_dec_to_input_false(architecture):
    model, p = _random_sae(architecture, apply_b_dec_to_input=False)
    x = _inputs(16)
    codes = np.asarray(model.encode(jnp.asarray(x)))
    _assert_codes_close(codes, ref_encode(p, x, architecture, apply_b_dec_to_input=False))
    assert not np.allclose(codes, ref_encode(p, x, architecture, apply_b_dec_to_input=True), atol=1e-3)


# ---------------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("architecture", VARIANTS)
def test_normalisation_is_folded_into_saved_weights(architecture, tmp_path):
    model, p = _random_sae(architecture, normalize_activations="expected_average_only_in")
    model.norm_scale.set_value(jnp.asarray(3.7, jnp.float32))
    x = _inputs(16)
    codes = np.asarray(model.encode(jnp.asarray(x)))
    _assert_codes_close(codes, ref_encode(p, x, architecture, norm_scale=3.7))
    np.testing.assert_allclose(model.decode(codes), ref_decode(p, codes, norm_scale=3.7), rtol=1e-5, atol=1e-6)

    sae.save(model, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["normalize_activations"] == "none"
    loaded = sae.load(tmp_path)
    assert float(loaded.norm_scale[...]) == 1.0
    loaded_codes = np.asarray(loaded.encode(jnp.asarray(x)))
    np.testing.assert_array_equal(loaded_codes != 0, codes != 0)
    np.testing.assert_allclose(loaded_codes, codes, rtol=1e-5, atol=1e-5 * np.abs(codes).max())
    x_hat = np.asarray(model.decode(codes))
    np.testing.assert_allclose(loaded.decode(codes), x_hat, rtol=1e-5, atol=1e-5 * np.abs(x_hat).max())


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("architecture", VARIANTS)
def test_save_load_round_trip_is_bit_exact(architecture, apply_b_dec_to_input, tmp_path):
    model, _ = _random_sae(architecture, apply_b_dec_to_input=apply_b_dec_to_input)
    sae.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]  # no leftover temp files

    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_NAMES[architecture]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, F, "float32")
    assert cfg["apply_b_dec_to_input"] is apply_b_dec_to_input
    assert cfg["normalize_activations"] == "none"
    if architecture == "topk":
        assert cfg["k"] == K
    assert {key: cfg["metadata"][key] for key in ("model_name", "hook_name", "hook_layer")} == {
        "model_name": "tiny-qwen",
        "hook_name": "blocks.1.hook_resid_post",  # capture layer 2 = after block 1, as SAELens names it
        "hook_layer": 1,
    }

    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture in ("jumprelu", "batchtopk") else [])
    with safe_open(tmp_path / "sae_weights.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(names)
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    assert shapes["W_enc"] == (D, F) and shapes["W_dec"] == (F, D)
    assert shapes["b_enc"] == (F,) and shapes["b_dec"] == (D,)

    loaded = sae.load(tmp_path)
    assert loaded.config.architecture == {"batchtopk": "jumprelu"}.get(architecture, architecture)
    assert (loaded.config.d_in, loaded.config.d_sae) == (D, F)
    assert loaded.config.apply_b_dec_to_input is apply_b_dec_to_input
    assert loaded.config.metadata == METADATA
    if architecture == "topk":
        assert loaded.config.k == K
    for name in names:
        np.testing.assert_array_equal(loaded_value := np.asarray(getattr(loaded, name)[...]), getattr(model, name)[...])
        assert loaded_value.dtype == np.float32
    x = jnp.asarray(_inputs(3, 5))
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))
    np.testing.assert_array_equal(loaded(x).x_hat, model(x).x_hat)


def test_loads_saelens_directory_written_by_hand(tmp_path):
    p = _random_params(np.random.default_rng(11), threshold=False)
    meta = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "prepend_bos": True}
    _write_saelens(tmp_path, _saelens_cfg(meta=meta), p)
    loaded = sae.load(tmp_path)
    assert loaded.config.architecture == "relu"
    assert loaded.config.metadata == SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_post", hook_layer=4)
    x = _inputs(16)
    p64 = {name: value.astype(np.float64) for name, value in p.items()}
    codes = np.asarray(loaded.encode(jnp.asarray(x)))
    _assert_codes_close(codes, ref_encode(p64, x, "relu"))
    np.testing.assert_allclose(loaded.decode(codes), ref_decode(p64, codes), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- importers


def _write_sparsify(directory, encoder_weight, encoder_bias, w_dec, b_dec, **cfg_overrides) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "k": K,
        "num_latents": F,
        "expansion_factor": F // D,
        "normalize_decoder": True,
        "multi_topk": False,
        "skip_connection": False,
    } | cfg_overrides
    (directory / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"encoder.weight": encoder_weight, "encoder.bias": encoder_bias, "W_dec": w_dec, "b_dec": b_dec}
    save_file({name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}, directory / "sae.safetensors")


def _sparsify_tensors(seed: int = 5):
    rng = np.random.default_rng(seed)
    encoder_weight = (rng.normal(size=(F, D)) / np.sqrt(D)).astype(np.float32)  # torch Linear: [out, in]
    encoder_bias = (0.5 * rng.normal(size=F)).astype(np.float32)
    w_dec = (rng.normal(size=(F, D)) / np.sqrt(F)).astype(np.float32)
    b_dec = (0.3 * rng.normal(size=D)).astype(np.float32)
    return encoder_weight, encoder_bias, w_dec, b_dec


def test_load_sparsify_matches_sparsify_encode(tmp_path):
    encoder_weight, encoder_bias, w_dec, b_dec = _sparsify_tensors()
    _write_sparsify(tmp_path, encoder_weight, encoder_bias, w_dec, b_dec)
    loaded = sae.load_sparsify(tmp_path)
    assert (loaded.config.d_in, loaded.config.d_sae, loaded.config.k) == (D, F, K)

    x = _inputs(16)
    # sparsify: pre_acts = relu(encoder(x - b_dec)); top_acts, top_indices = pre_acts.topk(k);
    # decode = sum_i top_acts[i] * W_dec[top_indices[i]] + b_dec
    x64 = x.astype(np.float64)
    pre = np.maximum((x64 - b_dec) @ encoder_weight.T.astype(np.float64) + encoder_bias, 0.0)
    top_indices = np.argsort(-pre, axis=-1)[:, :K]
    top_acts = np.take_along_axis(pre, top_indices, axis=-1)
    expected_x_hat = np.einsum("nk,nkd->nd", top_acts, w_dec.astype(np.float64)[top_indices]) + b_dec
    expected_codes = np.zeros_like(pre)
    np.put_along_axis(expected_codes, top_indices, top_acts, axis=-1)

    out = loaded(jnp.asarray(x))
    _assert_codes_close(out.codes, expected_codes)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(out.codes), axis=-1), np.full(16, K))
    np.testing.assert_allclose(out.x_hat, expected_x_hat, rtol=1e-5, atol=1e-5)


def test_load_sparsify_with_num_latents_zero_uses_the_tensor_shapes(tmp_path):
    """sparsify writes ``num_latents: 0`` when the width came from ``expansion_factor``."""
    _write_sparsify(tmp_path, *_sparsify_tensors(), num_latents=0)
    loaded = sae.load_sparsify(tmp_path)
    assert (loaded.config.d_in, loaded.config.d_sae, loaded.config.k) == (D, F, K)


def test_load_sparsify_rejects_transposed_encoder(tmp_path):
    encoder_weight, encoder_bias, w_dec, b_dec = _sparsify_tensors()
    _write_sparsify(tmp_path, encoder_weight.T, encoder_bias, w_dec, b_dec)
    with pytest.raises(ValueError, match=r"encoder\.weight"):
        sae.load_sparsify(tmp_path)


@pytest.mark.parametrize("broken", ["encoder.weight", "encoder.bias"])
def test_load_sparsify_shape_errors_name_the_file_tensor(tmp_path, broken):
    """With ``num_latents: 0`` the widths come from the file; a bad tensor is blamed by its sparsify name,
    not by the SAELens name it is renamed to."""
    encoder_weight, encoder_bias, w_dec, b_dec = _sparsify_tensors()
    if broken == "encoder.weight":
        encoder_weight = encoder_weight.T
    else:
        encoder_bias = encoder_bias[:-1]
    _write_sparsify(tmp_path, encoder_weight, encoder_bias, w_dec, b_dec, num_latents=0)
    with pytest.raises(ValueError, match=re.escape(broken)):
        sae.load_sparsify(tmp_path)


def test_load_gemma_scope_matches_gemma_scope_encode(tmp_path):
    rng = np.random.default_rng(9)
    p = _random_params(rng, threshold=True)
    file = tmp_path / "params.npz"
    np.savez(file, **p)
    loaded = sae.load_gemma_scope(file)
    assert loaded.config.architecture == "jumprelu"
    assert (loaded.config.d_in, loaded.config.d_sae) == (D, F)

    x = _inputs(16)
    p64 = {name: value.astype(np.float64) for name, value in p.items()}
    pre = x.astype(np.float64) @ p64["W_enc"] + p64["b_enc"]  # Gemma Scope does not subtract b_dec
    expected_codes = np.maximum(pre, 0.0) * (pre > p64["threshold"])
    out = loaded(jnp.asarray(x))
    _assert_codes_close(out.codes, expected_codes)
    np.testing.assert_allclose(out.x_hat, expected_codes @ p64["W_dec"] + p64["b_dec"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- errors


def test_load_missing_cfg(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no cfg\.json"):
        sae.load(tmp_path)


def test_load_missing_weights_file(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(_saelens_cfg()))
    with pytest.raises(FileNotFoundError, match=r"no sae_weights\.safetensors"):
        sae.load(tmp_path)


@pytest.mark.parametrize(
    ("architecture", "drop"), [("standard", "b_enc"), ("jumprelu", "threshold")], ids=["b_enc", "threshold"]
)
def test_load_missing_tensor(tmp_path, architecture, drop):
    p = _random_params(np.random.default_rng(0), threshold=True)
    del p[drop]
    if architecture == "standard":
        del p["threshold"]
    _write_saelens(tmp_path, _saelens_cfg(architecture=architecture), p)
    with pytest.raises(ValueError, match=rf"sae_weights\.safetensors: missing tensor {drop}"):
        sae.load(tmp_path)


def test_load_misshaped_tensor(tmp_path):
    p = _random_params(np.random.default_rng(0), threshold=False)
    p["W_enc"] = p["W_enc"].T
    _write_saelens(tmp_path, _saelens_cfg(), p)
    with pytest.raises(ValueError, match=rf"tensor W_enc has shape \[{F}, {D}\], expected \[{D}, {F}\]"):
        sae.load(tmp_path)


def test_load_unexpected_tensor(tmp_path):
    p = _random_params(np.random.default_rng(0), threshold=False)
    p["W_skip"] = np.zeros((D, D), np.float32)
    _write_saelens(tmp_path, _saelens_cfg(), p)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) W_skip"):
        sae.load(tmp_path)


def test_load_unknown_architecture(tmp_path):
    _write_saelens(
        tmp_path, _saelens_cfg(architecture="gated"), _random_params(np.random.default_rng(0), threshold=False)
    )
    with pytest.raises(ValueError, match=r"architecture 'gated' is not supported"):
        sae.load(tmp_path)


def test_load_refuses_unfolded_normalisation(tmp_path):
    cfg = _saelens_cfg(normalize_activations="expected_average_only_in")
    _write_saelens(tmp_path, cfg, _random_params(np.random.default_rng(0), threshold=False))
    with pytest.raises(ValueError, match=r"normalize_activations='expected_average_only_in'"):
        sae.load(tmp_path)


def test_check_matches_model_names_both_sizes():
    model, _ = _random_sae("topk")
    sae.check_matches_model(model, hidden_size=D)
    with pytest.raises(ValueError, match=rf"d_in={D}\b.*\b99\b"):
        sae.check_matches_model(model, hidden_size=99)


def test_config_validation():
    with pytest.raises(ValueError, match=rf"k must be in \[1, d_sae={F}\], got {F + 1}"):
        SAEConfig(d_in=D, d_sae=F, architecture="topk", k=F + 1)
    with pytest.raises(ValueError, match=r"k must be"):
        SAEConfig(d_in=D, d_sae=F, architecture="batchtopk", k=0)
    with pytest.raises(ValueError, match=r"d_in=0"):
        SAEConfig(d_in=0, d_sae=F)
    with pytest.raises(ValueError, match=r"unknown architecture 'gated'"):
        SAEConfig(d_in=D, d_sae=F, architecture="gated")
