"""Continuous batching: S key/value-cache slots decode together, and a slot whose completion ends is refilled
from a queue of work items instead of idling until the longest row of a static batch stops.

Work items are the rows of a left-padded prompt batch ``[W, P]`` with one sampling key each. A slot's cache
has the static sampler's layout (prompt in slots ``0 .. P``, completion token j at ``P + j``), its decode
step samples token j with ``fold_in(key, j)`` from the logits of the token before, at position
``prompt length + j``: exactly what :func:`~saerl_jax.model.sampling.generate_fn` computes for that row,
so a completion does not depend on its slot, its neighbours or when it was admitted.

Policy (host side). The jitted decode loop runs ``sync_steps`` steps (fewer when every slot has ended),
then the host collects ended slots and, when at least ``min_free`` slots are free (or the queue fits in
the free slots, or nothing is live), admits the next queued items in one batched prefill. Rows of the same
prompt (the G completions of a GRPO group, or the k samples of Avg@k) share one prefill: the prompt is run
once and its cache copied into each of their slots. Prefill batches are padded to a power of two, so a
call compiles at most ``log2(S) + 1`` prefill shapes, one admission and one decode loop.

Under a device mesh (``mesh=``) the slots are split over the mesh's batch axes (``data`` and ``fsdp``)
and their cache's key/value heads over ``tensor``, while the parameters keep whatever sharding they have
(e.g. the trainer's fsdp / tensor layout): nothing is gathered onto one device, and XLA places the decode
step's work from those shardings.

Shapes: S slots, P prompt tokens, N completion budget, L = P + N cache slots, R prefilled prompts, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saerl_jax.model.qwen2 import LayerCache, causal_mask, positions_from_mask
from saerl_jax.model.sampling import GenerateOutput, SamplingConfig, sample_token


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How many slots decode at once and when they are refilled."""

    slots: int = 64
    """Cache slots S (rows decoded together); their cache is ``S x (P + N)`` positions per layer."""
    sync_steps: int = 8
    """Decode steps between two host visits (collect ended slots, admit queued items)."""
    min_free: int = 0
    """Free slots needed before an admission (fewer prefill calls, more idle slot-steps); 0 means
    ``max(1, slots // 8)``. Ignored when the queue fits in the free slots or nothing is live."""

    def __post_init__(self) -> None:
        if self.slots < 1 or self.sync_steps < 1 or not 0 <= self.min_free <= self.slots:
            raise ValueError(f"need slots >= 1, sync_steps >= 1 and 0 <= min_free <= slots, got {self}")

    @property
    def admit_at(self) -> int:
        """Free slots that trigger an admission."""
        return self.min_free or max(1, self.slots // 8)


@dataclasses.dataclass
class EngineStats:
    """What one :func:`generate_continuous` call did."""

    slots: int = 1
    """Slots decoding together."""
    items: int = 0
    """Completions generated (work items)."""
    prefilled: int = 0
    """Prompts prefilled (items minus the prefills saved by shared prompts)."""
    admissions: int = 0
    """Batched prefill calls."""
    decode_steps: int = 0
    """Decode steps run (each advances all S slots)."""
    live_slot_steps: int = 0
    """Slot-steps that produced a completion token (the rest were idle slots)."""
    prefill_shapes: set = dataclasses.field(default_factory=set)
    """Distinct prefill batch sizes (each one compile)."""

    @property
    def utilisation(self) -> float:
        """Share of slot-steps that produced a token."""
        return self.live_slot_steps / max(1, self.decode_steps * self.slots)


class Slots(NamedTuple):
    """Device state of the S slots (a pytree carried through the jitted loops)."""

    cache: tuple[LayerCache, ...]
    """Per layer ``[S, K, L, H]``."""
    logits_SV: jax.Array
    """Logits of each slot's next token."""
    keys_S: jax.Array
    """The sampling key of each slot's work item."""
    prompt_mask_SP: jax.Array
    """1 on the prompt tokens of each slot."""
    step_S: jax.Array
    """Completion tokens sampled so far."""
    live_S: jax.Array
    """True while the slot's completion is running."""
    tokens_SN: jax.Array
    logprobs_SN: jax.Array
    mask_SN: jax.Array


class _Graph:
    """A GraphDef and the tree structure of its state, as a static ``jax.jit`` argument hashed by the
    graph's identity; the state then travels as its flat list of arrays.

    Both save host time on every call of the engine's programs, which on a GPU is more than a decode
    round's compute: jit hashes its static arguments on every call, and a GraphDef's own hash walks the
    whole graph (1.7 ms a call for the tiny-math model); flattening an ``nnx.State`` runs Python per
    variable (about 1 ms), a list of arrays does not. jit's cache holds the first wrapper, so the graph it
    names stays alive and its id cannot be reused by another graph while the entry exists.
    """

    __slots__ = ("graphdef", "treedef")

    def __init__(self, graphdef: nnx.GraphDef, treedef):
        self.graphdef, self.treedef = graphdef, treedef

    def __hash__(self) -> int:
        return hash((id(self.graphdef), self.treedef))

    def __eq__(self, other) -> bool:
        return isinstance(other, _Graph) and other.graphdef is self.graphdef and other.treedef == self.treedef


def _merge(graphdef: nnx.GraphDef | _Graph, state):
    """The model of ``graphdef`` with ``state`` (an ``nnx.State``, or with a :class:`_Graph` its leaves)."""
    if isinstance(graphdef, _Graph):
        return nnx.merge(graphdef.graphdef, jax.tree.unflatten(graphdef.treedef, state))
    return nnx.merge(graphdef, state)


def _prefill_cache(model, ids_RP: jax.Array, mask_RP: jax.Array, cfg: SamplingConfig):
    r, p = ids_RP.shape
    key_mask_RL = jnp.concatenate([mask_RP, jnp.ones((r, cfg.max_new_tokens), mask_RP.dtype)], axis=1)
    x_RPD, cache = model.hidden_states(
        ids_RP,
        positions_from_mask(mask_RP),
        causal_mask(key_mask_RL, jnp.broadcast_to(jnp.arange(p), (r, p))),
        cache=model.init_cache(r, p + cfg.max_new_tokens, cfg.cache_dtype),
        attention_chunk=cfg.attention_chunk,
    )
    return cache, model.logits(x_RPD[:, -1])


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "cfg", "mesh"))
def init_slots(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    keys_S: jax.Array,
    prompt_len: int,
    cfg: SamplingConfig,
    mesh: Mesh | None = None,
) -> Slots:
    """Empty slots (none live) for prompts of ``prompt_len`` tokens, laid out by :func:`slot_shardings`
    over ``mesh`` when one is given; ``keys_S`` only sets their number and key type."""
    model = _merge(graphdef, state)
    slots, n = keys_S.shape[0], cfg.max_new_tokens
    empty = Slots(
        cache=model.init_cache(slots, prompt_len + n, cfg.cache_dtype),
        logits_SV=jnp.zeros((slots, model.config.vocab_size), model.dtype),
        keys_S=keys_S,
        prompt_mask_SP=jnp.zeros((slots, prompt_len), jnp.int32),
        step_S=jnp.zeros((slots,), jnp.int32),
        live_S=jnp.zeros((slots,), bool),
        tokens_SN=jnp.zeros((slots, n), jnp.int32),
        logprobs_SN=jnp.zeros((slots, n), jnp.float32),
        mask_SN=jnp.zeros((slots, n), bool),
    )
    return empty if mesh is None else jax.lax.with_sharding_constraint(empty, slot_shardings(empty, mesh))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("slots",))
def admit_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    slots: Slots,
    ids_RP: jax.Array,
    mask_RP: jax.Array,
    source_S: jax.Array,
    keys_S: jax.Array,
    pad_id: jax.Array,
    cfg: SamplingConfig,
) -> Slots:
    """Prefills the R prompts once and starts slot s on prompt ``source_S[s]`` with key ``keys_S[s]`` (typed
    keys, or their raw ``jax.random.key_data``); slots with ``source_S[s] < 0`` keep their state."""
    if not jax.dtypes.issubdtype(keys_S.dtype, jax.dtypes.prng_key):
        keys_S = jax.random.wrap_key_data(keys_S, impl=jax.random.key_impl(slots.keys_S))
    cache_R, logits_RV = _prefill_cache(_merge(graphdef, state), ids_RP, mask_RP, cfg)
    take_S = source_S >= 0
    src_S = jnp.maximum(source_S, 0)

    def pick(old, new):
        return jnp.where(take_S.reshape(-1, *(1,) * (old.ndim - 1)), new[src_S].astype(old.dtype), old)

    return Slots(
        cache=jax.tree.map(pick, slots.cache, cache_R),
        logits_SV=pick(slots.logits_SV, logits_RV),
        keys_S=jnp.where(take_S, keys_S, slots.keys_S),
        prompt_mask_SP=pick(slots.prompt_mask_SP, mask_RP),
        step_S=jnp.where(take_S, 0, slots.step_S),
        live_S=slots.live_S | take_S,
        tokens_SN=jnp.where(take_S[:, None], pad_id, slots.tokens_SN),
        logprobs_SN=jnp.where(take_S[:, None], 0.0, slots.logprobs_SN),
        mask_SN=slots.mask_SN & ~take_S[:, None],
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "steps"), donate_argnames=("slots",))
def decode_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    slots: Slots,
    eos_ids_E: jax.Array,
    pad_id: jax.Array,
    cfg: SamplingConfig,
    steps: int,
) -> tuple[Slots, jax.Array, jax.Array]:
    """Up to ``steps`` decode steps of every live slot (stops early when none is live).

    Returns:
      the slots, the steps run and the slot-steps that produced a token.
    """
    model = _merge(graphdef, state)
    s, p = slots.prompt_mask_SP.shape
    n = cfg.max_new_tokens
    rows_S = jnp.arange(s)
    prompt_len_S = jnp.sum(slots.prompt_mask_SP, axis=-1)
    key_mask_SL = jnp.concatenate([slots.prompt_mask_SP, jnp.ones((s, n), jnp.int32)], axis=1)

    def cond(carry):
        i, _, slots = carry
        return (i < steps) & jnp.any(slots.live_S)

    def body(carry):
        i, produced, sl = carry
        live_S, step_S = sl.live_S, sl.step_S
        at_S = jnp.minimum(step_S, n - 1)
        step_keys_S = jax.vmap(jax.random.fold_in)(sl.keys_S, step_S)
        token_S, logprob_S = sample_token(sl.logits_SV, step_keys_S, cfg)
        token_S = jnp.where(live_S, token_S, pad_id).astype(jnp.int32)
        tokens_SN = sl.tokens_SN.at[rows_S, at_S].set(jnp.where(live_S, token_S, sl.tokens_SN[rows_S, at_S]))
        logprobs_SN = sl.logprobs_SN.at[rows_S, at_S].set(jnp.where(live_S, logprob_S, sl.logprobs_SN[rows_S, at_S]))
        mask_SN = sl.mask_SN.at[rows_S, at_S].set(sl.mask_SN[rows_S, at_S] | live_S)
        slot_S = p + at_S
        x_S1D, cache = model.hidden_states(
            token_S[:, None],
            (prompt_len_S + at_S)[:, None],
            causal_mask(key_mask_SL, slot_S[:, None]),
            cache=sl.cache,
            cache_index=slot_S,
        )
        ended_S = jnp.isin(token_S, eos_ids_E) | (step_S + 1 >= n)
        sl = Slots(
            cache=cache,
            logits_SV=model.logits(x_S1D[:, 0]),
            keys_S=sl.keys_S,
            prompt_mask_SP=sl.prompt_mask_SP,
            step_S=step_S + live_S,
            live_S=live_S & ~ended_S,
            tokens_SN=tokens_SN,
            logprobs_SN=logprobs_SN,
            mask_SN=mask_SN,
        )
        return i + 1, produced + jnp.sum(live_S), sl

    i, produced, slots = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), slots))
    return slots, i, produced


BATCH_AXES = ("data", "fsdp")
"""Mesh axes that split the slots (the trainer's batch axes)."""


def batch_ways(mesh: Mesh) -> int:
    """Shards the slots split into: the product of the mesh's :data:`BATCH_AXES`."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def slot_shardings(slots: Slots, mesh: Mesh) -> Slots:
    """Slots split over the mesh's batch axes; cache heads over ``tensor`` when they divide.

    Raises:
      ValueError: the slot count does not divide over the batch axes.
    """
    ways = batch_ways(mesh)
    s = slots.step_S.shape[0]
    if s % ways:
        raise ValueError(f"{s} slots do not divide over the mesh's batch axes {BATCH_AXES} ({ways} ways)")
    heads = slots.cache[0].k_BKSH.shape[1]
    cache_spec = P(BATCH_AXES, "tensor") if heads % mesh.shape["tensor"] == 0 else P(BATCH_AXES)
    rows = NamedSharding(mesh, P(BATCH_AXES))
    return Slots(
        cache=jax.tree.map(lambda _: NamedSharding(mesh, cache_spec), slots.cache),
        **{name: rows for name in Slots._fields if name != "cache"},
    )


def _bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most ``cap`` (and at least n)."""
    return max(n, min(cap, 1 << max(0, n - 1).bit_length()))


class _Layout:
    """Where this process's slots and prompts sit in the engine's global arrays.

    Without a mesh everything is local. Under a mesh the slot and prompt arrays are split over the batch
    axes; with several processes each one holds its own block of slots (its own rows, its own queue) and
    the host decisions that every process must take together (another round, an admission and its
    prefill size) are agreed by a small all-gather, so every process calls the same programs with the
    same global shapes. Parameters are never gathered.
    """

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh
        self.processes = jax.process_count() if mesh is not None else 1
        if mesh is None:
            self.local_ways = 1
            return
        self.rows = NamedSharding(mesh, P(BATCH_AXES))  # leading axis split, any further axes whole
        ways = batch_ways(mesh)
        self.local_ways = len(self.host_rows(ways))
        if self.local_ways * self.processes != ways:
            raise ValueError(
                f"the mesh's batch axes {BATCH_AXES} ({ways} ways) are not split evenly over {self.processes} processes"
            )

    def host_rows(self, n: int) -> np.ndarray:
        """Global indices of this process's rows of an ``[n, ...]`` array split over the batch axes."""
        if self.mesh is None:
            return np.arange(n)
        index = self.rows.addressable_devices_indices_map((n,)).values()
        spans = {(i[0].start or 0, n if i[0].stop is None else i[0].stop) for i in index}
        return np.concatenate([np.arange(a, b) for a, b in sorted(spans)])

    def local_count(self, n: int) -> int:
        """This process's share of ``n`` rows, n rounded up to a whole number per batch shard."""
        return -(-n // self.local_ways) * self.local_ways

    def agree(self, *values: int) -> np.ndarray:
        """Each value's maximum over the processes."""
        local = np.asarray(values, np.int64)
        if self.processes == 1:
            return local
        return np.asarray(multihost_utils.process_allgather(local)).reshape(self.processes, -1).max(axis=0)

    def put(self, local):
        """A global array from this process's rows (split over the batch axes), or ``local`` as it is."""
        if self.mesh is None:
            return jnp.asarray(local)
        return jax.make_array_from_process_local_data(self.rows, local)

    def get(self, x: jax.Array) -> np.ndarray:
        """This process's rows of a global array split over the batch axes, as numpy."""
        if x.is_fully_addressable:
            return np.asarray(x)
        shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # replicas share an index
        return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def generate_continuous(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    ids_WP: np.ndarray,
    mask_WP: np.ndarray,
    keys_W: jax.Array,
    *,
    sampling: SamplingConfig,
    eos_ids: Sequence[int],
    pad_id: int,
    engine: EngineConfig | None = None,
    on_done: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> tuple[GenerateOutput, EngineStats]:
    """Samples one completion per row of left-padded prompts through the slot engine.

    Args:
      graphdef, params: the policy, as ``nnx.split`` parts.
      ids_WP, mask_WP: left-aligned prompts ``[W, P]`` (as :func:`~saerl_jax.model.sampling.left_align`
        makes them); identical rows share one prefill. With several processes: this process's rows (P the
        same on every process).
      keys_W: one sampling key per row.
      sampling: temperature, top-p, the budget N, cache dtype, prefill attention chunk.
      eos_ids: tokens that end a completion; ``pad_id`` is written after them.
      engine: slots and admission policy (default :class:`EngineConfig`); with several processes, slots
        per process.
      on_done: called with the number of rows that ended at each host visit (e.g. a progress bar).
      mesh: split the slots over this mesh (:func:`slot_shardings`); the parameters stay as placed. When
        the mesh spans several processes, every process calls this together with its own rows, and each
        decodes its rows in its own slots (see :class:`_Layout`).

    Returns:
      ``[W, N]`` tokens, log-probs and completion mask as host numpy arrays, equal to what
      :func:`~saerl_jax.model.sampling.generate_fn` gives for the same rows and keys; and the call's stats
      (decode steps and live slot-steps count every process's slots).
    """
    engine = engine or EngineConfig()
    layout = _Layout(mesh)
    ids_WP, mask_WP = np.asarray(ids_WP, np.int32), np.asarray(mask_WP, np.int32)
    w, p = ids_WP.shape
    n = sampling.max_new_tokens
    if w == 0 and layout.processes == 1:
        return GenerateOutput(*(np.zeros((0, n), t) for t in (np.int32, np.float32, np.int32))), EngineStats(items=0)
    s = layout.local_count(int(layout.agree(min(engine.slots, w))[0]))  # this process's slots
    stats = EngineStats(slots=s * layout.processes, items=w)
    prompt_of_W = _prompt_index(ids_WP, mask_WP)
    eos_E, pad = jnp.asarray(np.asarray(eos_ids, np.int32)), jnp.int32(pad_id)
    leaves, treedef = jax.tree.flatten(params)
    graph, params = _Graph(graphdef, treedef), leaves
    slots = init_slots(graph, params, layout.put(keys_W[np.arange(s) % w]), p, sampling, mesh=mesh)
    prompts = (ids_WP, mask_WP, prompt_of_W, np.asarray(jax.random.key_data(keys_W)))  # host-side key rows
    out = GenerateOutput(np.full((w, n), pad_id, np.int32), np.zeros((w, n), np.float32), np.zeros((w, n), np.int32))
    item_S = np.full(s, -1)  # the work item each slot holds, -1 when free
    queue = 0  # items are admitted in row order
    while True:
        free = np.flatnonzero(item_S < 0)
        busy = bool((item_S >= 0).any())
        admit = queue < w and (len(free) >= min(engine.admit_at, w - queue) or not busy)
        taken = free[: w - queue] if admit else free[:0]
        items = np.arange(queue, queue + len(taken))
        distinct = len(np.unique(prompt_of_W[items]))
        more, size = layout.agree(queue < w or busy, _bucket(distinct, s) if admit else 0)
        if not more:
            break
        if size:  # some process admits: all of them prefill a batch of this size
            queue += len(taken)
            slots = _admit(graph, params, slots, prompts, items, taken, pad, sampling, stats, layout, size)
            item_S[taken] = items
        slots, ran, produced = decode_fn(graph, params, slots, eos_E, pad, sampling, engine.sync_steps)
        stats.decode_steps += int(ran)
        stats.live_slot_steps += int(produced)
        live_S = layout.get(slots.live_S)
        ended = np.flatnonzero((item_S >= 0) & ~live_S)
        if ended.size:
            tokens_SN, logprobs_SN, mask_SN = map(layout.get, (slots.tokens_SN, slots.logprobs_SN, slots.mask_SN))
            out.tokens_BN[item_S[ended]] = tokens_SN[ended]
            out.logprobs_BN[item_S[ended]] = logprobs_SN[ended]
            out.mask_BN[item_S[ended]] = mask_SN[ended]
            item_S[ended] = -1
            if on_done is not None:
                on_done(len(ended))
    return out, stats


def _prompt_index(ids_WP: np.ndarray, mask_WP: np.ndarray) -> np.ndarray:
    """For each row, the index of its prompt among the distinct (ids, mask) rows."""
    rows = np.concatenate([ids_WP, mask_WP], axis=1)
    _, index = np.unique(rows, axis=0, return_inverse=True)
    return index.reshape(-1)


def _admit(graphdef, params, slots, prompts, items, taken, pad, sampling, stats, layout, size):
    """Prefills the distinct prompts of ``items`` (a batch of ``size`` per process, padded) into slots
    ``taken`` of this process; a process that admits nothing prefills filler rows and starts no slot."""
    ids_WP, mask_WP, prompt_of_W, key_data_W = prompts
    s = slots.step_S.shape[0] // layout.processes
    r = layout.local_count(size)
    source_S = np.full(s, -1, np.int32)
    slot_items = np.zeros(s, np.int64)
    if len(items):
        distinct, first, source = np.unique(prompt_of_W[items], return_index=True, return_inverse=True)
        rows = items[first][np.minimum(np.arange(r), len(distinct) - 1)]
        stats.prefilled += len(distinct)
        stats.admissions += 1
        stats.prefill_shapes.add(r)
        source_S[taken] = layout.host_rows(r * layout.processes)[source.reshape(-1)]  # global prompt rows
        slot_items[taken] = items
    else:
        rows = np.zeros(r, np.int64)
    return admit_fn(
        graphdef,
        params,
        slots,
        layout.put(ids_WP[rows]),
        layout.put(mask_WP[rows]),
        layout.put(source_S),
        layout.put(key_data_W[slot_items]),
        pad,
        sampling,
    )
