"""SAE metrics: hand-computed FVU/L0/dead fraction, and CE-loss recovered at its two anchors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, padded_batch, save_hf_qwen2
from flax import nnx

from sae import SAEConfig, SparseAutoencoder
from sae.metrics import ce_loss_recovered, fvu, reconstruction_metrics
from saerl_jax.model import load_pretrained


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Wide initialisation, so the logits depend on the residual stream and ablation changes the loss."""
    directory = tmp_path_factory.mktemp("metrics")
    return directory, save_hf_qwen2(directory, initializer_range=0.2, **CONFIGS["tied-gqa"])


def _relu_sae(w_enc, w_dec, b_dec=None) -> SparseAutoencoder:
    d_in, d_sae = w_enc.shape
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", apply_b_dec_to_input=False), rngs=nnx.Rngs(0)
    )
    sae.W_enc.set_value(jnp.asarray(w_enc, jnp.float32))
    sae.W_dec.set_value(jnp.asarray(w_dec, jnp.float32))
    if b_dec is not None:
        sae.b_dec.set_value(jnp.asarray(b_dec, jnp.float32))
    return sae


def _identity_sae(d: int) -> SparseAutoencoder:
    """codes = (relu(x), relu(-x)), decode = relu(x) - relu(-x) = x: a perfect reconstruction."""
    eye = np.eye(d)
    return _relu_sae(np.concatenate([eye, -eye], axis=1), np.concatenate([eye, -eye], axis=0))


def test_fvu_by_hand():
    x = np.array([[1.0, 0.0], [3.0, 2.0]])
    x_hat = np.array([[1.0, 1.0], [2.0, 2.0]])
    # squared error 1 + 1 = 2; variance about the mean (2, 1): 1 + 1 + 1 + 1 = 4
    assert fvu(x, x_hat) == pytest.approx(0.5)


def test_reconstruction_metrics_by_hand():
    # Latent 0 copies x0 (kept by relu when positive), latent 1 never fires, decoder reads latent 0 only.
    sae = _relu_sae(np.array([[1.0, 0.0], [0.0, -10.0]]), np.array([[1.0, 0.0], [0.0, 0.0]]), b_dec=[0.0, 5.0])
    x = np.array([[2.0, 5.0], [4.0, 5.0], [-1.0, 7.0]], np.float32)
    metrics = reconstruction_metrics(sae, x, batch_size=2)
    x_hat = np.array([[2.0, 5.0], [4.0, 5.0], [0.0, 5.0]])
    assert metrics["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-6)
    assert metrics["explained_variance"] == pytest.approx(1 - fvu(x, x_hat), rel=1e-6)
    assert metrics["l0"] == pytest.approx(2 / 3)
    assert metrics["dead_fraction"] == pytest.approx(0.5)


def test_ce_loss_recovered_is_one_for_a_perfect_sae_and_zero_for_a_null_one(checkpoint):
    directory, hf_model = checkpoint
    model = load_pretrained(directory)
    ids, mask = padded_batch([12, 7, 9], 12, hf_model.config.vocab_size, side="right", seed=6)
    perfect = ce_loss_recovered(model, _identity_sae(model.config.hidden_size), 2, ids, mask)
    # The clean loss is transformers' own language-modelling loss on the same batch.
    labels = torch.tensor(np.where(mask == 1, ids, -100))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels).loss.item()
    assert perfect["ce_loss_clean"] == pytest.approx(reference, rel=1e-5)
    assert perfect["ce_loss_sae"] == pytest.approx(perfect["ce_loss_clean"], rel=1e-5)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    d = model.config.hidden_size
    null = ce_loss_recovered(model, _relu_sae(np.eye(d), np.zeros((d, d))), 2, ids, mask)
    assert null["ce_loss_sae"] == pytest.approx(null["ce_loss_zero"], rel=1e-6)
    assert null["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert abs(null["ce_loss_zero"] - null["ce_loss_clean"]) > 0.01 * null["ce_loss_clean"]


def test_splice_mask_limits_the_replaced_positions(checkpoint):
    model = load_pretrained(checkpoint[0])
    ids, mask = padded_batch([10, 10], 10, 320, side="right", seed=2)
    d = model.config.hidden_size
    null = _relu_sae(np.eye(d), np.zeros((d, d)))
    nothing = ce_loss_recovered(model, null, 1, ids, mask, np.zeros_like(mask))
    assert nothing["ce_loss_sae"] == pytest.approx(nothing["ce_loss_clean"], rel=1e-6)
    everything = ce_loss_recovered(model, null, 1, ids, mask)
    assert abs(everything["ce_loss_sae"] - everything["ce_loss_clean"]) > 0.01 * everything["ce_loss_clean"]
