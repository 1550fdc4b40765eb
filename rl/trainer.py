"""``saerl train``: rollout -> reward -> advantages -> ``num_iterations`` sharded updates, with Orbax
checkpoints that resume exactly, metrics to JSONL and TensorBoard, and a final Hugging Face directory.

The loop is thin; the maths lives in :mod:`rl.losses` and :mod:`rl.step`, the data in
:mod:`rl.collect` and :mod:`saerl_jax.pipeline`. Sampling keys derive from (seed, step, sample id), so
a resumed or multi-host run draws what one uninterrupted run draws.

A step commits as a whole: the model state, the step counter and the step's metrics row change together,
after the update and any evaluation have finished and every metric is finite. Checkpoints hold only such
step-boundary states. Ctrl-C (or SIGTERM) lets the current step finish and commit, saves, and stops; a
second Ctrl-C stops at once. A step that fails or is stopped before its commit puts the data position
back (the prompts it drew are drawn again); once its update has been dispatched the old model state is
gone (donated), so nothing is saved and the latest checkpoint stays the last good one. A resumed run then
repeats what followed that checkpoint and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from grain import python as grain
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rl import dpo, dpo_step, ppo_step
from rl.collect import GradedBatch, PromptQueue, RolloutStore, collect, loss_mask, shaped_rewards
from rl.config import DPOConfig, GRPOConfig, PPOConfig, config_from_dict
from rl.metrics import CompileCounter, MetricsLog
from rl.rewards import RewardGrader, format_reward
from rl.rollout import logprobs_fn, rollout, rollout_sampling, row_keys
from rl.sharding import batch_sharding, make_mesh, shard_batch, tree_shardings
from rl.step import TrainState, init_state, jit_train_step, make_optimizer, train_step
from saerl_jax.data.problems import Problem, column_mapping, load_problems
from saerl_jax.data.prompt import load_tokenizer, stop_ids
from saerl_jax.engineering.planner import Plan
from saerl_jax.errors import UserError
from saerl_jax.model import load_pretrained, save_pretrained
from saerl_jax.model.sampling import left_align
from saerl_jax.pipeline import CurriculumSampler, ExternalDifficultySampler, ShuffleSampler, make_loader
from saerl_jax.precision import Precision, cast_floating
from saerl_jax.sft import greedy_accuracy

RESUMABLE_FIELDS = ("max_steps", "eval_steps", "eval_limit", "save_steps", "rollout_batch_size", "rollout_engine")
"""Config fields a resumed run may change; any other difference is refused."""
PRECISION_FIELDS = ("param_dtype", "compute_dtype", "reference_dtype", "cache_dtype")
"""Config fields a checkpoint records resolved (None made concrete) and a resumed run must match."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Options of ``saerl train`` besides the algorithm's :class:`GRPOConfig`."""

    model: Path
    """Hugging Face Qwen2 directory: the initial policy (and the KL reference)."""
    data: Path
    """Training problems (DeepMath schema, JSONL or parquet)."""
    out: Path
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, hf/ (final model), summary.json."""
    config: GRPOConfig
    """The algorithm and its hyper-parameters."""
    tokenizer: Path | None = None
    """Tokenizer directory; the model directory when None."""
    sampler: Literal["plan", "shuffle", "difficulty"] = "shuffle"
    """Prompt order: the SAERL plan, a seeded shuffle (vanilla), or the dataset's difficulty labels."""
    plan: Path | None = None
    """``plan.json`` (or the directory holding it) for ``sampler='plan'``."""
    eval_data: Path | None = None
    """Held-out problems for greedy accuracy; none evaluated when None."""
    mesh: tuple[int, int, int] = (-1, 1, 1)
    """(data, fsdp, tensor) mesh shape over all devices; -1 fills the data axis."""
    data_seed: int = 0
    """Seed of the shuffled order."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out/checkpoints``."""
    reward_workers: int = 2
    """Grading processes."""
    column: tuple[str, ...] = ()
    """``field=column`` mappings for problem files with other column names, e.g. ``question=problem``."""
    skip_invalid: bool = False
    """Skip invalid problem rows (reported) instead of stopping at the first."""
    tensorboard: bool = True
    """Also write TensorBoard scalars."""
    progress: bool = True
    """Show a progress bar."""
    reward: Callable[[Sequence[str], Sequence[str]], Sequence[float]] | None = None
    """A reward ``(completions, answers) -> scores`` replacing the math-verify grader (which then also
    gives the ``accuracy`` metric); format and overlong shaping still apply."""
    replan: Callable[[int, Path, list[str]], Path] | None = None
    """Adaptive re-planning (``sampler='plan'``, one process): at every step ``s`` that is a positive
    multiple of ``replan_steps``, ``replan(s, hf_dir, seen_ids)`` gets the current policy exported to
    ``out/replan/step-S/hf`` and the ids trained so far (in order), and returns the plan to train on from
    step ``s + 1`` (its batches from the first). It must be deterministic in its arguments: a run resumed
    from a checkpoint before the switch calls it again and must get the same plan (the plan's hash is
    checked on resume)."""
    replan_steps: int = 0
    """Steps between re-plans; 0 never re-plans."""


def _sampler(job: TrainJob, problems: dict[str, Problem], cfg: GRPOConfig):
    """The job's sampler: an endless stream of full batches of ``cfg.batch_size`` ids (one per step, or more
    with dynamic sampling), so the run length is not part of its identity."""
    shard = grain.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count())
    ids = sorted(problems)
    if job.sampler == "shuffle":
        return ShuffleSampler(ids, cfg.batch_size, seed=job.data_seed, shard_options=shard)
    if job.sampler == "difficulty":
        unlabelled = [i for i in ids if problems[i].difficulty is None]
        if unlabelled:
            raise UserError(f"{job.data}: {len(unlabelled)} problems have no difficulty (first: {unlabelled[0]})")
        difficulty = [problems[i].difficulty for i in ids]
        return ExternalDifficultySampler(ids, difficulty, cfg.batch_size, seed=job.data_seed, shard_options=shard)
    if job.sampler == "plan":
        if job.plan is None:
            raise UserError("sampler='plan' needs a plan (saerl engineer writes plan.json)")
        return _plan_sampler(job.plan, problems, cfg, job.data_seed)
    raise UserError(f"sampler must be plan, shuffle or difficulty, got {job.sampler!r}")


def _plan_file(plan: Path) -> Path:
    return plan / "plan.json" if plan.is_dir() else plan


def _plan_sampler(plan: Path, problems: dict[str, Problem], cfg: GRPOConfig, seed: int) -> CurriculumSampler:
    """The sampler of a plan whose batches all hold ``cfg.batch_size`` ids of ``problems``."""
    path = _plan_file(plan)
    loaded = Plan.load(path)
    if not loaded.batches:
        raise UserError(f"{path}: the plan has no batches")
    sizes = sorted({len(batch) for batch in loaded.batches})
    if sizes != [cfg.batch_size]:
        planned = "/".join(str(size) for size in sizes)
        raise UserError(
            f"{path}: the plan's batches hold {planned} ids but batch_size={cfg.batch_size}; a step trains "
            f"exactly one plan batch, so re-plan with saerl engineer --batch-size {cfg.batch_size} or train "
            f"with --batch-size {sizes[-1]}"
        )
    unknown = next((i for batch in loaded.batches for i in batch if i not in problems), None)
    if unknown is not None:
        raise UserError(f"{path}: plan id {unknown!r} is not among the training problems")
    shard = grain.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count())
    return CurriculumSampler(loaded, seed=seed, shard_options=shard)


def _gather(x: np.ndarray) -> np.ndarray:
    """All hosts' rows of a host-local array, in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def _gather_json(value) -> list:
    """Every host's JSON-able ``value``, in process order (as zero-padded UTF-8 rows; JSON has no NUL)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    width = int(_gather(np.array([data.size])).max())
    rows = _gather(np.pad(data, (0, width - data.size))[None])
    return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


def _host_params(params):
    """Params as this host can use them alone (rollouts and export run per host)."""
    if jax.process_count() == 1:
        return params
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


class StopRequests:
    """While installed (main thread only), SIGINT and SIGTERM do not interrupt: the first one asks the loop
    to stop after the current step (``requested`` names it); a second raises ``KeyboardInterrupt`` at once."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing the current step, then saving (Ctrl-C again stops at once)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds a run's model, data, mesh and checkpoint manager; :meth:`train` is the loop."""

    def __init__(self, job: TrainJob):
        self.job, self.cfg = job, job.config.with_resolved_precision()
        cfg = self.cfg
        if cfg.batch_size % jax.process_count():
            raise UserError(f"batch_size={cfg.batch_size} does not split over {jax.process_count()} processes")
        self.tokenizer = load_tokenizer(job.tokenizer or job.model)
        columns = column_mapping(job.column) or None
        loaded = load_problems(job.data, columns=columns, skip_invalid=job.skip_invalid)
        self.problems = {p.id: p for p in loaded.problems}
        self.eval_rows = []
        if job.eval_data is not None:
            rows = load_problems(job.eval_data, limit=cfg.eval_limit).problems
            self.eval_rows = [{"question": p.question, "final_answer": p.final_answer} for p in rows]
        self.eos_ids, self.pad_id = stop_ids(self.tokenizer)
        model = load_pretrained(job.model, jnp.dtype(cfg.param_dtype))
        self.graphdef, policy = nnx.split(model)
        self.mesh = make_mesh(*job.mesh)
        self.optimizer = make_optimizer(cfg)
        step, params = train_step, policy
        if isinstance(cfg, PPOConfig):
            step, params = ppo_step.train_step, ppo_step.init_params(policy, model.config.hidden_size, cfg.value_model)
        elif isinstance(cfg, DPOConfig):
            step = dpo_step.train_step
        state = init_state(params, self.optimizer)
        if isinstance(cfg, DPOConfig) and cfg.pairs == "online" and cfg.pair_refresh_steps > 1:
            state = state._replace(frozen=jax.tree.map(jnp.copy, policy))
        self.state_shardings = tree_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        self.ref_params = None
        if cfg.keeps_reference:  # a separate copy (the state's buffers are donated to every update), maybe narrower
            self.ref_params = cast_floating(self.policy(self.state.params), cfg.reference_dtype)
            if cfg.reference_dtype == cfg.param_dtype:
                self.ref_params = jax.tree.map(jnp.copy, self.ref_params)
        self.store = None
        """Offline DPO: the initial policy's completions, sampled once per prompt (per host)."""
        if isinstance(cfg, DPOConfig) and cfg.pairs == "offline":
            host = "" if jax.process_count() == 1 else f".{jax.process_index()}"
            name = f"offline_rollouts{host}.jsonl"
            self.store = RolloutStore(job.out / name, cfg.max_completion_length, self.pad_id)
            self.store_params = _host_params(cast_floating(self.ref_params, cfg.compute_dtype))
        self.step_fn = jit_train_step(
            self.graphdef,
            cfg,
            self.optimizer,
            state_shardings=self.state_shardings,
            batch_shardings=batch_sharding(self.mesh),
            step=step,
        )
        if job.replan is not None and (job.sampler != "plan" or job.replan_steps < 1 or jax.process_count() > 1):
            raise UserError("re-planning needs sampler='plan', replan_steps >= 1 and a single process")
        self.segment, self.plan = 0, job.plan
        """Plans trained so far (0 until the first re-plan) and the current one."""
        self._start_data(_sampler(job, self.problems, cfg))
        self.sampling = rollout_sampling(cfg)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self.manager = ocp.CheckpointManager(
            (job.out / "checkpoints").absolute(), item_names=("state", "data", "meta"), options=options
        )
        self.grader = RewardGrader(workers=job.reward_workers, timeout_s=cfg.reward_timeout_s)  # starts on first use
        self.step = 0
        self.compiles = 0
        """XLA programs this process built in its steps (compiled or read from the persistent cache)."""
        self.consistent = True
        """Whether ``state``, ``step`` and the data position form a step-boundary state (saveable)."""
        self.resumed = job.resume and self.manager.latest_step() is not None
        if self.resumed:
            self._restore(self.manager.latest_step())
        if jax.process_index() == 0:
            reference = cfg.reference_dtype if cfg.keeps_reference else None
            precision = Precision(
                params=cfg.param_dtype, compute=cfg.compute_dtype, reference=reference, cache=cfg.cache_dtype
            )
            print(precision.describe(), flush=True)

    def policy(self, params):
        """The policy's part of a state's params (PPO's also hold the value model)."""
        return params["policy"] if isinstance(self.cfg, PPOConfig) else params

    def _start_data(self, sampler) -> None:
        """A fresh data iterator and prompt queue over ``sampler``."""
        self.iterator = iter(make_loader(sampler, self.problems, self.tokenizer))
        self.queue = PromptQueue(self.iterator, self.cfg.max_prompt_length, self.pad_id, fixed=jax.process_count() > 1)

    def _seen_ids(self) -> list[str]:
        path = self.job.out / "batches.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        return [i for row in rows if row["step"] <= self.step for i in row["ids"]]

    def _replan(self) -> None:
        """Switches to the plan ``job.replan`` builds for the current policy (a step boundary); the old
        data position stays in place until the new plan is ready, so an interrupt here loses nothing."""
        directory = self.job.out / "replan" / f"step-{self.step}"
        started = time.perf_counter()
        plan = self.job.replan(self.step, self.export(directory / "hf"), self._seen_ids())
        sampler = _plan_sampler(plan, self.problems, self.cfg, self.job.data_seed)
        self._start_data(sampler)
        self.segment, self.plan = self.step // self.job.replan_steps, Path(plan)
        print(f"step {self.step}: re-planned in {time.perf_counter() - started:.1f} s: {self.plan}", flush=True)

    def _replan_due(self) -> bool:
        every = self.job.replan_steps
        if self.job.replan is None or self.step == 0 or self.step % every:
            return False
        return self.segment != self.step // every

    # --- checkpoints -------------------------------------------------------------------------------------
    def _save(self) -> None:
        if not self.consistent:
            raise RuntimeError(f"step {self.step + 1} is under way: only step-boundary states are saved")
        # Every host's data counters: only the primary host writes JSON items.
        meta = {"step": self.step, "queues": _gather_json(self.queue.state()), "config": self.cfg.to_dict()}
        if self.segment:
            meta["plan"] = {"segment": self.segment, "path": str(self.plan), "hash": _plan_hash(self.plan)}
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                data=grain.PyGrainCheckpointSave(self.iterator),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def _restore(self, step: int) -> None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        where = self.job.out / "checkpoints" / str(step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if "plan" in meta:  # written after a re-plan: its data position is in that plan
            plan = Path(meta["plan"]["path"])
            if self.job.replan is None or not _plan_file(plan).is_file() or _plan_hash(plan) != meta["plan"]["hash"]:
                raise UserError(
                    f"{where}: written while training the re-planned {plan}, which this run cannot rebuild "
                    "(no re-planning, or the plan file is missing or changed); start a new --out"
                )
            self._start_data(_plan_sampler(plan, self.problems, self.cfg, self.job.data_seed))
            self.segment, self.plan = int(meta["plan"]["segment"]), plan
        saved = config_from_dict(meta["config"])
        # Checkpoints record resolved dtypes; one without them was written before mixed precision: float32.
        saved = dataclasses.replace(saved, **{name: getattr(saved, name) or "float32" for name in PRECISION_FIELDS})
        for name in PRECISION_FIELDS:
            if getattr(saved, name) != getattr(self.cfg, name):
                raise UserError(
                    f"{where}: written with {name}={getattr(saved, name)}, but this run has {name}="
                    f"{getattr(self.cfg, name)}; a run resumes in the precision it was written with: pass "
                    f"--{name.replace('_', '-')} {getattr(saved, name)}, or start a new --out"
                )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=grain.PyGrainCheckpointRestore(self.iterator),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as err:  # Grain: another sampler (order, batch size or host count)
            raise UserError(f"{where}: the checkpoint does not match this run's data: {err}") from None
        changed = [
            f.name
            for f in dataclasses.fields(self.cfg)
            if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(self.cfg, f.name)
        ]
        if type(saved) is not type(self.cfg) or changed:
            raise UserError(
                f"{self.job.out}: the checkpoint was made with a different config "
                f"({', '.join(changed) or type(saved).__name__}); resume with the same settings or a new --out"
            )
        queue = restored.meta["queues"][jax.process_index()]
        if "taken" not in queue:
            raise UserError(f"{where}: written by an older saerl train (prompt queue layout); start a new --out")
        self.state = TrainState(*restored.state)
        self.step = int(restored.meta["step"])
        self.queue.restore(queue)

    # --- one step ----------------------------------------------------------------------------------------
    def _roll(self, prompts: dict[str, np.ndarray], draw: int, params):
        keys = row_keys(
            self.cfg.seed,
            self.step * self.cfg.max_num_gen_batches + draw,
            list(prompts["ids"]),
            self.cfg.num_generations,
        )
        return rollout(
            self.graphdef,
            params,
            prompts["input_ids"],
            prompts["attention_mask"],
            keys=keys,
            num_generations=self.cfg.num_generations,
            sampling=self.sampling,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            rows_per_call=self.cfg.rollout_batch_size,
            engine=self.cfg.rollout_engine,
            mesh=self.mesh,  # the engine's slots split over it; every host decodes its own rows
        )

    def _decode(self, tokens_BN: np.ndarray) -> list[str]:
        return self.tokenizer.batch_decode(tokens_BN.tolist(), skip_special_tokens=True)

    def _sampling_params(self):
        """The parameters the step's completions are sampled from: the policy, or for online DPO refreshed
        every ``pair_refresh_steps`` its snapshot of the last refresh."""
        cfg, state = self.cfg, self.state
        if isinstance(cfg, DPOConfig) and state.frozen is not None:
            if self.step % cfg.pair_refresh_steps == 0:  # the snapshot goes into checkpoints with the state
                self.state = state = state._replace(frozen=jax.tree.map(jnp.copy, state.params))
            return state.frozen
        return self.policy(state.params)

    def _roll_stored(self, prompts: dict[str, np.ndarray], draw: int):
        """Offline DPO's rollouts: each prompt's stored completions, sampled from the initial policy (keys
        of the seed and the sample id alone) the first time the prompt is drawn."""
        g, ids = self.cfg.num_generations, [str(i) for i in prompts["ids"]]
        missing = sorted({k: None for k, i in enumerate(ids) if i not in self.store and i not in ids[:k]})
        if missing:
            sampled = rollout(
                self.graphdef,
                self.store_params,
                prompts["input_ids"][missing],
                prompts["attention_mask"][missing],
                keys=row_keys(self.cfg.seed, 0, [ids[k] for k in missing], g),
                num_generations=g,
                sampling=self.sampling,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                rows_per_call=self.cfg.rollout_batch_size,
                engine=self.cfg.rollout_engine,
            )
            for j, k in enumerate(missing):
                self.store.add(ids[k], sampled.select(slice(j * g, (j + 1) * g)))
        width = prompts["input_ids"].shape[1]
        ids_BP, mask_BP = left_align(np.asarray(prompts["input_ids"]), np.asarray(prompts["attention_mask"]), width)
        return self.store.rollout(ids, np.repeat(ids_BP, g, axis=0), np.repeat(mask_BP, g, axis=0))

    def _collect(self) -> GradedBatch:
        params = cast_floating(self._sampling_params(), self.cfg.compute_dtype)  # sampled in compute dtype
        if self.cfg.rollout_engine == "static":  # the static sampler runs each host's rows on its own devices
            params = _host_params(params)
        roll = functools.partial(self._roll, params=params) if self.store is None else self._roll_stored
        grade = self.job.reward or self.grader
        reward_fn = functools.partial(shaped_rewards, cfg=self.cfg, grade=grade, format_reward=format_reward)

        def full(kept: int, need: int) -> bool:  # every host's part of the step is full
            return bool(_gather(np.array([kept - need])).min() >= 0)

        return collect(self.queue, self.cfg, roll, self._decode, reward_fn, full=full)

    def _batch(self, graded: GradedBatch) -> dict[str, jax.Array]:
        if isinstance(self.cfg, DPOConfig):
            return self._pair_batch(graded)
        r = graded.rollout
        host = {
            "prompt_ids_BP": r.prompt_ids_BP,
            "prompt_mask_BP": r.prompt_mask_BP,
            "completion_ids_BN": r.completion_ids_BN,
            "loss_mask_BN": loss_mask(r, self.cfg.mask_truncated_completions),
            "rewards_B": graded.rewards_B,
        }
        batch = shard_batch(host, self.mesh)
        args = [batch[k] for k in ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BN", "loss_mask_BN")]
        logp = functools.partial(
            logprobs_fn,
            self.graphdef,
            temperature=self.cfg.temperature,
            chunk=self.cfg.logprob_chunk,
            compute_dtype=self.cfg.compute_dtype,
            micro_batches=self.cfg.gradient_accumulation_steps,
            attention_chunk=self.cfg.attention_chunk,
        )
        if self.cfg.keeps_reference:
            batch["ref_logp_BN"] = logp(self.ref_params, *args)
        if self.cfg.num_iterations > 1 or isinstance(self.cfg, PPOConfig):
            batch["old_logp_BN"] = logp(self.policy(self.state.params), *args)
        if isinstance(self.cfg, PPOConfig):
            batch["old_values_BN"] = ppo_step.values_fn(
                self.graphdef,
                self.state.params,
                *args,
                compute_dtype=self.cfg.compute_dtype,
                micro_batches=self.cfg.gradient_accumulation_steps,
                attention_chunk=self.cfg.attention_chunk,
            )
        return batch

    def _pair_batch(self, graded: GradedBatch) -> dict[str, jax.Array]:
        """DPO: one pair per prompt of the graded rollout (first correct vs first incorrect completion),
        with the reference's log-probs of both."""
        r = graded.rollout
        pairs = dpo.build_pairs(graded.correct_B, self.cfg.num_generations)
        graded.stats["prompts_without_pair"] = int((~pairs.valid_K).sum())
        host = dpo.pair_batch(r.prompt_ids_BP, r.prompt_mask_BP, r.completion_ids_BN, r.completion_mask_BN, pairs)
        batch = shard_batch(host, self.mesh)
        batch["ref_chosen_K"], batch["ref_rejected_K"] = dpo_step.reference_logps(
            self.graphdef, self.ref_params, batch, self.cfg
        )
        return batch

    def run_step(self) -> tuple[TrainState, dict[str, float], list[str]]:
        """Rollout, grading, ``num_iterations`` updates and any evaluation of step ``self.step + 1``.

        Returns the new state, the step's metrics row and this host's sample ids in batch order, without
        committing them (see :meth:`commit`). If it fails before the update, the data position is put back;
        from the update on, ``consistent`` is False until the commit.

        Raises:
          FloatingPointError: a metric, the parameters or the optimizer state came out non-finite (unless
            ``skip_nonfinite_steps``); names the step and the first such metric.
        """
        started = time.perf_counter()
        position = self.iterator.get_state(), self.queue.state()
        with CompileCounter() as compiled:
            try:
                graded = self._collect()
                batch = self._batch(graded)
            except BaseException:
                self.iterator.set_state(position[0])
                self.queue.restore(position[1])
                raise
            rolled = time.perf_counter()
            self.consistent = False  # the update donates the buffers of the step-boundary state
            state = self.state
            for _ in range(self.cfg.num_iterations):
                state, metrics = self.step_fn(state, batch)
            metrics = {name: float(value) for name, value in metrics.items()}
            self._check_finite(metrics)
            done = time.perf_counter()
            row = {
                **metrics,
                **self._rollout_metrics(graded),
                "rollout_s": rolled - started,
                "update_s": done - rolled,
                "tokens_per_s": float(_gather(graded.rollout.lengths_B).sum()) / (done - started),
            }
            step, cfg = self.step + 1, self.cfg
            if self.eval_rows and (step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
                row["eval_accuracy"], row["eval_correct"] = self.evaluate(self.policy(state.params), per_problem=True)
        row["compiles"], row["compile_s"] = float(compiled.compiles), compiled.seconds  # this process's
        self.compiles += compiled.compiles
        return state, row, graded.sample_ids

    def _check_finite(self, metrics: dict[str, float]) -> None:
        if self.cfg.skip_nonfinite_steps:
            return
        bad = [name for name in ("loss", *sorted(metrics)) if not math.isfinite(metrics[name])]
        if not bad and metrics["nonfinite"]:
            bad = ["nonfinite"]
        if bad:
            what = "the parameters or optimizer state" if bad[0] == "nonfinite" else f"{bad[0]}={metrics[bad[0]]}"
            raise FloatingPointError(
                f"step {self.step + 1}: {what} came out non-finite; nothing of this step is saved (the latest "
                f"checkpoint, step {self.manager.latest_step()}, is the last good one); lower the learning rate or "
                "set skip_nonfinite_steps"
            )

    def commit(self, state: TrainState, row: dict[str, float], sample_ids: list[str], log: MetricsLog) -> None:
        """Makes a step from :meth:`run_step` the current one: state, step counter and metrics row together."""
        self.state, self.step = state, self.step + 1
        log.write(self.step, row, sample_ids)
        self.consistent = True

    def _rollout_metrics(self, graded: GradedBatch) -> dict[str, float]:
        rewards, correct = _gather(graded.rewards_B), _gather(graded.correct_B)
        lengths, truncated = _gather(graded.rollout.lengths_B), _gather(graded.rollout.truncated_B)
        # Counts of every host: summed, except fractions (hosts hold equal numbers of groups) and what every
        # host shares (the batch drawn, the number of draws).
        local = {**graded.stats, "reward_timeouts": self.grader.timeouts, "prompts_truncated": self.queue.truncated}
        names = sorted(local)
        stats_SH = _gather(np.array([[local[k] for k in names]], np.float64)).T
        shared = {"frac_reward_zero_std": np.mean, "planned_share": np.mean, "gen_batches": np.max}
        shared["batch_index"] = np.max
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "accuracy": float(correct.mean()),
            "completion_length": float(lengths.mean()),
            "truncation_rate": float(truncated.mean()),
            **{k: float(shared.get(k, np.sum)(v)) for k, v in zip(names, stats_SH, strict=True)},
        }

    def evaluate(self, params=None, per_problem: bool = False):
        """Greedy accuracy on the held-out rows (math-verify, same reward as training) of ``params``
        (default: the current state's); with ``per_problem`` also each row's score (0 or 1), in order."""
        params = self.policy(self.state.params) if params is None else params
        model = nnx.merge(self.graphdef, _host_params(params))
        accuracy, scores = greedy_accuracy(
            model,
            self.tokenizer,
            self.eval_rows,
            max_new_tokens=self.cfg.max_completion_length,
            batch_size=min(128, len(self.eval_rows)),
            engine=self.cfg.rollout_engine,
        )
        return (accuracy, [float(v) for v in scores]) if per_problem else accuracy

    def export(self, directory: Path) -> Path:
        """Writes the current policy as a Hugging Face directory (config, safetensors, tokenizer)."""
        model = nnx.merge(self.graphdef, jax.tree.map(np.asarray, _host_params(self.policy(self.state.params))))
        if jax.process_index() == 0:
            save_pretrained(model, directory)
            self.tokenizer.save_pretrained(directory)
        return directory

    def close(self) -> None:
        """Stops the grading processes (started again if the trainer is used afterwards)."""
        self.grader.close()

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs to ``max_steps`` (or a stop request), checkpointing and logging; returns the run summary."""
        cfg, job = self.cfg, self.job
        log = MetricsLog(
            job.out,
            resume_step=self.step if self.resumed else None,
            tensorboard=job.tensorboard,
            process=(jax.process_index(), jax.process_count()),
        )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {cfg.to_dict()['algo']}",
            unit="step",
            disable=not job.progress or jax.process_index() != 0,
        )
        interrupted, saved_at = False, self.step if self.resumed else None
        with StopRequests() as stop, contextlib.ExitStack() as cleanup:
            cleanup.callback(bar.close)
            cleanup.callback(log.close)
            cleanup.callback(self.close)
            cleanup.callback(self.manager.wait_until_finished)
            cleanup.callback(lambda: self._save_on_exit(saved_at))
            try:
                while self.step < cfg.max_steps:
                    if self._replan_due():
                        self._replan()
                    state, row, sample_ids = self.run_step()
                    self.commit(state, row, sample_ids, log)
                    bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}")
                    bar.update(1)
                    if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                        self._save()
                        saved_at = self.step
                    if _any_host(stop.requested is not None) and self.step < cfg.max_steps:
                        interrupted = True
                        break
            except KeyboardInterrupt:
                interrupted = True
                print(f"\ninterrupted during step {self.step + 1}", flush=True)
        # A stop asked for during the last step cannot cut the run short, but the caller (e.g. an experiment
        # looping over runs) should still stop after it.
        summary = {"step": self.step, "interrupted": interrupted, "out": str(job.out), "compiles": self.compiles}
        summary["stop_requested"] = stop.requested is not None
        if not interrupted:
            summary["hf"] = str(self.export(job.out / "hf"))
        return summary

    def _save_on_exit(self, saved_at: int | None) -> None:
        if not self.consistent:
            latest = self.manager.latest_step()
            print(
                f"step {self.step + 1} stopped after its update began: nothing of it is saved; the latest "
                f"checkpoint ({'none' if latest is None else f'step {latest}'}) stays the last good one",
                flush=True,
            )
        elif saved_at != self.step:
            self._save()


def _plan_hash(plan: Path) -> str:
    return hashlib.sha256(_plan_file(plan).read_bytes()).hexdigest()


def _any_host(flag: bool) -> bool:
    """Whether ``flag`` is set on any host (so every host leaves the loop at the same step)."""
    return bool(_gather(np.array([int(flag)])).max())


def run_train(job: TrainJob) -> dict:
    """Builds a :class:`Trainer` for ``job`` and runs it."""
    return Trainer(job).train()
