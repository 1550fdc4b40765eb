"""Exact top-k and the products of TopK training that touch only the k selected latents per sample.

A TopK SAE's step needs one dense product, the encoder's ``x W_enc``, to choose the latents; after that
each sample involves k of the F latents. Written densely (scatter the k codes into ``[N, F]`` and
multiply), the decode and the three backward products cost four more ``N x D x F`` matmuls. The
functions here keep the k slots instead: each product is a ``lax.scan`` over the k slots whose body
gathers or scatter-adds one ``[N, D]`` block of rows, so no ``[N, K, D]`` array is ever built (on
XLA:CPU a freshly written 64 MB intermediate costs more than the arithmetic). Their backward passes are
written by hand (``jax.custom_vjp``) so autodiff never falls back to dense ``[N, F]`` cotangents.

Shapes: N samples, D = ``d_in``, F = ``d_sae``, K selected latents per sample. Indices must be in
``[0, F)``; they come from :func:`top_k`, and the gathers and scatters assume it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GROUP = 8
"""Latents per group in :func:`top_k`'s first pass."""


def top_k(pre_NF: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest values of each row and their indices: ``(values_NK, indices_NK)``, as ``lax.top_k``.

    For wide rows the search runs in two passes: the maxima of groups of :data:`GROUP` latents, the k
    groups with the largest maxima, then the k largest of those ``k * GROUP`` candidates. Every group
    holding one of the row's k largest values has a maximum at least the k-th largest, and at most k
    groups do, so the k best groups hold all of them. Values (and, without ties, indices) equal
    ``lax.top_k``'s; among tied values the chosen indices may differ. XLA:CPU's top-k costs roughly in
    proportion to the row length, so this is about 1.3x faster at F = 4,096, k = 32.
    """
    n, f = pre_NF.shape
    if f % GROUP or f // GROUP < 8 * k:
        return jax.lax.top_k(pre_NF, k)
    groups_NGS = pre_NF.reshape(n, f // GROUP, GROUP)
    # An elementwise maximum of the GROUP strided slices: XLA:CPU fuses it with the producer of pre_NF (the
    # bias add), where a reduce over the last axis became a separate YNNPACK pass (about 10 ms more here).
    group_max_NG = functools.reduce(jnp.maximum, [groups_NGS[:, :, s] for s in range(GROUP)])
    _, group_NK = jax.lax.top_k(group_max_NG, k)
    candidates_NC = jnp.take_along_axis(groups_NGS, group_NK[:, :, None], axis=1).reshape(n, k * GROUP)
    values_NK, position_NK = jax.lax.top_k(candidates_NC, k)
    indices_NK = jnp.take_along_axis(group_NK, position_NK // GROUP, axis=1) * GROUP + position_NK % GROUP
    return values_NK, indices_NK


def _rows(table_FD: jax.Array, indices_N: jax.Array) -> jax.Array:
    return table_FD.at[indices_N].get(mode="promise_in_bounds")


def _slot_sum(weights_NK: jax.Array, indices_NK: jax.Array, table_FD: jax.Array) -> jax.Array:
    """``out[n] = sum_j weights[n, j] * table[indices[n, j]]``: ``[N, D]``."""

    def body(acc_ND, slot):
        weights_N, indices_N = slot
        return acc_ND + weights_N[:, None] * _rows(table_FD, indices_N), None

    init_ND = jnp.zeros((weights_NK.shape[0], table_FD.shape[1]), table_FD.dtype)
    return jax.lax.scan(body, init_ND, (weights_NK.T, indices_NK.T))[0]


def _slot_dots(rows_ND: jax.Array, indices_NK: jax.Array, table_FD: jax.Array) -> jax.Array:
    """``out[n, j] = rows[n] . table[indices[n, j]]``: ``[N, K]`` (a sampled dense-dense product)."""

    def body(carry, indices_N):
        return carry, jnp.sum(_rows(table_FD, indices_N) * rows_ND, axis=-1)

    return jax.lax.scan(body, None, indices_NK.T)[1].T


def _slot_scatter(weights_NK: jax.Array, indices_NK: jax.Array, rows_ND: jax.Array, num_rows: int) -> jax.Array:
    """``out[f] = sum over (n, j) with indices[n, j] == f of weights[n, j] * rows[n]``: ``[F, D]``."""

    def body(out_FD, slot):
        weights_N, indices_N = slot
        return out_FD.at[indices_N].add(weights_N[:, None] * rows_ND, mode="promise_in_bounds"), None

    init_FD = jnp.zeros((num_rows, rows_ND.shape[1]), rows_ND.dtype)
    return jax.lax.scan(body, init_FD, (weights_NK.T, indices_NK.T))[0]


@jax.custom_vjp
def sparse_decode(acts_NK: jax.Array, indices_NK: jax.Array, w_dec_FD: jax.Array) -> jax.Array:
    """``sum_j acts[n, j] * W_dec[indices[n, j]]``: the decode of k active latents, ``[N, D]`` (no bias).

    Equal to scattering ``acts`` into dense ``[N, F]`` codes and multiplying by ``W_dec``; the backward
    pass gives ``acts`` the dot products with the k selected rows and ``W_dec`` a scatter-add of k rows
    per sample.
    """
    return _slot_sum(acts_NK, indices_NK, w_dec_FD)


def _decode_fwd(acts_NK, indices_NK, w_dec_FD):
    return _slot_sum(acts_NK, indices_NK, w_dec_FD), (acts_NK, indices_NK, w_dec_FD)


def _decode_bwd(residuals, grad_ND):
    acts_NK, indices_NK, w_dec_FD = residuals
    grad_acts_NK = _slot_dots(grad_ND, indices_NK, w_dec_FD)
    grad_w_FD = _slot_scatter(acts_NK, indices_NK, grad_ND, w_dec_FD.shape[0])
    return grad_acts_NK, None, grad_w_FD


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def encoder_columns(
    x_ND: jax.Array, w_enc_DF: jax.Array, b_enc_F: jax.Array, values_NK: jax.Array, indices_NK: jax.Array
) -> jax.Array:
    """The selected encoder pre-activations ``(x W_enc + b_enc)[n, indices[n, j]]``: ``[N, K]``.

    ``values_NK`` must already be those entries (the top-k that chose ``indices`` returned them); they are
    passed through, and the gradient goes to ``x``, ``W_enc`` and ``b_enc`` as if the k columns had been
    computed here (never to ``values_NK``). ``W_enc`` gets a scatter-add of k rows per sample in the
    transposed ``[F, D]`` layout; ``x``'s gradient (k gathered rows each) is dead code in SAE training and
    removed by XLA there.
    """
    return values_NK


def _columns_fwd(x_ND, w_enc_DF, b_enc_F, values_NK, indices_NK):
    return values_NK, (x_ND, w_enc_DF, indices_NK)


def _columns_bwd(residuals, grad_NK):
    x_ND, w_enc_DF, indices_NK = residuals
    grad_x_ND = _slot_sum(grad_NK, indices_NK, w_enc_DF.T)
    grad_w_DF = _slot_scatter(grad_NK, indices_NK, x_ND, w_enc_DF.shape[1]).T
    grad_b_F = jnp.zeros(w_enc_DF.shape[1], grad_NK.dtype).at[indices_NK.reshape(-1)].add(grad_NK.reshape(-1))
    return grad_x_ND, grad_w_DF, grad_b_F, None, None


encoder_columns.defvjp(_columns_fwd, _columns_bwd)
