"""Avg@k and unbiased Pass@k of a policy on math benchmarks, sampled with the KV-cache sampler.

Each problem gets n >= k completions (one key per completion from its benchmark id, so the tokens do
not depend on batching), graded with :func:`rl.rewards.math_reward`, the reward of training; a completion
is correct when its reward is positive. Avg@k is the mean accuracy over a problem's samples, then over
problems; Pass@j is the estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on Code".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rl.benchmarks import EvalProblem, parse_benches
from rl.config import ROLLOUT_ENGINES, RolloutEngine
from rl.rewards import RewardGrader, math_reward
from rl.rollout import row_keys, sample_rows
from saerl_jax.data.prompt import format_example, load_tokenizer, stop_ids
from saerl_jax.io import atomic_write
from saerl_jax.model import Qwen2, SamplingConfig, bucket_length, left_pad, load_pretrained

Grader = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al. 2021), which never forms the huge
    binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct_PK: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean correctness of each problem's samples (``[P, K]``, 0/1 entries)."""
    table = np.asarray(correct_PK, dtype=np.float64)
    if table.ndim != 2 or table.size == 0:
        raise ValueError(f"expected a non-empty [problems, samples] table, got shape {table.shape}")
    return float(table.mean(axis=1).mean())


def _counts(k: int, n: int | None, greedy: bool) -> tuple[int, int]:
    """(k, n) as evaluated: greedy is one sample; n defaults to k."""
    if greedy:
        return 1, 1
    n = k if n is None else n
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    return k, n


@dataclasses.dataclass(frozen=True)
class Samples:
    """A benchmark's completions, flattened problem-major (n per problem)."""

    texts: list[str]
    """Decoded completions, EOS and padding removed."""
    lengths: np.ndarray
    """Completion tokens ``[P * n]``, EOS included."""
    truncated: np.ndarray
    """``[P * n]`` bool: the completion hit ``max_new_tokens`` without an EOS."""


def _sample(model, tokenizer, problems, *, n, seed, batch_size, engine, desc, progress, **sampling) -> Samples:
    """n completions per problem, ``batch_size`` completions decoded at once by ``engine``
    (:func:`~rl.rollout.sample_rows`, as the trainer's rollouts); every prompt is left-padded to the bucket of
    the benchmark's longest."""
    eos_ids, pad_id = stop_ids(tokenizer)
    prompts = [format_example(tokenizer, p.question).input_ids for p in problems]
    ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)))
    graphdef, params = nnx.split(model)
    bar = tqdm(total=len(problems) * n, desc=desc, unit="completion", disable=not progress)
    out = sample_rows(
        graphdef,
        params,
        np.repeat(ids, n, axis=0),
        np.repeat(mask, n, axis=0),
        row_keys(seed, 0, [p.id for p in problems], n),
        sampling=SamplingConfig(**sampling),
        eos_ids=eos_ids,
        pad_id=pad_id,
        rows_per_call=batch_size,
        engine=engine,
        on_done=bar.update,
    )
    bar.close()
    texts, lengths, truncated = [], [], []
    for tokens, valid in zip(out.tokens_BN, out.mask_BN.astype(bool), strict=True):
        ended = np.isin(tokens, eos_ids) & valid
        texts.append(tokenizer.decode(tokens[valid & ~ended].tolist(), skip_special_tokens=True))
        lengths.append(int(valid.sum()))
        truncated.append(not ended.any())
    return Samples(texts, np.asarray(lengths), np.asarray(truncated))


def sample_and_grade(
    model: Qwen2,
    tokenizer,
    problems: Sequence[EvalProblem],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    engine: RolloutEngine = "continuous",
    grader: Grader | None = None,
    desc: str = "sample",
    progress: bool = True,
) -> tuple[np.ndarray, Samples]:
    """n completions per problem, sampled and graded as :func:`evaluate` does it.

    Completion j of problem ``id`` uses ``row_keys(seed, 0, [id], n)[j]``, so neither its tokens nor its
    score depend on ``batch_size`` or on the other problems.

    Returns:
      ``(scores_PN, samples)``: the reward of completion j of ``problems[i]`` at ``[i, j]`` (correct when
      positive; ``grader`` or :func:`math_reward`), and the completions flattened problem-major.
    """
    samples = _sample(
        model,
        tokenizer,
        problems,
        n=n,
        seed=seed,
        batch_size=batch_size,
        engine=engine,
        desc=desc,
        progress=progress,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
    )
    answers = [p.answer for p in problems for _ in range(n)]
    grade = grader or (lambda texts, answers: [math_reward(t, a) for t, a in zip(texts, answers, strict=True)])
    return np.asarray(grade(samples.texts, answers), dtype=np.float64).reshape(len(problems), n), samples


def _summary(correct_PN: np.ndarray, samples: Samples, k: int) -> dict:
    p, n = correct_PN.shape
    counts = correct_PN.sum(axis=1).astype(int)
    return {
        "n_problems": p,
        "k": k,
        "n": n,
        "avg_at_k": avg_at_k(correct_PN),
        "pass_at_k": {str(j): float(np.mean([pass_at_k(n, int(c), j) for c in counts])) for j in range(1, k + 1)},
        "mean_length": float(samples.lengths.mean()),
        "truncation_rate": float(samples.truncated.mean()),
    }


def _average(results: Mapping[str, dict]) -> dict:
    """The macro average over benchmarks (each counts once, whatever its size)."""
    rows = list(results.values())
    first = rows[0]
    return {
        "n_problems": sum(r["n_problems"] for r in rows),
        "k": first["k"],
        "n": first["n"],
        "avg_at_k": float(np.mean([r["avg_at_k"] for r in rows])),
        "pass_at_k": {j: float(np.mean([r["pass_at_k"][j] for r in rows])) for j in first["pass_at_k"]},
        "mean_length": float(np.mean([r["mean_length"] for r in rows])),
        "truncation_rate": float(np.mean([r["truncation_rate"] for r in rows])),
    }


def _problems_hash(problems: Sequence[EvalProblem]) -> str:
    digest = hashlib.sha1()
    for p in problems:
        digest.update(json.dumps(dataclasses.astuple(p)).encode())
    return digest.hexdigest()


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def _write_samples(path: Path, problems, samples: Samples, scores_PN: np.ndarray) -> None:
    n = scores_PN.shape[1]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, p in enumerate(problems):
                rows = slice(i * n, (i + 1) * n)
                record = {
                    **dataclasses.asdict(p),
                    "completions": samples.texts[rows],
                    "scores": scores_PN[i].tolist(),
                    "lengths": samples.lengths[rows].tolist(),
                    "truncated": samples.truncated[rows].tolist(),
                }
                f.write(json.dumps(record) + "\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def results_table(results: dict) -> str:
    """``results`` (from :func:`evaluate`) as a markdown table: a row per benchmark and the average row."""
    k = results["settings"]["k"]
    heads = [f"Avg@{k}", "Pass@1"] + ([f"Pass@{k}"] if k > 1 else []) + ["n", "mean length", "truncated"]
    lines = ["| benchmark | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    named = {**results["benchmarks"], "**average**": results["average"]}
    for name, r in named.items():
        cells = [r["avg_at_k"], r["pass_at_k"]["1"]] + ([r["pass_at_k"][str(k)]] if k > 1 else [])
        cells = [f"{100 * v:.1f}" for v in cells]
        cells += [str(r["n_problems"]), f"{r['mean_length']:.1f}", f"{100 * r['truncation_rate']:.1f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_markdown(path: Path, results: dict) -> None:
    s = results["settings"]
    sampling = "greedy" if s["greedy"] else f"temperature {s['temperature']}, top-p {s['top_p']}"
    header = (
        f"# Evaluation of {s['model'] or 'the model'}\n\n"
        f"k = {s['k']}, n = {s['n']} samples per problem, {sampling}, max new tokens {s['max_new_tokens']}, "
        f"seed {s['seed']}. Scores in percent; average = macro average over benchmarks.\n\n"
    )
    atomic_write(path, lambda tmp: Path(tmp).write_text(header + results_table(results)))


def evaluate(
    model: Qwen2,
    tokenizer,
    benchmarks: Mapping[str, Sequence[EvalProblem]],
    *,
    k: int = 8,
    n: int | None = None,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    seed: int = 0,
    greedy: bool = False,
    batch_size: int = 64,
    engine: RolloutEngine = "continuous",
    grader: Grader | None = None,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> dict:
    """Samples, grades and scores every benchmark.

    Args:
      model, tokenizer: the policy and its tokenizer (prompts are the chat prompts of training).
      benchmarks: name -> problems (names become file names under ``out``).
      k: Avg@k and Pass@1..Pass@k are reported.
      n: samples per problem (n >= k, default k); Pass@j uses all n.
      temperature, top_p, max_new_tokens: the sampler's settings.
      seed: completion j of problem ``id`` uses ``row_keys(seed, 0, [id], n)[j]``.
      greedy: one sample per problem at temperature 0 (k = n = 1).
      batch_size: completions decoded at once (static chunks, or the continuous engine's slots).
      engine: ``static`` or ``continuous`` (:attr:`rl.config.GRPOConfig.rollout_engine`); the same tokens.
      grader: ``(completions, answers) -> rewards``, e.g. a :class:`RewardGrader`; by default
        :func:`math_reward` in this process.
      progress: show a progress bar per benchmark.
      out: when given, writes ``benchmarks/NAME.json`` and ``samples/NAME.jsonl`` per benchmark, then
        ``results.json`` and ``results.md``; a benchmark whose ``benchmarks/NAME.json`` holds the same
        settings and problems is read back instead of evaluated again.
      model_name: recorded in the settings (and so part of what a resumed run must match).

    Returns:
      ``{"settings", "benchmarks": {name: result}, "average": result}``; a result holds ``n_problems``,
      ``k``, ``n``, ``avg_at_k``, ``pass_at_k`` (``{"1": ..., ..., "k": ...}``), ``mean_length`` (tokens,
      EOS included) and ``truncation_rate`` (completions that hit ``max_new_tokens``).
    """
    k, n = _counts(k, n, greedy)
    if not benchmarks or any(not problems for problems in benchmarks.values()):
        raise ValueError("need at least one benchmark, each with at least one problem")
    if greedy:
        temperature, top_p = 0.0, 1.0
    out = None if out is None else Path(out)
    sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    settings = dict(k=k, n=n, greedy=greedy, **sampling, seed=seed, model=model_name)
    results = {}
    for name, problems in benchmarks.items():
        key = {**settings, "problems": _problems_hash(problems)}
        done = None if out is None else out / "benchmarks" / f"{name}.json"
        if done is not None and done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("settings") == key:
                print(f"{name}: already evaluated with these settings ({done}), skipped")
                results[name] = saved["result"]
                continue
            print(f"{name}: {done} holds other settings, evaluating again")
        scores_PN, samples = sample_and_grade(
            model,
            tokenizer,
            problems,
            n=n,
            seed=seed,
            batch_size=batch_size,
            engine=engine,
            grader=grader,
            desc=name,
            progress=progress,
            **sampling,
        )
        results[name] = _summary((scores_PN > 0).astype(np.float64), samples, k)
        if done is not None:
            _write_samples(out / "samples" / f"{name}.jsonl", problems, samples, scores_PN)
            _write_json(done, {"settings": key, "result": results[name]})
    summary = {"settings": settings, "benchmarks": results, "average": _average(results)}
    if out is not None:
        _write_json(out / "results.json", summary)
        _write_markdown(out / "results.md", summary)
    return summary


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalJob:
    """Options of ``saerl eval``."""

    model: Path
    """Hugging Face Qwen2 directory."""
    bench: tuple[str, ...]
    """``NAME=FILE`` or ``NAME:LAYOUT=FILE`` per benchmark (see :func:`rl.benchmarks.parse_benches`)."""
    out: Path
    """Output directory: results.json, results.md, benchmarks/, samples/."""
    tokenizer: Path | None = None
    """Tokenizer directory; the model directory when None."""
    columns: tuple[str, ...] = ()
    """``NAME:question=COL,answer=COL[,id=COL]`` column mappings for benchmarks read with the jsonl layout."""
    k: int = 8
    """Avg@k and Pass@1..Pass@k are reported."""
    n: int | None = None
    """Samples per problem (>= k); k when None."""
    temperature: float = 0.6
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    max_new_tokens: int = 1024
    """Completion budget in tokens."""
    greedy: bool = False
    """One greedy completion per problem (k = n = 1)."""
    limit: int | None = None
    """Keep the first ``limit`` problems of each benchmark."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 64
    """Completions decoded at once (static chunks, or the continuous engine's slots)."""
    engine: RolloutEngine = "continuous"
    """Sampler: ``static`` chunks or ``continuous`` batching (the same tokens)."""
    reward_workers: int = 2
    """Grading processes; 0 grades in this process."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        _counts(self.k, self.n, self.greedy)
        parse_benches(self.bench, self.columns)
        if self.batch_size < 1 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size, max_new_tokens and limit must be at least 1")
        if self.engine not in ROLLOUT_ENGINES:
            raise ValueError(f"engine must be one of {ROLLOUT_ENGINES}, got {self.engine!r}")


def run_eval(job: EvalJob) -> dict:
    """Loads the benchmarks, model and tokenizer of ``job`` and runs :func:`evaluate` into ``job.out``."""
    benchmarks = {spec.name: spec.load(job.limit) for spec in parse_benches(job.bench, job.columns)}
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    model = load_pretrained(job.model)
    grader = RewardGrader(workers=job.reward_workers) if job.reward_workers > 0 else None
    try:
        return evaluate(
            model,
            tokenizer,
            benchmarks,
            k=job.k,
            n=job.n,
            temperature=job.temperature,
            top_p=job.top_p,
            max_new_tokens=job.max_new_tokens,
            seed=job.seed,
            greedy=job.greedy,
            batch_size=job.batch_size,
            engine=job.engine,
            grader=grader,
            progress=job.progress,
            out=job.out,
            model_name=str(job.model),
        )
    finally:
        if grader is not None:
            grader.close()
