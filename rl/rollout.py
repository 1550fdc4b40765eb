"""Rollouts: G sampled completions per prompt from the KV-cache sampler, and per-token log-probs of given
completions computed chunk by chunk (never a full ``[B, T, V]`` float32 array).

Layout used throughout: a prompt is left-padded to P tokens, its completion follows in N slots, so the
sequence is ``[B, P + N]`` and the log-prob of completion token j comes from position ``P - 1 + j``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rl.config import GRPOConfig, RolloutEngine
from saerl_jax.model import GenerateOutput, Qwen2, SamplingConfig, causal_mask, generate_fn, positions_from_mask
from saerl_jax.model.engine import EngineConfig, generate_continuous
from saerl_jax.model.sampling import left_align
from saerl_jax.precision import cast_floating


class Rollout(NamedTuple):
    """A batch of B = prompts x G completions, rows of one prompt contiguous; host numpy arrays."""

    prompt_ids_BP: np.ndarray
    """Left-padded prompts, each repeated G times."""
    prompt_mask_BP: np.ndarray
    """1 on prompt tokens."""
    completion_ids_BN: np.ndarray
    """Sampled tokens; pad after the first EOS."""
    completion_mask_BN: np.ndarray
    """1 up to and including the first EOS."""
    sampler_logp_BN: np.ndarray
    """Log-probs the sampler drew the tokens with (temperature-scaled), 0 off the mask."""
    truncated_B: np.ndarray
    """True where the completion reached the budget without an EOS."""

    @property
    def lengths_B(self) -> np.ndarray:
        """Completion lengths in tokens (EOS included)."""
        return self.completion_mask_BN.sum(axis=1)

    def select(self, rows: np.ndarray) -> Rollout:
        """The rollout restricted to ``rows`` (indices or a boolean mask)."""
        return Rollout(*(field[rows] for field in self))


def row_keys(seed: int, step: int, sample_ids: Sequence[str], num_generations: int) -> jax.Array:
    """One sampling key per completion, from (seed, step, sample id, occurrence, generation index).

    A completion's tokens then depend on neither its batch neighbours nor the host it is sampled on, so a
    multi-host or resumed run draws exactly what a single uninterrupted run draws. A sample id listed
    twice (a batch that straddles an epoch boundary) gets fresh keys for its second occurrence, so the
    two groups differ; a first occurrence's keys are those of an id listed once.
    """
    base = jax.random.fold_in(jax.random.key(seed), step)
    ids = np.array([int(hashlib.sha1(s.encode()).hexdigest()[:7], 16) for s in sample_ids], np.uint32)
    per_sample = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(ids))
    seen: dict[str, int] = {}
    occurrence = np.zeros(len(sample_ids), np.uint32)
    for i, sample_id in enumerate(sample_ids):
        occurrence[i] = seen.get(sample_id, 0)
        seen[sample_id] = int(occurrence[i]) + 1
    repeats = np.flatnonzero(occurrence)
    if repeats.size:
        again = jax.vmap(jax.random.fold_in)(per_sample[repeats], jnp.asarray(occurrence[repeats]))
        per_sample = per_sample.at[repeats].set(again)
    per_row = jnp.repeat(per_sample, num_generations)
    return jax.vmap(jax.random.fold_in)(per_row, jnp.tile(jnp.arange(num_generations), len(sample_ids)))


def rollout_sampling(cfg: GRPOConfig) -> SamplingConfig:
    """How the rollouts of a run under ``cfg`` sample (the trainer's, and what ``saerl plan-memory``
    compiles)."""
    return SamplingConfig(
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        cache_dtype=cfg.cache_dtype,
        attention_chunk=cfg.attention_chunk,
    )


def rollout(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids_BP: np.ndarray,
    attention_mask_BP: np.ndarray,
    *,
    keys: jax.Array,
    num_generations: int,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    rows_per_call: int = 0,
    engine: RolloutEngine = "continuous",
    mesh: Mesh | None = None,
) -> Rollout:
    """Samples ``num_generations`` completions for each prompt of a host batch.

    Args:
      graphdef, params: the policy, as ``nnx.split`` parts.
      input_ids_BP, attention_mask_BP: prompts ``[b, P]``, padded on either side.
      keys: ``[b * G]`` sampling keys (see :func:`row_keys`).
      num_generations: G.
      sampling: temperature, top-p and the completion budget N.
      eos_ids: tokens that end a completion; pad_id is written after them.
      rows_per_call: completions decoded at once (see :func:`sample_rows`); 0 means all.
      engine: ``static`` or ``continuous`` (see :attr:`rl.config.GRPOConfig.rollout_engine`).
      mesh: the continuous engine splits its slots over this mesh (one process; see :func:`sample_rows`).

    Returns:
      :class:`Rollout` with ``b * G`` rows.
    """
    ids_BP, mask_BP = left_align(np.asarray(input_ids_BP), np.asarray(attention_mask_BP), input_ids_BP.shape[1])
    ids_BP = np.repeat(ids_BP, num_generations, axis=0)
    mask_BP = np.repeat(mask_BP, num_generations, axis=0)
    out = sample_rows(
        graphdef,
        params,
        ids_BP,
        mask_BP,
        keys,
        sampling=sampling,
        eos_ids=eos_ids,
        pad_id=pad_id,
        rows_per_call=rows_per_call,
        engine=engine,
        mesh=mesh,
    )
    ended_B = (np.isin(out.tokens_BN, np.asarray(eos_ids)) & (out.mask_BN == 1)).any(axis=1)
    return Rollout(ids_BP, mask_BP, out.tokens_BN, out.mask_BN, out.logprobs_BN, ~ended_B)


def sample_rows(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    ids_BP: np.ndarray,
    mask_BP: np.ndarray,
    keys_B: jax.Array,
    *,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    rows_per_call: int = 0,
    engine: RolloutEngine = "continuous",
    on_done: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> GenerateOutput:
    """One completion per row of left-aligned prompts, by either engine (the same tokens).

    ``static``: :func:`generate_chunks` of ``rows_per_call`` rows; ``continuous``:
    :func:`~saerl_jax.model.engine.generate_continuous` with ``rows_per_call`` slots (0: all rows either
    way). ``on_done`` is called with the number of rows finished as they finish. With a ``mesh`` the
    continuous engine splits its slots (and their KV cache) over the mesh's batch axes and decodes with the
    parameters as they are placed; the static sampler ignores it.

    Returns:
      ``[B, N]`` host arrays.
    """
    if engine == "continuous":
        slots = EngineConfig(slots=rows_per_call or len(ids_BP))
        out, _ = generate_continuous(
            graphdef,
            params,
            ids_BP,
            mask_BP,
            keys_B,
            sampling=sampling,
            eos_ids=eos_ids,
            pad_id=pad_id,
            engine=slots,
            on_done=on_done,
            mesh=mesh,
        )
        return out
    parts = []
    for part in generate_chunks(
        graphdef,
        params,
        ids_BP,
        mask_BP,
        keys_B,
        sampling=sampling,
        eos_ids=eos_ids,
        pad_id=pad_id,
        rows_per_call=rows_per_call,
    ):
        parts.append(part)
        if on_done is not None:
            on_done(len(part.tokens_BN))
    return GenerateOutput(*(np.concatenate(fields) for fields in zip(*parts, strict=True)))


def generate_chunks(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    ids_BP: np.ndarray,
    mask_BP: np.ndarray,
    keys_B: jax.Array,
    *,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    rows_per_call: int = 0,
) -> Iterator[GenerateOutput]:
    """:func:`generate_fn` over the rows of left-padded prompts, ``rows_per_call`` rows per call (0: all).

    Every call has the same shape ``[rows_per_call, P]`` (the last is filled up with copies of the final
    row, dropped from its output), so one compile serves them all; with one key per row the tokens do not
    depend on the chunking. Only one chunk's KV cache and activations are live at a time.

    Yields:
      Each chunk's :class:`GenerateOutput` as host numpy arrays, in row order.
    """
    b = ids_BP.shape[0]
    size = b if rows_per_call == 0 else min(rows_per_call, b)
    eos_E = jnp.asarray(np.asarray(eos_ids, np.int32))
    for start in range(0, b, size):
        rows = np.minimum(np.arange(start, start + size), b - 1)
        out = generate_fn(
            graphdef,
            params,
            jnp.asarray(ids_BP[rows]),
            jnp.asarray(mask_BP[rows]),
            keys_B[rows],
            eos_E,
            jnp.int32(pad_id),
            sampling,
        )
        kept = min(size, b - start)
        yield GenerateOutput(*(np.asarray(a)[:kept] for a in out))


def head_weight_DV(model: Qwen2) -> jax.Array:
    """The LM head as a ``[D, V]`` matrix (the tied embedding transposed when the model ties them)."""
    if model.lm_head is None:
        return model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def _chunk_logprobs(args, w_DV: jax.Array, temperature: float):
    """Log-prob of the given tokens and the entropy, for one chunk of positions."""
    x_BCD, ids_BC = args
    b, c, d = x_BCD.shape  # one 2-D matmul: its weight gradient is much faster on XLA:CPU than a 3-D one
    logits_BCV = jnp.dot(x_BCD.reshape(b * c, d), w_DV, preferred_element_type=jnp.float32).reshape(b, c, -1)
    logits_BCV = logits_BCV / temperature
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    picked_BC = jnp.take_along_axis(logits_BCV, ids_BC[..., None], axis=-1)[..., 0]
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    entropy_BC = lse_BC - jnp.sum(probs_BCV * logits_BCV, axis=-1)
    return picked_BC - lse_BC, entropy_BC


def completion_hidden(
    model: Qwen2,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    completion_ids_BN: jax.Array,
    completion_mask_BN: jax.Array,
    *,
    remat: bool = False,
    attention_chunk: int = 0,
) -> jax.Array:
    """The final-norm hidden states that predict each completion token: one forward over ``[B, P + N]``,
    positions ``P - 1 .. P + N - 2``, ``[B, N, D]`` in the model's dtype (the LM head's input, and a value
    head's). ``remat`` recomputes each decoder block in the backward pass instead of keeping its
    activations; ``attention_chunk`` > 0 attends that many queries at a time (bounded scores, same values)."""
    b, p = prompt_ids_BP.shape
    n = completion_ids_BN.shape[1]
    ids_BT = jnp.concatenate([prompt_ids_BP, completion_ids_BN], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP, completion_mask_BN], axis=1).astype(jnp.int32)
    slots_BT = jnp.broadcast_to(jnp.arange(p + n), (b, p + n))
    x_BTD, _ = model.hidden_states(
        ids_BT,
        positions_from_mask(mask_BT),
        causal_mask(mask_BT, slots_BT),
        remat=remat,
        attention_chunk=attention_chunk,
    )
    return model.norm(x_BTD[:, p - 1 : p + n - 1])


def hidden_logprobs(
    model: Qwen2, x_BND: jax.Array, completion_ids_BN: jax.Array, *, temperature: float, chunk: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies ``[B, N]`` (float32) of the tokens from :func:`completion_hidden`'s states: the
    LM head and log-softmax over ``chunk`` positions at a time under ``jax.checkpoint``, so the largest
    float32 logits held, forward or backward, are ``[B, chunk, V]``."""
    b, n = completion_ids_BN.shape
    chunk = min(chunk, n)
    padded = -(-n // chunk) * chunk
    x_BND = jnp.pad(x_BND, ((0, 0), (0, padded - n), (0, 0)))
    ids_BN = jnp.pad(completion_ids_BN, ((0, 0), (0, padded - n)))
    x_KBCD = x_BND.reshape(b, -1, chunk, x_BND.shape[-1]).swapaxes(0, 1)
    ids_KBC = ids_BN.reshape(b, -1, chunk).swapaxes(0, 1)
    step = jax.checkpoint(functools.partial(_chunk_logprobs, w_DV=head_weight_DV(model), temperature=temperature))
    logp_KBC, entropy_KBC = jax.lax.map(step, (x_KBCD, ids_KBC))
    return (
        logp_KBC.swapaxes(0, 1).reshape(b, padded)[:, :n],
        entropy_KBC.swapaxes(0, 1).reshape(b, padded)[:, :n],
    )


def completion_logprobs(
    model: Qwen2,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    completion_ids_BN: jax.Array,
    completion_mask_BN: jax.Array,
    *,
    temperature: float,
    chunk: int = 64,
    remat: bool = False,
    attention_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies of completions under ``model`` at ``temperature``:
    :func:`completion_hidden` then :func:`hidden_logprobs`.

    Returns:
      ``(logp_BN, entropy_BN)``; values off the completion mask are meaningless (mask them).
    """
    x_BND = completion_hidden(
        model,
        prompt_ids_BP,
        prompt_mask_BP,
        completion_ids_BN,
        completion_mask_BN,
        remat=remat,
        attention_chunk=attention_chunk,
    )
    return hidden_logprobs(model, x_BND, completion_ids_BN, temperature=temperature, chunk=chunk)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "temperature", "chunk", "compute_dtype", "micro_batches", "attention_chunk")
)
def logprobs_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    completion_ids_BN: jax.Array,
    completion_mask_BN: jax.Array,
    temperature: float,
    chunk: int = 64,
    compute_dtype: str | None = None,
    micro_batches: int = 1,
    attention_chunk: int = 0,
) -> jax.Array:
    """:func:`completion_logprobs` (log-probs only) as a jitted function of the model state: the old
    policy's log-probs before a multi-iteration update, or the frozen reference's. The forward runs with
    ``params`` cast to ``compute_dtype`` (None: as they are); the log-probs are float32.

    The rows go through in ``micro_batches`` passes, row r in pass ``r % micro_batches`` (the split of
    the update in :mod:`rl.step`, so a row-sharded batch splits without moving data): one pass's
    activations are live at a time. Each row's values do not depend on the split.
    """
    model = nnx.merge(graphdef, params if compute_dtype is None else cast_floating(params, compute_dtype))

    def one(rows):
        logp_BN, _ = completion_logprobs(
            model, *rows, temperature=temperature, chunk=chunk, attention_chunk=attention_chunk
        )
        return logp_BN

    return map_micro_batches(one, (prompt_ids_BP, prompt_mask_BP, completion_ids_BN, completion_mask_BN), micro_batches)


def map_micro_batches(fn: Callable, rows: tuple[jax.Array, ...], micro_batches: int) -> jax.Array:
    """``fn(rows) -> [B, N]`` run in ``micro_batches`` sequential passes, row r in pass ``r % micro_batches``
    (the update's split, so a row-sharded batch splits without moving data), the outputs put back in row
    order. One pass's activations are live at a time."""
    if micro_batches == 1:
        return fn(rows)
    split = jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), rows)
    out_ABN = jax.lax.map(fn, split)
    return out_ABN.swapaxes(0, 1).reshape(-1, out_ABN.shape[-1])
