"""Frozen configs of the RL trainer. Names follow TRL's ``GRPOConfig`` where one exists.

``GRPOConfig`` defaults to the GRPO of DeepSeekMath (per-sequence mean, KL to a frozen reference with
``beta = 0.04``, symmetric clip). ``DAPOConfig`` only changes defaults, as in the DAPO paper (Yu et al.,
2025): clip-higher 0.2 / 0.28, token-level loss, no KL, dynamic sampling and soft overlong punishment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from typing import Any, Literal, get_args

from saerl_jax.precision import DType, check_dtype, resolve_compute_dtype

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]
FilterMetric = Literal["accuracy", "reward"]
RolloutEngine = Literal["static", "continuous"]
ROLLOUT_ENGINES: tuple[str, ...] = get_args(RolloutEngine)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Everything a GRPO run needs besides its model and data; change with ``dataclasses.replace``."""

    # Batches.
    batch_size: int = 8
    """Prompts (groups) per optimizer step, over all hosts."""
    num_generations: int = 4
    """Completions sampled per prompt (G >= 2: advantages compare completions of one prompt)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches the update of one step is split into (the batch must divide evenly)."""
    # Sampling.
    max_prompt_length: int = 256
    """Prompts are left-padded to this many tokens; longer ones keep their last tokens (and are counted)."""
    max_completion_length: int = 64
    """Completion budget in tokens; longer completions are cut and flagged truncated."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs in the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    rollout_batch_size: int = 0
    """Completions decoded at once: with the static engine a host's rollout rows are sampled in chunks of
    this many, with the continuous engine this is its number of cache slots (the KV cache and activations
    of that many rows are live at a time); 0 decodes all rows together. Never changes what is sampled
    (every completion has its own key)."""
    rollout_engine: RolloutEngine = "continuous"
    """``continuous`` (default): a slot whose completion ended is refilled from the queue, and the G rows of
    a prompt share one prefill (:mod:`saerl_jax.model.engine`); ``static``: each chunk decodes until its
    longest row ends (the reference the engine is tested against). The same tokens either way."""
    # Objective.
    loss_type: LossType = "grpo"
    """Aggregation: grpo (per-sequence mean), bnpo / dapo (token-level), dr_grpo (fixed denominator)."""
    importance_sampling_level: ImportanceLevel = "token"
    """Per-token ratios, or one ratio per sequence (GSPO)."""
    scale_rewards: ScaleRewards = "group"
    """Divide advantages by the group's std, the batch's std, or not at all (Dr. GRPO)."""
    beta: float = 0.04
    """Weight of the k3 KL to the frozen initial policy; 0 keeps no reference model."""
    epsilon: float = 0.2
    """Lower clip range of the ratio."""
    epsilon_high: float | None = None
    """Upper clip range; None means ``epsilon`` (symmetric)."""
    num_iterations: int = 1
    """Updates per rollout batch (mu); the first sees ratio 1."""
    mask_truncated_completions: bool = False
    """Leave completions that hit the length budget out of the loss."""
    dynamic_sampling: bool = False
    """Drop groups whose filter metric is equal across all G completions and refill the step from the
    sampler batches that follow the planned one (DAPO)."""
    filter_groups_metric: FilterMetric = "accuracy"
    """Dynamic sampling keeps a group when this differs across its completions: accuracy (the math reward
    alone, as in the DAPO paper and verl) or the shaped reward (with format and overlong terms)."""
    max_num_gen_batches: int = 4
    """With dynamic sampling: sampler batches drawn per step at most before giving up with an error."""
    overlong_buffer_len: int | None = 0
    """Soft overlong punishment: length (tokens) of the buffer before the budget; 0 switches it off; None
    means ``overlong_buffer_fraction`` of ``max_completion_length``."""
    overlong_buffer_fraction: float = 0.2
    """Buffer as a share of the budget when ``overlong_buffer_len`` is None (the DAPO paper: 4,096 of 20,480)."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the full budget."""
    format_reward_weight: float = 0.0
    """Weight of the optional format reward (one boxed answer at the end) added to the math reward."""
    reward_timeout_s: float = 5.0
    """Hard deadline per completion when grading; a late one scores 0 and is counted."""
    # Optimizer.
    learning_rate: float = 1e-5
    """Peak AdamW learning rate."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer updates (each step makes num_iterations of them), then constant."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; 0 switches clipping off."""
    # Precision.
    param_dtype: DType = "float32"
    """Master weights and optimizer state (the update is applied in this dtype)."""
    compute_dtype: DType | None = None
    """Matmuls and activations of the update and the rollouts (the params are cast to it inside each step;
    norms' statistics, softmax, log-probs, loss and advantages stay float32); None: bfloat16 on accelerators,
    float32 on CPU."""
    reference_dtype: DType | None = None
    """Storage of the frozen KL reference (with beta > 0); None: the compute dtype."""
    cache_dtype: DType | None = None
    """KV cache of the rollouts; None: the compute dtype."""
    # Loop.
    max_steps: int = 100
    """Optimizer steps of the run (each one rollout batch times num_iterations)."""
    eval_steps: int = 0
    """Evaluate greedy accuracy on the held-out set every this many steps (0: only at the end)."""
    eval_limit: int = 256
    """Held-out problems evaluated."""
    save_steps: int = 50
    """Checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    logprob_chunk: int = 64
    """Completion positions per chunk when turning hidden states into log-probs (bounds the
    ``[B, chunk, V]`` logits held at once)."""
    remat: bool = False
    """Recompute each decoder block in the backward pass (activation memory about one block instead of
    all of them, for about a third more compute)."""
    attention_chunk: int = 0
    """Queries attended at a time in the update, the log-prob passes and the rollout prefill (each still
    sees every key): the float32 attention scores held are ``[rows, heads, chunk, T]`` instead of
    ``[rows, heads, T, T]``, 0.6 GB per row per layer at 3,584 tokens and 12 heads. 0: all at once."""
    skip_nonfinite_steps: bool = False
    """Skip (and count in the ``skipped_nonfinite`` metric) an update whose loss, gradients, parameters or
    optimizer state would be non-finite, instead of stopping the run with an error."""
    seed: int = 0
    """Seeds sampling; the data order has its own seed in the sampler."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "num_generations", "gradient_accumulation_steps", "max_prompt_length")
        positive += ("max_completion_length",)
        positive += ("num_iterations", "max_num_gen_batches", "max_steps", "save_steps", "logprob_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        choices = {
            "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
            "importance_sampling_level": ("token", "sequence"),
            "scale_rewards": ("group", "batch", "none"),
            "filter_groups_metric": ("accuracy", "reward"),
            "rollout_engine": ROLLOUT_ENGINES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2, got {self.num_generations}: a group of one completion has no "
                "advantage (its reward minus the group mean is 0)"
            )
        rows = self.batch_size * self.num_generations
        if rows % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size * num_generations = {rows} completions do not split into "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} equal micro-batches"
            )
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk must be >= 0 (0: all queries at once), got {self.attention_chunk}")
        if self.rollout_batch_size < 0:
            raise ValueError(f"rollout_batch_size must be >= 0 (0: all rows at once), got {self.rollout_batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for RL sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.overlong_buffer_fraction <= 1:
            raise ValueError(f"overlong_buffer_fraction must be in [0, 1], got {self.overlong_buffer_fraction}")
        if not 0 <= self.overlong_buffer_tokens <= self.max_completion_length:
            raise ValueError(
                f"overlong_buffer_len must be in [0, max_completion_length={self.max_completion_length}], "
                f"got {self.overlong_buffer_len}"
            )
        for name in ("beta", "epsilon", "learning_rate", "weight_decay", "max_grad_norm", "reward_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        for name in ("param_dtype", "compute_dtype", "reference_dtype", "cache_dtype"):
            check_dtype(name, getattr(self, name), optional=name != "param_dtype")

    @property
    def overlong_buffer_tokens(self) -> int:
        """The overlong buffer in tokens: ``overlong_buffer_len``, or its fraction of the budget when None."""
        if self.overlong_buffer_len is None:
            return round(self.overlong_buffer_fraction * self.max_completion_length)
        return self.overlong_buffer_len

    def with_resolved_precision(self) -> GRPOConfig:
        """This config with its automatic (None) dtypes made concrete on this backend, as a run uses them and
        its checkpoints record them (a resumed run must match)."""
        compute = resolve_compute_dtype(self.compute_dtype)
        return dataclasses.replace(
            self,
            compute_dtype=compute,
            reference_dtype=self.reference_dtype or compute,
            cache_dtype=self.cache_dtype or compute,
        )

    @property
    def rows(self) -> int:
        """Completions per step: ``batch_size * num_generations``."""
        return self.batch_size * self.num_generations

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields plus the class name, for checkpoints and run directories."""
        return {"algo": ALGOS_BY_CLASS[type(self)], **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DAPOConfig(GRPOConfig):
    """DAPO: GRPO with different defaults (clip-higher, token-level loss, no KL, dynamic sampling,
    soft overlong punishment)."""

    loss_type: LossType = "dapo"
    beta: float = 0.0
    epsilon_high: float | None = 0.28
    dynamic_sampling: bool = True
    max_num_gen_batches: int = 10
    overlong_buffer_len: int | None = None
    overlong_penalty_factor: float = 1.0


ALGOS: dict[str, type[GRPOConfig]] = {"grpo": GRPOConfig, "dapo": DAPOConfig}
ALGOS_BY_CLASS = {cls: name for name, cls in ALGOS.items()}


def config_from_dict(raw: dict[str, Any]) -> GRPOConfig:
    """Inverse of :meth:`GRPOConfig.to_dict`; unknown fields are an error naming them."""
    raw = dict(raw)
    algo = raw.pop("algo", "grpo")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {sorted(ALGOS)}, got {algo!r}")
    cls = ALGOS[algo]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown {algo} config fields: {', '.join(unknown)}")
    return cls(**raw)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc line (the string literal under it in the class body), for ``--help``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in itertools.pairwise(body):
            is_doc = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
