"""The two data-selection baselines the SAERL paper reports beating, as library functions.

**Rollout-accuracy curriculum**: the external signal SAERL claims to replace. The base policy samples k
completions per problem (the evaluation sampler of :mod:`rl.evaluate`, so a completion's key depends only on
the seed, the problem id and its index, never on batching), each is graded, and a problem's pass rate
c / k orders the curriculum easy to hard: :func:`rollout_difficulty` maps it onto the 1-10 ``difficulty``
field that the trainer's ``difficulty`` sampler sorts by, and :func:`write_rollout_pool` writes the pool
with it. The cost is k full generations per problem (:attr:`PassRates.cost`).

**Hidden-state-compression selection**: the paper names it without details; our reading is:

1. dense hidden states at the SAE's layer, pooled per problem as the dense feature store holds them
   (``saerl extract --dense``: mean and max over the prompt and solution spans; the shallow metadata
   columns are dropped);
2. columns standardised, then compressed to ``n_components`` with PCA (or a Gaussian random projection);
3. a diversity-driven subset at the same data budget: greedy k-center (farthest-point) selection in the
   compressed space, starting from the problem nearest the mean, so every region of the space is covered
   before any is sampled twice.

Its cost, like SAERL's, is one forward pass per problem up to the capture layer (:func:`extraction_cost`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.random_projection import GaussianRandomProjection
from sklearn.utils.validation import check_array

from rl.benchmarks import EvalProblem
from rl.evaluate import Grader, sample_and_grade
from saerl_jax.data.problems import Problem, write_problems_jsonl
from saerl_jax.data.prompt import format_example
from saerl_jax.features import METADATA_COLUMNS, load_store
from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2

METHODS = ("pca", "random")


@dataclasses.dataclass(frozen=True, eq=False)
class PassRates:
    """Each problem's empirical pass rate over k sampled completions of the base policy."""

    ids: tuple[str, ...]
    """Problem ids, in the order they were given."""
    pass_rate: np.ndarray
    """``[N]`` float64: correct completions / k of ``ids[i]``."""
    k: int
    """Completions sampled per problem."""
    cost: dict
    """``samples`` (N * k), ``prompt_tokens`` (prefilled: each completion prefills its own prompt),
    ``generated_tokens`` (completion tokens, EOS included) and ``seconds`` (sampling and grading)."""
    settings: dict
    """What made the rates (k, temperature, max_new_tokens, seed, model, problems hash); a saved file is
    reused only when these match."""

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the rates as JSON (atomically); returns the path."""
        record = {
            "ids": list(self.ids),
            "pass_rate": self.pass_rate.tolist(),
            "k": self.k,
            "cost": self.cost,
            "settings": self.settings,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PassRates:
        """Reads what :meth:`save` wrote; a file that is not such a record is a ValueError naming it."""
        try:
            record = json.loads(Path(path).read_text())
            rates = cls(
                ids=tuple(record["ids"]),
                pass_rate=np.asarray(record["pass_rate"], np.float64),
                k=int(record["k"]),
                cost=dict(record["cost"]),
                settings=dict(record["settings"]),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a pass-rates file ({err!r})") from err
        if rates.pass_rate.shape != (len(rates.ids),):
            raise ValueError(f"{path}: {len(rates.ids)} ids but pass rates of shape {rates.pass_rate.shape}")
        return rates


def _problems_hash(problems: Sequence[Problem]) -> str:
    """sha1 over every problem's id, question and answer, in order: what the pass rates were measured on."""
    digest = hashlib.sha1()
    for p in problems:
        digest.update(json.dumps([p.id, p.question, p.final_answer]).encode())
    return digest.hexdigest()


def _by_id(problems: Sequence[Problem]) -> dict[str, Problem]:
    """``{id: problem}``; an id given twice is a ValueError naming it."""
    by_id: dict[str, Problem] = {}
    for p in problems:
        if p.id in by_id:
            raise ValueError(f"problem id {p.id!r} is given twice")
        by_id[p.id] = p
    return by_id


def rollout_pass_rates(
    model: Qwen2,
    tokenizer,
    problems: Sequence[Problem],
    *,
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 256,
    grader: Grader | None = None,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> PassRates:
    """The base policy's pass rate over k samples per problem (top-p 1), graded like training's reward.

    Args:
      model, tokenizer: the base policy and its tokenizer (prompts are the chat prompts of training).
      problems: the pool; ids must be distinct.
      k: completions per problem; completion j of problem ``id`` uses ``row_keys(seed, 0, [id], k)[j]``.
      temperature, max_new_tokens: the sampler's settings.
      seed: sampling seed.
      batch_size: completions per sampler call (speed only: the rates do not depend on it).
      grader: ``(completions, answers) -> rewards`` (correct when positive); by default
        :func:`rl.rewards.math_reward` in this process.
      progress: show a progress bar.
      out: a JSON file: when it holds rates of the same settings and problems they are returned without
        sampling; otherwise the new rates are saved there.
      model_name: the model's name or path, part of the settings a saved file must match.

    Returns:
      The rates, in the order of ``problems``.
    """
    if not problems:
        raise ValueError("need at least one problem")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _by_id(problems)
    settings = dict(
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        model=model_name,
        problems=_problems_hash(problems),
    )
    if out is not None and Path(out).is_file():
        saved = PassRates.load(out)
        if saved.settings == settings:
            print(f"pass rates: {out} holds these settings and problems, reused")
            return saved
        print(f"pass rates: {out} holds other settings or problems, sampling again")
    start = time.perf_counter()
    scores_PK, samples = sample_and_grade(
        model,
        tokenizer,
        [EvalProblem(p.id, p.question, p.final_answer) for p in problems],
        n=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        grader=grader,
        desc="pass rates",
        progress=progress,
    )
    cost = {
        "samples": len(problems) * k,
        "prompt_tokens": k * sum(len(format_example(tokenizer, p.question).input_ids) for p in problems),
        "generated_tokens": int(samples.lengths.sum()),
        "seconds": time.perf_counter() - start,
    }
    rates = PassRates(
        ids=tuple(p.id for p in problems),
        pass_rate=(scores_PK > 0).mean(axis=1),
        k=k,
        cost=cost,
        settings=settings,
    )
    if out is not None:
        rates.save(out)
    return rates


def rollout_difficulty(pass_rate: np.ndarray, k: int) -> np.ndarray:
    """``1 + 9 * (1 - pass_rate)``: difficulty in [1, 10], 1 for a problem every sample solves.

    Args:
      pass_rate: ``[N]`` rates c / k with integer c in [0, k] (checked).
      k: samples each rate was measured over.
    """
    rate = np.asarray(pass_rate, np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    correct = rate * k
    if not np.all((rate >= 0) & (rate <= 1) & np.isclose(correct, np.round(correct))):
        raise ValueError(f"pass rates must be c / {k} for integer c in [0, {k}]")
    return 1.0 + 9.0 * (1.0 - rate)


def write_rollout_pool(problems: Sequence[Problem], rates: PassRates, path: str | os.PathLike) -> Path:
    """Writes ``problems`` as JSONL in their order, with ``difficulty`` replaced by :func:`rollout_difficulty`.

    Raises:
      ValueError: a problem has no rate (naming its id).
    """
    difficulty = dict(zip(rates.ids, rollout_difficulty(rates.pass_rate, rates.k).tolist(), strict=True))
    missing = next((p.id for p in problems if p.id not in difficulty), None)
    if missing is not None:
        raise ValueError(f"problem {missing!r} has no pass rate ({len(rates.ids)} problems were sampled)")
    return write_problems_jsonl([dataclasses.replace(p, difficulty=difficulty[p.id]) for p in problems], path)


def compressed_selection(
    features_NF: np.ndarray, budget: int, *, n_components: int = 32, method: str = "pca", seed: int = 0
) -> np.ndarray:
    """``budget`` distinct row indices (int64), in selection order, covering the compressed feature space.

    Columns are standardised (a constant column stays zero), compressed to ``min(n_components, N, F)``
    dimensions by PCA or a Gaussian random projection (``method="random"``), then chosen by greedy
    k-center: first the row nearest the mean, then each time the row farthest from all chosen so far
    (ties: the lowest index). O(N * budget * n_components) time, O(N) extra memory.

    Raises:
      ValueError: ``budget`` not in [1, N] or an unknown ``method``.
    """
    x_NF = check_array(features_NF, dtype=[np.float64, np.float32])  # float32 stores stay float32
    n, f = x_NF.shape
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in [1, {n}] (the number of rows), got {budget}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    components = max(1, min(n_components, n, f))
    z_NF = StandardScaler().fit_transform(x_NF)
    if method == "pca":
        with np.errstate(divide="ignore", invalid="ignore"):  # explained-variance ratios of constant data
            z_NC = PCA(n_components=components, random_state=seed).fit_transform(z_NF)
    else:
        z_NC = GaussianRandomProjection(n_components=components, random_state=seed).fit_transform(z_NF)
    return _k_center(z_NC.astype(np.float64), budget)


def _k_center(z_NC: np.ndarray, budget: int) -> np.ndarray:
    """Greedy farthest-point order of ``budget`` rows, from the row nearest the mean; chosen rows are never
    chosen again (their distance is set to -inf), so duplicate rows are still distinct picks."""
    sq_N = np.einsum("nc,nc->n", z_NC, z_NC)

    def sq_distances(row: int) -> np.ndarray:
        return np.maximum(sq_N - 2.0 * (z_NC @ z_NC[row]) + sq_N[row], 0.0)

    order = np.empty(budget, np.int64)
    order[0] = np.argmin(np.sum((z_NC - z_NC.mean(axis=0)) ** 2, axis=1))
    nearest_N = sq_distances(order[0])
    nearest_N[order[0]] = -np.inf
    for i in range(1, budget):
        order[i] = np.argmax(nearest_N)
        nearest_N = np.minimum(nearest_N, sq_distances(order[i]))
        nearest_N[order[i]] = -np.inf
    return order


def write_selected_pool(problems: Sequence[Problem], indices: Sequence[int], path: str | os.PathLike) -> Path:
    """Writes ``problems[i]`` for each of ``indices`` as JSONL, in selection order."""
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices) or not all(0 <= i < len(problems) for i in indices):
        raise ValueError(f"indices must be distinct and in [0, {len(problems)})")
    return write_problems_jsonl([problems[i] for i in indices], path)


def select_from_store(store_dir: str | os.PathLike, problems: Sequence[Problem], budget: int, **kw) -> list[Problem]:
    """:func:`compressed_selection` over a dense feature store's pooled hidden states (metadata columns
    dropped); returns the chosen problems in selection order. ``kw`` goes to :func:`compressed_selection`.

    Raises:
      ValueError: the store is not dense (``saerl extract --dense``), or a store id is not among
        ``problems`` or a problem not in the store (naming one id).
    """
    store = load_store(store_dir)
    if store.manifest.get("latent_ids") is not None:
        raise ValueError(f"{store_dir}: not a dense store (made without --dense)")
    by_id = _by_id(problems)
    extra = next((i for i in store.ids if i not in by_id), None)
    if extra is not None:
        raise ValueError(f"{store_dir}: id {extra!r} is not among the {len(problems)} problems")
    in_store = set(store.ids)
    absent = next((p.id for p in problems if p.id not in in_store), None)
    if absent is not None:
        raise ValueError(f"problem {absent!r} is not in the feature store {store_dir}")
    hidden = [j for j, name in enumerate(store.columns) if name not in METADATA_COLUMNS]
    indices = compressed_selection(store.features[:, hidden], budget, **kw)
    return [by_id[store.ids[i]] for i in indices]


def extraction_cost(store_dir: str | os.PathLike, tokenizer=None) -> dict:
    """What making a feature store cost, to set beside :attr:`PassRates.cost`.

    Returns:
      ``forward_sequences``: problems in the store, one forward pass each up to ``layer`` (of the model's
      blocks; no generation). ``selection_sequences``: problems run once more to choose the SAE's latents
      (0 for a dense store or given latent ids; training the SAE is not counted). ``span_tokens``: tokens
      in the pooled spans (the store's ``prompt_tokens`` + ``solution_tokens`` columns). ``tokens``: every
      token forwarded (padding excluded), present when it can be known: stores that pool the whole chat
      prompt (``prompt_span="template"``) record it; stores that pool the question alone (the default) do
      not record the chat template's tokens, which are then counted with ``tokenizer`` when it is given
      (the template is tokenized apart from the question, so it costs the same in every sequence).
    """
    store = load_store(store_dir)
    options = store.manifest["options"]
    n = len(store.ids)
    selection = 0
    if store.manifest.get("latent_ids") is not None and options.get("latent_ids_file") is None:
        selection = n if options.get("selection_sample") is None else min(options["selection_sample"], n)
    cost = {"forward_sequences": n, "selection_sequences": selection, "layer": store.manifest["layer"]}
    span_tokens = int(store.column("prompt_tokens").sum() + store.column("solution_tokens").sum())
    cost["span_tokens"] = span_tokens
    if options.get("prompt_span") == "template":
        cost["tokens"] = span_tokens
    elif tokenizer is not None:
        example = format_example(tokenizer, "1")
        (p0, p1), (q0, q1) = example.prompt_span, example.question_span
        cost["tokens"] = span_tokens + n * ((p1 - p0) - (q1 - q0))
    return cost
