"""SAE quality: reconstruction (FVU / explained variance), sparsity (L0, dead latents), and the
next-token loss recovered when the reconstruction is spliced into the model at its layer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.model import SparseAutoencoder
from saerl_jax.model import Qwen2, causal_mask, positions_from_mask


def fvu(x_ND: np.ndarray, x_hat_ND: np.ndarray) -> float:
    """Fraction of variance unexplained: ``sum |x - x_hat|^2 / sum |x - mean(x)|^2``."""
    x_ND, x_hat_ND = np.asarray(x_ND, np.float64), np.asarray(x_hat_ND, np.float64)
    return float(np.sum((x_ND - x_hat_ND) ** 2) / np.sum((x_ND - x_ND.mean(axis=0)) ** 2))


def reconstruction_metrics(sae: SparseAutoencoder, acts_ND: np.ndarray, batch_size: int = 4096) -> dict[str, float]:
    """FVU, explained variance, mean L0 and the fraction of latents never active on ``acts_ND``."""
    x_hats, fired_F, active = [], np.zeros(sae.config.d_sae, bool), 0
    for start in range(0, acts_ND.shape[0], batch_size):
        out = sae(jnp.asarray(acts_ND[start : start + batch_size]))
        x_hats.append(np.asarray(out.x_hat))
        codes = np.asarray(out.codes) > 0
        fired_F |= codes.any(axis=0)
        active += int(codes.sum())
    value = fvu(acts_ND, np.concatenate(x_hats))
    return {
        "fvu": value,
        "explained_variance": 1.0 - value,
        "l0": active / acts_ND.shape[0],
        "dead_fraction": float(1.0 - fired_F.mean()),
    }


@functools.partial(jax.jit, static_argnames=("model_def", "sae_def", "layer"))
def _spliced_losses(model_def, model_state, sae_def, sae_state, ids_BT, mask_BT, splice_BT, layer: int):
    """Mean next-token loss with the layer-L residual clean, SAE-reconstructed, and zeroed."""
    model, sae = nnx.merge(model_def, model_state), nnx.merge(sae_def, sae_state)
    positions_BT = positions_from_mask(mask_BT)
    attn_BTS = causal_mask(mask_BT, jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape))
    x_BTD, _ = model.hidden_states(ids_BT, positions_BT, attn_BTS, num_layers=layer)
    targets_BT = (mask_BT[:, 1:] * mask_BT[:, :-1]).astype(jnp.float32)

    def next_token_loss(residual_BTD):
        h_BTD, _ = model.run_layers(residual_BTD, positions_BT, attn_BTS, start=layer)
        logp_BTV = jax.nn.log_softmax(model.logits(h_BTD[:, :-1]).astype(jnp.float32), axis=-1)
        nll_BT = -jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll_BT * targets_BT), jnp.sum(targets_BT)

    splice_BT1 = splice_BT[..., None].astype(bool)
    recon_BTD = jnp.where(splice_BT1, sae(x_BTD).x_hat.astype(x_BTD.dtype), x_BTD)
    zero_BTD = jnp.where(splice_BT1, 0.0, x_BTD)
    return next_token_loss(x_BTD), next_token_loss(recon_BTD), next_token_loss(zero_BTD)


def ce_loss_recovered(
    model: Qwen2,
    sae: SparseAutoencoder,
    layer: int,
    input_ids_BT: np.ndarray,
    attention_mask_BT: np.ndarray,
    splice_mask_BT: np.ndarray | None = None,
) -> dict[str, float]:
    """Next-token loss of the clean model, with the SAE reconstruction spliced in at ``layer``, and with
    the residual zeroed there; ``ce_loss_recovered = (zero - sae) / (zero - clean)`` (1 is perfect).

    ``splice_mask_BT`` picks the positions replaced (default: every real token); the SAE's training
    excluded special tokens, so pass the same mask here to measure it on what it was trained for.
    """
    if splice_mask_BT is None:
        splice_mask_BT = attention_mask_BT
    model_def, model_state = nnx.split(model)
    sae_def, sae_state = nnx.split(sae)
    (clean, n), (recon, _), (zero, _) = _spliced_losses(
        model_def,
        model_state,
        sae_def,
        sae_state,
        jnp.asarray(input_ids_BT, jnp.int32),
        jnp.asarray(attention_mask_BT, jnp.int32),
        jnp.asarray(splice_mask_BT, jnp.int32),
        layer,
    )
    clean, recon, zero = (float(v) / float(n) for v in (clean, recon, zero))
    return {
        "ce_loss_clean": clean,
        "ce_loss_sae": recon,
        "ce_loss_zero": zero,
        "ce_loss_recovered": (zero - recon) / (zero - clean) if zero != clean else float("nan"),
    }
