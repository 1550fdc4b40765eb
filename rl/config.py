"""Frozen configs of the RL trainer. Names follow TRL's ``GRPOConfig`` / ``PPOConfig`` / ``DPOConfig`` where
one exists.

``GRPOConfig`` defaults to the GRPO of DeepSeekMath (per-sequence mean, KL to a frozen reference with
``beta = 0.04``, symmetric clip). ``DAPOConfig`` only changes defaults, as in the DAPO paper (Yu et al.,
2025): clip-higher 0.2 / 0.28, token-level loss, no KL, dynamic sampling and soft overlong punishment.

``PPOConfig`` and ``DPOConfig`` share everything a run needs besides its objective (batches, sampling,
optimizer, precision, loop) with ``GRPOConfig`` and add their own objective fields; GRPO's objective fields
that mean nothing to them must stay at their defaults (checked), so a config never carries an option that
silently does nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from typing import Any, ClassVar, Literal, get_args

from saerl_jax.precision import DType, check_dtype, resolve_compute_dtype

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]
FilterMetric = Literal["accuracy", "reward"]
KLEstimator = Literal["k1", "k3"]
ValueModel = Literal["separate", "shared"]
DPOLossType = Literal["sigmoid", "ipo"]
DPOPairs = Literal["online", "offline"]
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

    loss_types: ClassVar[tuple[str, ...]] = get_args(LossType)
    """The ``loss_type`` values this algorithm has (a class constant, not a field)."""
    min_generations = 2
    """G below this is refused (GRPO's advantages compare the completions of one prompt)."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "num_generations", "gradient_accumulation_steps", "max_prompt_length")
        positive += ("max_completion_length",)
        positive += ("num_iterations", "max_num_gen_batches", "max_steps", "save_steps", "logprob_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        choices = {
            "loss_type": self.loss_types,
            "importance_sampling_level": ("token", "sequence"),
            "scale_rewards": ("group", "batch", "none"),
            "filter_groups_metric": ("accuracy", "reward"),
            "rollout_engine": ROLLOUT_ENGINES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_generations < self.min_generations:
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
    def keeps_reference(self) -> bool:
        """Whether the run keeps a frozen copy of the initial policy (the KL reference)."""
        return self.beta > 0

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


_GRPO_OBJECTIVE = (
    "loss_type",
    "importance_sampling_level",
    "scale_rewards",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "dynamic_sampling",
    "filter_groups_metric",
    "max_num_gen_batches",
)
"""GRPO objective fields that PPO and DPO do not read (they must keep their defaults there)."""


def _check_unused(cfg: GRPOConfig, names: tuple[str, ...]) -> None:
    defaults = GRPOConfig()
    changed = [name for name in names if getattr(cfg, name) != getattr(defaults, name)]
    if changed:
        algo = ALGOS_BY_CLASS[type(cfg)]
        raise ValueError(f"{', '.join(changed)}: GRPO options that {algo} does not use; leave them at their defaults")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(GRPOConfig):
    """PPO with a learned value model (Ouyang et al. 2022; option names from TRL's ``PPOConfig``): the math
    reward at the last token, a per-token KL penalty to the initial policy in the reward, GAE over the
    completion tokens, whitened advantages, and ``num_ppo_epochs`` passes of ``num_mini_batches`` clipped
    updates of policy and value per rollout batch."""

    min_generations = 1

    num_generations: int = 1
    """Completions sampled per prompt (PPO needs no group: 1 as in TRL; more samples the prompt again)."""
    beta: float = 0.0
    """Unused by PPO (its KL penalty is ``kl_coef``, in the reward); must stay 0."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the initial policy, subtracted from the reward."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimate in the reward: k1 (``logp - ref``) or k3 (``exp(ref - logp) - (ref - logp) - 1``)."""
    gamma: float = 1.0
    """Discount over completion tokens."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value prediction around the rollout's value."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    num_ppo_epochs: int = 4
    """Passes over a rollout batch."""
    num_mini_batches: int = 1
    """Optimizer updates per pass (the rows are reshuffled every pass)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch before GAE."""
    value_model: ValueModel = "separate"
    """``separate``: a critic with its own Qwen2 trunk, initialised from the policy's (as in TRL);
    ``shared``: a scalar head on the policy's trunk (half the memory; value gradients reach the policy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unused(self, _GRPO_OBJECTIVE)
        if self.beta != 0:
            raise ValueError(f"beta must be 0 for ppo (its KL weight is kl_coef), got {self.beta}")
        for name in ("num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        choices = {"kl_estimator": ("k1", "k3"), "value_model": ("separate", "shared")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        split = self.num_mini_batches * self.gradient_accumulation_steps
        if self.rows % split:
            raise ValueError(
                f"batch_size * num_generations = {self.rows} completions do not split into num_mini_batches="
                f"{self.num_mini_batches} x gradient_accumulation_steps={self.gradient_accumulation_steps} equal parts"
            )

    @property
    def keeps_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per rollout batch."""
        return self.num_ppo_epochs * self.num_mini_batches


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(GRPOConfig):
    """DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference pairs the run builds from its own
    graded rollouts: per prompt, the first correct completion is chosen and the first incorrect one
    rejected; prompts without both are counted and skipped. Option names from TRL's ``DPOConfig``."""

    loss_types = get_args(DPOLossType)

    num_generations: int = 4
    """Completions sampled per prompt to find a correct and an incorrect one."""
    beta: float = 0.1
    """DPO's inverse temperature (IPO's regularisation tau): how far from the reference the policy may move."""
    loss_type: DPOLossType = "sigmoid"  # type: ignore[assignment]
    """``sigmoid`` (DPO) or ``ipo`` (squared loss on per-token-averaged log-ratios, as in TRL)."""
    pairs: DPOPairs = "online"
    """``online``: pairs sampled from the policy of the last refresh (iterative DPO); ``offline``: pairs
    from the initial policy, built once per prompt and stored in the run directory (``pairs.jsonl``)."""
    pair_refresh_steps: int = 1
    """Online: steps between refreshes of the pair-sampling policy (1: always the current policy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unused(self, tuple(name for name in _GRPO_OBJECTIVE if name != "loss_type"))
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 for dpo, got {self.beta}")
        if self.pairs not in ("online", "offline"):
            raise ValueError(f"pairs must be one of ('online', 'offline'), got {self.pairs!r}")
        if self.pair_refresh_steps < 1:
            raise ValueError(f"pair_refresh_steps must be >= 1, got {self.pair_refresh_steps}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size={self.batch_size} pairs do not split into gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps} equal micro-batches"
            )

    @property
    def keeps_reference(self) -> bool:
        return True


ALGOS: dict[str, type[GRPOConfig]] = {"grpo": GRPOConfig, "dapo": DAPOConfig, "ppo": PPOConfig, "dpo": DPOConfig}
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
    fields = {f.name for f in dataclasses.fields(cls)}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in itertools.pairwise(body):
            is_doc = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)
            documented = isinstance(node, ast.AnnAssign) and is_doc and isinstance(after.value.value, str)
            if documented and node.target.id in fields:
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
