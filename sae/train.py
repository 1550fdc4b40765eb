"""SAE training with optax: one jitted pure step, a thin resumable loop with Orbax checkpoints.

Losses are on the scale of the fraction of variance unexplained (FVU) of the normalised input:
- topk / batchtopk: FVU + ``auxk_alpha`` * AuxK, the residual reconstructed by the top ``d_in // 2``
  dead latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders");
- relu: FVU + ``l1_coefficient`` (linear warm-up) * sum_f |code_f| * ||W_dec[f]||;
- jumprelu: FVU + ``l0_coefficient`` * L0, with straight-through threshold gradients through a
  rectangle kernel of width ``jumprelu_bandwidth`` (Rajamanoharan et al. 2024, "Jumping Ahead").
Decoder rows are renormalised to unit length after every update.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from sae.model import SparseAutoencoder, batch_topk_codes, topk_codes
from sae.sparse import encoder_columns, sparse_decode, top_k
from saerl_jax.precision import DType, Precision, cast_floating, check_dtype, resolve_compute_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How an SAE is trained."""

    total_steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 4096
    """Activations per step."""
    lr: float | None = None
    """Peak learning rate; None uses 2e-4 / sqrt(d_sae / 2**14) (sparsify's scaling)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr``."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the rate decays linearly to 0."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (topk / batchtopk)."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many activations is dead (AuxK and metrics)."""
    l1_coefficient: float = 1.0
    """Sparsity weight of the relu architecture."""
    l1_warmup_steps: int = 100
    """Linear warm-up of the L1 weight."""
    l0_coefficient: float = 0.01
    """Sparsity weight of the jumprelu architecture."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the JumpReLU pseudo-gradient."""
    jumprelu_init_threshold: float = 0.05
    """Initial JumpReLU threshold."""
    threshold_momentum: float = 0.99
    """EMA momentum of the BatchTopK inference threshold."""
    seed: int = 0
    """Seeds initialisation and data order."""
    checkpoint_every: int = 500
    """Steps between Orbax checkpoints (and at the end)."""
    param_dtype: DType = "float32"
    """Master weights and optimizer state of the training state."""
    compute_dtype: DType | None = None
    """Encoder and decoder matmuls (the parameters are cast to it inside the step; the loss stays float32);
    None: bfloat16 on accelerators, float32 on CPU."""

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.batch_size < 1:
            raise ValueError("total_steps and batch_size must be >= 1")
        check_dtype("param_dtype", self.param_dtype, optional=False)
        check_dtype("compute_dtype", self.compute_dtype)
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


def learning_rate(cfg: TrainConfig, d_sae: int) -> optax.Schedule:
    """Warm-up, constant, then linear decay to zero."""
    peak = cfg.lr if cfg.lr is not None else 2e-4 / (d_sae / 2**14) ** 0.5
    decay_steps = max(1, int(cfg.total_steps * cfg.decay_fraction))
    flat_steps = max(0, cfg.total_steps - cfg.warmup_steps - decay_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(1, cfg.warmup_steps)),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, 0.0, decay_steps),
        ],
        [max(1, cfg.warmup_steps), max(1, cfg.warmup_steps) + flat_steps],
    )


def make_optimizer(cfg: TrainConfig, d_sae: int) -> optax.GradientTransformation:
    return optax.adam(learning_rate(cfg, d_sae))


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu_ste(pre, threshold, bandwidth):
    """``pre * (pre > threshold)`` with the straight-through threshold gradient."""
    return jnp.where(pre > threshold, pre, 0.0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu_ste(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    pre, threshold, bandwidth = res
    d_threshold = -(threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return (pre > threshold) * g, d_threshold.sum(axis=tuple(range(pre.ndim - 1))), None


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step_ste(pre, threshold, bandwidth):
    """Heaviside ``pre > threshold`` with the straight-through threshold gradient (for L0)."""
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step_ste(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _step_bwd(res, g):
    pre, threshold, bandwidth = res
    d_threshold = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), d_threshold.sum(axis=tuple(range(pre.ndim - 1))), None


step_ste.defvjp(_step_fwd, _step_bwd)


class LossAux(NamedTuple):
    """What :func:`sae_loss` returns beside the loss."""

    metrics: dict[str, jax.Array]
    """Scalars: ``fvu``, ``l0``, ``loss`` and the architecture's penalty (``auxk``, ``l1``)."""
    fired_F: jax.Array
    """Whether each latent was active on any sample of the batch ``[F]``."""
    min_active: jax.Array
    """The smallest positive code of the batch (BatchTopK's threshold estimate; inf for the others)."""


def sae_loss(sae: SparseAutoencoder, x_ND: jax.Array, dead_F: jax.Array, step: jax.Array, cfg: TrainConfig):
    """Training loss of one batch of raw activations; returns ``(loss, LossAux)``.

    TopK keeps its k slots per sample (:mod:`sae.sparse`): after the encoder product nothing is ``[N, F]``
    except the top-k search, and the backward pass touches only the selected latents. The other
    architectures use dense ``[N, F]`` codes.
    """
    if sae.config.architecture == "topk":
        return _topk_loss(sae, x_ND, dead_F, cfg)
    arch, k = sae.config.architecture, sae.config.k
    pre_NF = sae.pre_acts(x_ND)
    x_ND = sae.normalize(x_ND)
    if arch == "batchtopk":
        codes_NF = batch_topk_codes(pre_NF, k)
    elif arch == "relu":
        codes_NF = jax.nn.relu(pre_NF)
    else:
        codes_NF = jumprelu_ste(pre_NF, sae.threshold[...], cfg.jumprelu_bandwidth)
    err_ND = x_ND - (codes_NF @ sae.W_dec[...] + sae.b_dec[...])
    total_var = jnp.sum((x_ND - x_ND.mean(axis=0)) ** 2)
    fvu = jnp.sum(err_ND**2) / total_var
    metrics = {"fvu": fvu, "l0": jnp.mean(jnp.sum(codes_NF > 0, axis=-1))}
    loss = fvu
    if arch == "batchtopk":
        k_aux = min(sae.config.d_in // 2, sae.config.d_sae)

        def auxk_loss(pre_NF, w_dec_FD):
            aux_hat_ND = topk_codes(jnp.where(dead_F, pre_NF, -jnp.inf), k_aux) @ w_dec_FD
            return _auxk(aux_hat_ND, err_ND, dead_F, k_aux, total_var)

        metrics["auxk"] = jax.lax.cond(
            jnp.any(dead_F), auxk_loss, lambda *_: jnp.zeros((), fvu.dtype), pre_NF, sae.W_dec[...]
        )
        loss = loss + cfg.auxk_alpha * metrics["auxk"]
    elif arch == "relu":
        coef = cfg.l1_coefficient * jnp.minimum(1.0, (step + 1) / max(1, cfg.l1_warmup_steps))
        l1 = jnp.mean(jnp.sum(codes_NF * jnp.linalg.norm(sae.W_dec[...], axis=-1), axis=-1))
        metrics["l1"] = l1
        loss = loss + coef * l1
    else:
        l0 = jnp.mean(jnp.sum(step_ste(pre_NF, sae.threshold[...], cfg.jumprelu_bandwidth), axis=-1))
        loss = loss + cfg.l0_coefficient * l0
    metrics["loss"] = loss
    active_NF = codes_NF > 0
    min_active = jnp.min(jnp.where(active_NF, codes_NF, jnp.inf)) if arch == "batchtopk" else jnp.float32(jnp.inf)
    return loss, LossAux(metrics, jnp.any(active_NF, axis=0), min_active)


def _auxk(aux_hat_ND, err_ND, dead_F: jax.Array, k_aux: int, total_var) -> jax.Array:
    """AuxK: the dead latents' reconstruction of the main error, scaled by ``min(dead / k_aux, 1)``."""
    scale = jnp.minimum(jnp.sum(dead_F) / k_aux, 1.0)
    return scale * jnp.sum((aux_hat_ND - jax.lax.stop_gradient(err_ND)) ** 2) / total_var


def _topk_loss(sae: SparseAutoencoder, x_ND: jax.Array, dead_F: jax.Array, cfg: TrainConfig):
    """:func:`sae_loss` for TopK over the k selected latents per sample (AuxK over the top dead ones)."""
    xn_ND = sae.normalize(x_ND.astype(sae.W_enc.dtype))
    w_enc_DF, w_dec_FD, b_F = sae.W_enc[...], sae.W_dec[...], sae.encoder_bias()
    # No gradient through these: it reaches W_enc and b_enc via encoder_columns.
    product_NF = jax.lax.stop_gradient(xn_ND @ w_enc_DF)
    pre_NF = product_NF + jax.lax.stop_gradient(b_F)

    def selected(pre_for_search_NF, k):
        values_NK, indices_NK = top_k(pre_for_search_NF, k)
        return encoder_columns(xn_ND, w_enc_DF, b_F, values_NK, indices_NK), indices_NK

    pre_NK, indices_NK = selected(pre_NF, sae.config.k)
    acts_NK = jax.nn.relu(pre_NK)
    x_hat_ND = sparse_decode(acts_NK, indices_NK, w_dec_FD) + sae.b_dec[...]
    err_ND = xn_ND.astype(jnp.float32) - x_hat_ND.astype(jnp.float32)  # the loss in float32 whatever the compute
    total_var = jnp.sum((xn_ND.astype(jnp.float32) - xn_ND.astype(jnp.float32).mean(axis=0)) ** 2)
    fvu = jnp.sum(err_ND**2) / total_var
    k_aux = min(sae.config.d_in // 2, sae.config.d_sae)

    def auxk_loss():
        # Fewer dead latents than k_aux: the other slots hold -inf, so ReLU makes them 0.
        # From the product and the bias, not pre_NF: a branch operand is written out even on the steps
        # that skip it, and pre_NF otherwise is never a full [N, F] array (its consumers fuse the add).
        aux_pre_NF = jnp.where(dead_F, product_NF + jax.lax.stop_gradient(b_F), -jnp.inf)
        aux_pre_NK, aux_indices_NK = selected(aux_pre_NF, k_aux)
        aux_acts_NK = jax.nn.relu(aux_pre_NK)
        aux_hat_ND = sparse_decode(aux_acts_NK, aux_indices_NK, w_dec_FD)
        return _auxk(aux_hat_ND, err_ND, dead_F, k_aux, total_var)

    # Skipped (exactly 0) while no latent is dead: a top-k and a decode saved on most steps.
    auxk = jax.lax.cond(jnp.any(dead_F), auxk_loss, lambda: jnp.zeros((), fvu.dtype))
    loss = fvu + cfg.auxk_alpha * auxk
    active_NK = acts_NK > 0
    metrics = {"fvu": fvu, "l0": jnp.mean(jnp.sum(active_NK, axis=-1)), "auxk": auxk, "loss": loss}
    fired_F = jnp.zeros(sae.config.d_sae, jnp.int32).at[indices_NK.reshape(-1)].add(active_NK.reshape(-1)) > 0
    return loss, LossAux(metrics, fired_F, jnp.float32(jnp.inf))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("state",))
def train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, state: dict[str, Any], x_ND: jax.Array):
    """One optimizer step: ``(state, batch) -> (state, metrics)``, a pure function jitted once."""
    tx = make_optimizer(cfg, state["params"]["b_enc"].shape[0])
    dead_F = state["since_fired"] > cfg.dead_after_tokens

    def loss_fn(params):  # the cast to the compute dtype is differentiated through: gradients in param_dtype
        params = cast_floating(_transpose_encoder(params), resolve_compute_dtype(cfg.compute_dtype))
        return sae_loss(nnx.merge(graphdef, params, state["rest"]), x_ND, dead_F, state["step"], cfg)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    metrics = aux.metrics
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    values = nnx.to_pure_dict(params)
    values["W_dec"] = values["W_dec"] / _row_norms(values["W_dec"])[:, None]
    if "threshold" in values:
        values["threshold"] = jnp.maximum(values["threshold"], 0.0)
    nnx.replace_by_pure_dict(params, values)
    rest = state["rest"]
    if "threshold" in rest:  # BatchTopK: EMA of the smallest kept activation, the inference threshold.
        old = rest["threshold"][...]
        mixed = cfg.threshold_momentum * old + (1 - cfg.threshold_momentum) * aux.min_active
        new = jnp.where(state["step"] == 0, aux.min_active, mixed).astype(old.dtype)
        nnx.replace_by_pure_dict(rest, nnx.to_pure_dict(rest) | {"threshold": new})
    since_fired = jnp.where(aux.fired_F, 0, state["since_fired"] + x_ND.shape[0])
    metrics["dead_fraction"] = jnp.mean(since_fired > cfg.dead_after_tokens)
    new_state = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1, "since_fired": since_fired}
    return new_state, metrics


STATE_LAYOUT = "W_enc [F, D]"
"""How :func:`init_state` lays out the parameters; checkpoints record it and resuming checks it."""


def _row_norms(w_FD: jax.Array) -> jax.Array:
    """Euclidean norms of the rows ``[F]``, as a matrix-vector product.

    ``jnp.linalg.norm(w, axis=-1)`` here became an XLA:CPU YNNPACK reduction that took the whole Adam
    update of ``W_dec`` into its fusion and wrote its broadcast operands out as ``[F, D]`` arrays.
    """
    return jnp.sqrt((w_FD * w_FD) @ jnp.ones((w_FD.shape[1],), w_FD.dtype))


def _transpose_encoder(params: nnx.State) -> nnx.State:
    """``params`` with ``W_enc`` transposed (its own inverse): the training layout <-> the module's.

    The training state keeps ``W_enc`` as ``[F, D]``, like ``W_dec``. TopK's encoder gradient is a
    scatter-add of rows in that layout (:func:`sae.sparse.encoder_columns`); handed to Adam as ``[D, F]``,
    XLA:CPU read it transposed in each moment update, about 8 ms more per step at F = 4,096.
    """
    values = nnx.to_pure_dict(params)
    values["W_enc"] = values["W_enc"].T
    out = jax.tree.map(lambda leaf: leaf, params)
    nnx.replace_by_pure_dict(out, values)
    return out


def trained_sae(graphdef: nnx.GraphDef, state: dict[str, Any]) -> SparseAutoencoder:
    """The SAE held by a training state (``W_enc`` back in the module's ``[D, F]`` layout)."""
    return nnx.merge(graphdef, _transpose_encoder(state["params"]), state["rest"])


def init_state(sae: SparseAutoencoder, cfg: TrainConfig, first_batch_ND: np.ndarray):
    """Training state: b_dec at the first batch's mean, the input scale estimated from it, Adam at zero.

    ``state["params"]`` holds ``W_enc`` transposed (see :func:`trained_sae`).
    """
    if sae.config.normalize_activations == "expected_average_only_in":
        mean_sq = float(np.mean(np.sum(first_batch_ND.astype(np.float64) ** 2, axis=-1)))
        sae.norm_scale.set_value(jnp.asarray((sae.config.d_in / mean_sq) ** 0.5, jnp.float32))
    sae.b_dec.set_value(sae.normalize(jnp.asarray(first_batch_ND.mean(axis=0))).astype(sae.b_dec.dtype))
    if sae.config.architecture == "jumprelu":
        sae.threshold.set_value(jnp.full_like(sae.threshold[...], cfg.jumprelu_init_threshold))
    graphdef, params, rest = nnx.split(sae, nnx.Param, ...)
    params = cast_floating(params, cfg.param_dtype)
    params, rest = jax.tree.map(jnp.copy, (_transpose_encoder(params), rest))  # the step donates its state
    state = {
        "params": params,
        "rest": rest,
        "opt": make_optimizer(cfg, sae.config.d_sae).init(params),
        "step": jnp.int32(0),
        "since_fired": jnp.zeros((sae.config.d_sae,), jnp.int32),
    }
    return graphdef, state


def train(
    sae: SparseAutoencoder,
    source,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Trains ``sae`` on batches of ``source`` (see :mod:`sae.activations`) for ``cfg.total_steps``.

    With ``checkpoint_dir``, an Orbax checkpoint (state + data position) is written every
    ``cfg.checkpoint_every`` steps and at the end, and an existing one is resumed exactly.
    ``stop_after`` ends the run early after that many steps in total (for interrupt tests).

    Returns:
      The trained SAE and the metrics of every step (host floats, read one step late).
    """
    print(Precision(params=cfg.param_dtype, compute=resolve_compute_dtype(cfg.compute_dtype)).describe(), flush=True)
    manager = _checkpoint_manager(checkpoint_dir, cfg)
    position = [0, 0]
    batches = source.iterate(position)
    first, position = next(batches)
    graphdef, state = init_state(sae, cfg, first)
    if manager is not None and manager.latest_step() is not None:
        step = manager.latest_step()
        data = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        if data.get("state_layout") != STATE_LAYOUT:
            raise ValueError(
                f"SAE checkpoint {manager.directory / str(step)} holds a training state of layout "
                f"{data.get('state_layout', 'W_enc [D, F] (before 2026-11-30)')}, this version needs "
                f"{STATE_LAYOUT}; start again in an empty checkpoint directory"
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
            ),
        )
        state, position = restored["state"], data["position"]
        batches = source.iterate(position)
    else:
        batches = _chain_first(first, position, batches)
    end = cfg.total_steps if stop_after is None else min(stop_after, cfg.total_steps)
    history: list[dict[str, float]] = []
    pending = None
    start_step = int(state["step"])
    bar = tqdm(total=end, initial=start_step, disable=not progress, desc="train-sae", unit="step")
    started = time.perf_counter()
    for step in range(start_step, end):
        x_ND, position = next(batches)
        state, metrics = train_step(graphdef, cfg, state, jnp.asarray(x_ND))
        if pending is not None:  # read the previous step's metrics: dispatch stays asynchronous
            history.append(_record(pending, bar, started, step - start_step, cfg.batch_size))
        pending = metrics
        if manager is not None and (step + 1) % cfg.checkpoint_every == 0:
            history.append(_record(pending, bar, started, step + 1 - start_step, cfg.batch_size))
            pending = None  # checked finite before it is saved: a NaN state never reaches a checkpoint
            _save(manager, step + 1, state, position)
    if pending is not None:
        history.append(_record(pending, bar, started, end - start_step, cfg.batch_size))
    bar.close()
    if manager is not None and int(state["step"]) not in (manager.all_steps() or []):
        _save(manager, int(state["step"]), state, position)
    if manager is not None:
        manager.wait_until_finished()
    return trained_sae(graphdef, state), history


def _chain_first(first, position_after_first, rest):
    yield first, position_after_first
    yield from rest


def _record(metrics, bar, started, steps_done, batch_size) -> dict[str, float]:
    row = {name: float(value) for name, value in metrics.items()}
    if not np.isfinite(row["loss"]):
        raise FloatingPointError(f"SAE loss became {row['loss']} (lower the learning rate?)")
    rate = steps_done * batch_size / max(time.perf_counter() - started, 1e-9)
    bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", act_per_s=f"{rate:,.0f}")
    bar.update(1)
    return row


def _checkpoint_manager(directory, cfg: TrainConfig) -> ocp.CheckpointManager | None:
    if directory is None:
        return None
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _save(manager: ocp.CheckpointManager, step: int, state, position) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"position": list(position), "state_layout": STATE_LAYOUT}),
        ),
    )
