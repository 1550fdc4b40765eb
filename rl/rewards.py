"""Math rewards: math-verify answer extraction and equivalence, graded in worker processes with a deadline.

``math_reward`` grades one completion in the calling process. math-verify guards its parsing with
``signal.alarm``, which only works in a main thread, so outside one that guard is switched off and the
caller is expected to bound the time itself, as :class:`RewardGrader` does: it grades in a pool of spawned
worker processes (each runs in its own main thread), waits at most ``timeout_s`` per completion, scores a
late or crashed one 0 and replaces the pool. No completion, however malformed, raises.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Sequence

from math_verify import parse, verify

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNBRACED = re.compile(r"(?:[^\s$\\]|\\[^\s\])])+")  # \boxed 4: up to a space, $, \] or \)
_WORDS = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|operatorname|begin|end)\s*\{[^{}]*\}")
_SYMBOL = re.compile(  # a Greek letter (group 1), another command (no group), or a Latin letter (group 2)
    r"\\((?i:alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|rho|sigma|tau"
    r"|upsilon|phi|chi|psi|omega))(?![A-Za-z])|\\[A-Za-z]+|([A-Za-z])"
)


def _last_box(text: str) -> tuple[str, int] | None:
    """The argument of the last ``\\boxed`` or ``\\fbox`` in ``text`` and the index just past it, or None.

    A braced argument (spaces before the brace allowed) runs to its balanced closing brace; an argument
    without braces is matched by :data:`_UNBRACED`. An unclosed or empty last box gives None.
    """
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    begin = len(text) - len(text[boxes[-1].end() :].lstrip())
    if not text.startswith("{", begin):
        word = _UNBRACED.match(text, begin)
        return (word.group(), word.end()) if word else None
    depth = 0
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """The answer in the last ``\\boxed{...}`` of ``text``, or None.

    ``\\boxed {...}``, ``\\boxed 4`` and ``\\fbox{...}`` count as boxes too.
    """
    found = _last_box(text)
    return None if found is None else found[0]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".")


def _symbols(latex: str) -> set[str]:
    """Latin letters and Greek-letter commands of ``latex``, with their case, outside words and command names."""
    return {
        "\\" + greek if greek else latin for greek, latin in _SYMBOL.findall(_WORDS.sub(" ", latex)) if greek or latin
    }


def _case_clash(a: str, b: str) -> bool:
    """Whether a symbol of one answer is in the other only in another case (``x`` / ``X``, ``\\delta`` / ``\\Delta``).

    math-verify lowercases every symbol it parses (latex2sympy2's ``lowercase_symbols``, which
    ``math_verify.parse`` does not expose), so it calls such pairs equal; in mathematics they differ.
    Words in ``\\text{...}`` are left to math-verify, which compares them case-insensitively.
    """
    symbols_a, symbols_b = _symbols(a), _symbols(b)

    def only_other_case(these: set[str], those: set[str]) -> bool:
        lowered = {s.lower() for s in those}
        return any(s not in those and s.lower() in lowered for s in these)

    return only_other_case(symbols_a, symbols_b) or only_other_case(symbols_b, symbols_a)


def math_reward(completion: str, final_answer: str) -> float:
    """1.0 when the completion's last boxed answer equals ``final_answer`` (math-verify), else 0.0.

    Only the last box counts, so listing several candidates earns nothing; without one the reward is 0.
    Case matters: equal strings (up to whitespace and a final period) score 1, and a pair math-verify
    accepts scores 0 when a letter of one side is on the other only in another case (:func:`_case_clash`).
    """
    try:
        answer = last_boxed(completion)
        if answer is None:
            return 0.0
        if _normalise(answer) == _normalise(final_answer):
            return 1.0
        guarded = threading.current_thread() is threading.main_thread()
        timeouts = {} if guarded else {"parsing_timeout": None}
        gold = parse(f"${final_answer}$", **timeouts)
        pred = parse(f"${answer}$", extraction_mode="first_match", **timeouts)
        if not gold or not pred:
            return 0.0
        equal = verify(gold, pred, **({} if guarded else {"timeout_seconds": None}))
        return float(equal and not _case_clash(answer, final_answer))
    except Exception:  # a reward never crashes training: an answer that cannot be graded is wrong
        return 0.0


def format_reward(completion: str) -> float:
    """1.0 when the completion ends with exactly one boxed answer (trailing whitespace allowed), else 0.0."""
    found = _last_box(completion)
    if found is None or len(_BOX.findall(completion)) != 1:
        return 0.0
    return float(not completion[found[1] :].strip())


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a daemon thread ends the worker once its parent is gone (a SIGKILLed trainer
    would otherwise leave its idle grading workers behind for good)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _grade_many(pairs: list[tuple[str, str]]) -> list[float]:
    return [math_reward(completion, answer) for completion, answer in pairs]


class RewardGrader:
    """Grades completions against answers in ``workers`` spawned processes, ``timeout_s`` per completion.

    Worker start-up (up to ``startup_timeout_s``) happens before the per-completion clock starts.

    Use as a context manager, or call :meth:`close`. ``workers=0`` grades in the calling process
    (math-verify's own alarm then bounds the time; only valid in the main thread).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, chunk: int = 16, startup_timeout_s: float = 120.0):
        self.workers, self.timeout_s, self.chunk = workers, timeout_s, chunk
        self.startup_timeout_s = startup_timeout_s
        self.timeouts = 0
        """Completions scored 0 because they hung or crashed a worker, since construction."""
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        """The pool, started and warmed (math-verify imported) before any deadline runs."""
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
            warm = [self._pool.submit(_grade_many, [("\\boxed{0.5}", "\\frac{1}{2}")]) for _ in range(self.workers)]
            cf.wait(warm, timeout=self.startup_timeout_s)
        return self._pool

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        pairs = list(zip(completions, answers, strict=True))
        if self.workers == 0:
            return _grade_many(pairs)
        chunks = [pairs[i : i + self.chunk] for i in range(0, len(pairs), self.chunk)]
        futures = [self._executor().submit(_grade_many, chunk) for chunk in chunks]
        rewards, broken = [], False
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                rewards += future.result(timeout=self.timeout_s * len(chunk))
            except (cf.TimeoutError, cf.CancelledError, cf.process.BrokenProcessPool):
                broken = True
                rewards += self._one_by_one(chunk)
        if broken:
            self._restart()
        return rewards

    def _one_by_one(self, chunk: list[tuple[str, str]]) -> list[float]:
        """Regrades a failed chunk one completion at a time in a fresh pool; the culprit scores 0."""
        self._restart()
        scores = []
        for pair in chunk:
            try:
                scores += self._executor().submit(_grade_many, [pair]).result(timeout=self.timeout_s)
            except (cf.TimeoutError, cf.process.BrokenProcessPool):
                scores.append(0.0)
                self.timeouts += 1
                self._restart()
        return scores

    def _restart(self) -> None:
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stops the worker processes."""
        self._restart()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
