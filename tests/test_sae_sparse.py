"""The k-slot products of TopK training (sae.sparse) against their dense formulations: the two-pass top-k,
the decode and the encoder columns with their hand-written backward passes, and the TopK loss with AuxK
(no, few and many dead latents) against dense codes, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae import SAEConfig, SparseAutoencoder
from sae.model import topk_codes
from sae.sparse import GROUP, encoder_columns, sparse_decode, top_k
from sae.train import TrainConfig, init_state, sae_loss, trained_sae


def _dense_codes(values_NK, indices_NK, d_sae):
    return (
        jnp.zeros((values_NK.shape[0], d_sae), values_NK.dtype)
        .at[jnp.arange(values_NK.shape[0])[:, None], indices_NK]
        .set(values_NK)
    )


@pytest.mark.parametrize(
    ("d_sae", "k"),
    [(4096, 32), (512, 8), (1024, 7), (100, 5), (256, 32)],  # two-pass; two-pass; odd k; F % GROUP != 0; few groups
)
def test_top_k_equals_lax_top_k(d_sae, k):
    pre_NF = jax.random.normal(jax.random.key(d_sae + k), (64, d_sae))
    values, indices = top_k(pre_NF, k)
    expected_values, expected_indices = jax.lax.top_k(pre_NF, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected_indices))


def test_top_k_clustered_winners_and_masked_rows():
    """All k winners inside one group and neighbouring groups, and rows that are mostly -inf (AuxK)."""
    d_sae, k = 2048, 16
    pre_NF = np.array(jax.random.normal(jax.random.key(0), (8, d_sae)))
    pre_NF[0, 40 : 40 + k] = 10.0 + np.arange(k)  # k winners in two adjacent groups
    pre_NF[1, :] = -np.inf
    pre_NF[1, [3, 700, 701, 2000]] = [1.0, 2.0, 3.0, 4.0]  # fewer finite values than k
    values, indices = top_k(jnp.asarray(pre_NF), k)
    expected_values, _ = jax.lax.top_k(jnp.asarray(pre_NF), k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
    assert set(np.asarray(indices)[0]) == set(range(40, 40 + k))
    assert {2000, 701, 700, 3} <= set(np.asarray(indices)[1].tolist())
    for row in range(8):  # the indices point at the values returned
        np.testing.assert_array_equal(pre_NF[row, np.asarray(indices)[row]], np.asarray(values)[row])
    assert d_sae // GROUP >= 8 * k  # this case runs the two-pass search


def test_sparse_decode_and_its_gradients_equal_the_dense_product():
    n, d_in, d_sae, k = 48, 24, 256, 6
    keys = jax.random.split(jax.random.key(1), 3)
    _, indices_NK = jax.lax.top_k(jax.random.normal(keys[0], (n, d_sae)), k)
    acts_NK = jax.random.uniform(keys[1], (n, k))
    w_FD = jax.random.normal(keys[2], (d_sae, d_in))
    cotangent_ND = jax.random.normal(jax.random.key(9), (n, d_in))

    out, vjp = jax.vjp(lambda a, w: sparse_decode(a, indices_NK, w), acts_NK, w_FD)
    expected, expected_vjp = jax.vjp(lambda a, w: _dense_codes(a, indices_NK, d_sae) @ w, acts_NK, w_FD)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cotangent_ND), expected_vjp(cotangent_ND), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_encoder_columns_passes_values_and_gives_dense_gradients():
    n, d_in, d_sae, k = 40, 16, 128, 5
    keys = jax.random.split(jax.random.key(2), 3)
    x_ND = jax.random.normal(keys[0], (n, d_in))
    w_DF = jax.random.normal(keys[1], (d_in, d_sae))
    b_F = jax.random.normal(keys[2], (d_sae,))
    values_NK, indices_NK = jax.lax.top_k(x_ND @ w_DF + b_F, k)
    cotangent_NK = jax.random.normal(jax.random.key(3), (n, k))

    def ours(x, w, b):
        return encoder_columns(x, w, b, values_NK, indices_NK)

    def dense(x, w, b):
        return jnp.take_along_axis(x @ w + b, indices_NK, axis=1)

    out, vjp = jax.vjp(ours, x_ND, w_DF, b_F)
    expected, expected_vjp = jax.vjp(dense, x_ND, w_DF, b_F)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(values_NK))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cotangent_NK), expected_vjp(cotangent_NK), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _dense_topk_loss(sae, x_ND, dead_F, cfg):
    """The TopK loss written with dense [N, F] codes and autodiff (the formulation before sae.sparse)."""
    pre_NF = sae.pre_acts(x_ND)
    xn_ND = sae.normalize(x_ND)
    err_ND = xn_ND - (topk_codes(pre_NF, sae.config.k) @ sae.W_dec[...] + sae.b_dec[...])
    total_var = jnp.sum((xn_ND - xn_ND.mean(axis=0)) ** 2)
    k_aux = min(sae.config.d_in // 2, sae.config.d_sae)
    aux_hat_ND = topk_codes(jnp.where(dead_F, pre_NF, -jnp.inf), k_aux) @ sae.W_dec[...]
    scale = jnp.minimum(jnp.sum(dead_F) / k_aux, 1.0)
    auxk = jnp.where(
        jnp.any(dead_F), scale * jnp.sum((aux_hat_ND - jax.lax.stop_gradient(err_ND)) ** 2) / total_var, 0.0
    )
    return jnp.sum(err_ND**2) / total_var + cfg.auxk_alpha * auxk


@pytest.mark.parametrize("num_dead", [0, 5, 200, 512])  # none, fewer than k_aux = 32, many, all
def test_topk_loss_and_gradients_equal_dense_codes(num_dead):
    d_in, d_sae, k = 64, 512, 8
    rng = np.random.default_rng(0)
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=d_sae, k=k, normalize_activations="expected_average_only_in"), rngs=nnx.Rngs(0)
    )
    sae.norm_scale.set_value(jnp.float32(0.7))
    sae.b_dec.set_value(jnp.asarray(rng.normal(size=d_in) * 0.1, jnp.float32))
    sae.b_enc.set_value(jnp.asarray(rng.normal(size=d_sae) * 0.1, jnp.float32))
    x_ND = jnp.asarray(rng.normal(size=(128, d_in)), jnp.float32)
    dead_F = jnp.asarray(rng.permutation(d_sae) < num_dead)
    cfg = TrainConfig()
    graphdef, params, rest = nnx.split(sae, nnx.Param, ...)

    def ours(p):
        return sae_loss(nnx.merge(graphdef, p, rest), x_ND, dead_F, jnp.int32(0), cfg)[0]

    def dense(p):
        return _dense_topk_loss(nnx.merge(graphdef, p, rest), x_ND, dead_F, cfg)

    loss, grads = jax.value_and_grad(ours)(params)
    expected_loss, expected_grads = jax.value_and_grad(dense)(params)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    got, want = nnx.to_pure_dict(grads), nnx.to_pure_dict(expected_grads)
    assert got.keys() == want.keys()
    for name in want:
        scale = float(jnp.max(jnp.abs(want[name])))
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-5 * scale, err_msg=name)
    fired = np.asarray(sae_loss(sae, x_ND, dead_F, jnp.int32(0), cfg)[1].fired_F)
    np.testing.assert_array_equal(fired, np.asarray(jnp.any(topk_codes(sae.pre_acts(x_ND), k) > 0, axis=0)))


def test_training_state_keeps_the_encoder_transposed_and_gives_the_module_back():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=4), rngs=nnx.Rngs(3))
    first_ND = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    graphdef, state = init_state(sae, TrainConfig(total_steps=2, batch_size=32), first_ND)
    assert state["params"]["W_enc"].shape == (64, 16)
    back = trained_sae(graphdef, state)
    assert back.W_enc.shape == (16, 64)
    np.testing.assert_array_equal(np.asarray(back.W_enc[...]), np.asarray(sae.W_enc[...]))
