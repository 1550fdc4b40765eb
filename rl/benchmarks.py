"""Math benchmark files in their usual column layouts, read into :class:`EvalProblem` lists.

Each layout reads a local copy (``.jsonl``/``.json`` as JSON lines, or ``.parquet``) the way the common
Hugging Face and Qwen2.5-Math evaluation copies lay it out:

==============  =====================================  ===================================================
layout          question column                        answer column
==============  =====================================  ===================================================
gsm8k           ``question``                           ``answer``: the number after the last ``#### ``,
                                                       commas removed
math500         ``problem``                            ``answer``; id from ``unique_id`` when present
aime24          ``problem`` or ``Problem``             ``answer`` or ``Answer``; id from ``id`` or ``ID``
amc23           ``question``                           ``answer``, a number (``27.0`` is read as ``27``)
minervamath     ``problem`` (or ``question``)          ``answer`` when present, else the last
                                                       ``\\boxed{}`` of ``solution``
olympiadbench   ``question``                           ``final_answer``, a list of strings joined by ", "
                                                       (enclosing ``$`` removed)
jsonl           ``columns["question"]``                ``columns["answer"]``; id from ``columns["id"]``
==============  =====================================  ===================================================

MinervaMath is assumed in the Qwen2.5-Math ``evaluation/data/minerva_math/test.jsonl`` layout (``problem``,
``solution`` with the answer boxed, ``type``, ``idx``); copies with an ``answer`` column (``math-ai/
minervamath``: ``question``, ``answer``) read that column instead. Rows without an id column get their
0-based position in the file. Bad input raises :class:`ProblemDataError` naming the file, the row
(``file.jsonl:3`` is the 1-based line, ``file.parquet: row index 2`` the 0-based row) and the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from rl.rewards import last_boxed
from saerl_jax.data.problems import ProblemDataError, RowError, jsonl_rows, located, parquet_rows, row_where


@dataclasses.dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem."""

    id: str
    """The file's id column, or the row's 0-based position in the file."""
    question: str
    """The problem statement, as put to the model."""
    answer: str
    """The reference final answer, graded with :func:`rl.rewards.math_reward`."""


def _field(raw: dict, *names: str) -> tuple[str, object]:
    """``(column, value)`` of the first of ``names`` the row has, or a ``RowError`` naming them."""
    for name in names:
        if name in raw:
            if raw[name] is None:
                raise RowError(name, f"field {name!r} is null")
            return name, raw[name]
    shown = " or ".join(repr(n) for n in names)
    raise RowError(names[0], f"field {shown} is missing", missing_column=names[0])


def _text(raw: dict, *names: str) -> str:
    """A non-empty string (integers and finite numbers converted, ``27.0`` as ``27``) from the first of ``names``."""
    name, value = _field(raw, *names)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError(name, f"field {name!r} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(name, f"field {name!r} must be finite, got {value!r}")
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    if not text:
        raise RowError(name, f"field {name!r} is empty")
    return text


def _optional_id(raw: dict, *names: str) -> str | None:
    present = [n for n in names if raw.get(n) is not None]
    return _text(raw, present[0]) if present else None


# A layout turns one raw row into (question, answer, id or None).
Layout = Callable[[dict], tuple[str, str, str | None]]


def _gsm8k(raw: dict) -> tuple[str, str, str | None]:
    solution = _text(raw, "answer")
    if "####" not in solution:
        raise RowError("answer", "field 'answer' has no '#### ' final answer")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise RowError("answer", "field 'answer' is empty after '####'")
    return _text(raw, "question"), answer, _optional_id(raw, "id")


def _math500(raw: dict) -> tuple[str, str, str | None]:
    return _text(raw, "problem"), _text(raw, "answer"), _optional_id(raw, "unique_id", "id")


def _aime24(raw: dict) -> tuple[str, str, str | None]:
    return _text(raw, "problem", "Problem"), _text(raw, "answer", "Answer"), _optional_id(raw, "id", "ID")


def _amc23(raw: dict) -> tuple[str, str, str | None]:
    answer = _text(raw, "answer")
    try:
        float(answer)
    except ValueError:
        raise RowError("answer", f"field 'answer' must be a number, got {answer!r:.40}") from None
    return _text(raw, "question"), answer, _optional_id(raw, "id")


def _minervamath(raw: dict) -> tuple[str, str, str | None]:
    question = _text(raw, "problem", "question")
    if "answer" in raw:
        answer = _text(raw, "answer")
    else:
        boxed = last_boxed(_text(raw, "solution", "answer"))
        if not boxed or not boxed.strip():
            raise RowError("solution", "field 'solution' has no \\boxed{} answer (and there is no 'answer')")
        answer = boxed.strip()
    return question, answer, _optional_id(raw, "idx", "id")


def _olympiadbench(raw: dict) -> tuple[str, str, str | None]:
    name, answers = _field(raw, "final_answer")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise RowError(name, f"field 'final_answer' must be a non-empty list of strings, got {answers!r:.60}")
    parts = [a.strip().strip("$").strip() for a in answers]
    if not all(parts):
        raise RowError(name, "field 'final_answer' holds an empty answer")
    return _text(raw, "question"), ", ".join(parts), _optional_id(raw, "id")


def _generic(raw: dict, columns: Mapping[str, str]) -> tuple[str, str, str | None]:
    ident = _text(raw, columns["id"]) if "id" in columns else None
    return _text(raw, columns["question"]), _text(raw, columns["answer"]), ident


def _rows(path: Path, wanted: Iterable[str], available: dict[str, None]):
    """``(row number, raw row or RowError)``: JSON lines or parquet (only the ``wanted`` columns read).

    ``available`` receives the parquet file's columns.
    """
    if not path.is_file():
        raise ProblemDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return jsonl_rows(path, {})
    if suffix == ".parquet":  # keys are not schema fields here, so no column is required up front
        return parquet_rows(path, {f"_{c}": c for c in wanted}, set(), available)
    raise ProblemDataError(f"{path}: unsupported file type {suffix!r} (expected .parquet, .jsonl or .json)")


_COLUMNS = {  # every column a layout may read (parquet files are read column-wise)
    "gsm8k": ("question", "answer", "id"),
    "math500": ("problem", "answer", "unique_id", "id"),
    "aime24": ("problem", "Problem", "answer", "Answer", "id", "ID"),
    "amc23": ("question", "answer", "id"),
    "minervamath": ("problem", "question", "solution", "answer", "idx", "id"),
    "olympiadbench": ("question", "final_answer", "id"),
}


def _load(path: str | os.PathLike, layout: Layout, wanted: Iterable[str], limit: int | None) -> list[EvalProblem]:
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    problems, first_row, available = [], {}, {}
    rows = _rows(path, wanted, available)
    for position, (row, raw) in enumerate(rows):
        try:
            if isinstance(raw, RowError):
                raise raw
            question, answer, ident = layout(raw)
            ident = str(position) if ident is None else ident
            if ident in first_row:
                raise RowError("id", f"duplicate id {ident!r} (first at {row_where(path, first_row[ident])})")
        except RowError as err:
            reason = err.reason
            if err.missing_column is not None:  # a parquet row holds only the columns read: name all of them
                columns = available if path.suffix.lower() == ".parquet" else raw
                reason += f" (columns: {', '.join(columns) or 'none'})"
            raise ProblemDataError(located(path, row, reason)) from None
        first_row[ident] = row
        problems.append(EvalProblem(ident, question, answer))
        if limit is not None and len(problems) >= limit:
            break
    rows.close()
    if not problems:
        raise ProblemDataError(f"{path}: no rows")
    return problems


def _check_columns(columns: Mapping[str, str]) -> None:
    unknown = sorted(set(columns) - {"question", "answer", "id"})
    missing = sorted({"question", "answer"} - set(columns))
    if unknown or missing:
        raise ValueError(f"columns map question, answer and optionally id; unknown {unknown}, missing {missing}")


def load_jsonl(path: str | os.PathLike, *, columns: Mapping[str, str], limit: int | None = None) -> list[EvalProblem]:
    """Loads any JSON-lines or parquet file through a column mapping.

    Args:
      path: the file.
      columns: ``{"question": COL, "answer": COL}`` and optionally ``"id": COL``.
      limit: keep the first ``limit`` problems.
    """
    _check_columns(columns)
    return _load(path, functools.partial(_generic, columns=dict(columns)), columns.values(), limit)


def _layout_loader(name: str, layout: Layout) -> Callable[..., list[EvalProblem]]:
    def load(path: str | os.PathLike, *, limit: int | None = None) -> list[EvalProblem]:
        return _load(path, layout, _COLUMNS[name], limit)

    load.__name__ = f"load_{name}"
    load.__doc__ = f"Loads a {name} file (see the module docstring for the layout); ``limit`` keeps the first rows."
    return load


LOADERS: dict[str, Callable[..., list[EvalProblem]]] = {
    "gsm8k": _layout_loader("gsm8k", _gsm8k),
    "math500": _layout_loader("math500", _math500),
    "aime24": _layout_loader("aime24", _aime24),
    "amc23": _layout_loader("amc23", _amc23),
    "minervamath": _layout_loader("minervamath", _minervamath),
    "olympiadbench": _layout_loader("olympiadbench", _olympiadbench),
    "jsonl": load_jsonl,
}
"""Layout name -> loader ``(path, *, limit=None) -> list[EvalProblem]`` (``jsonl`` also takes ``columns=``)."""


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One ``--bench`` of ``saerl eval``: a display name, the layout that reads the file, the file."""

    name: str
    layout: str
    path: Path
    columns: Mapping[str, str] | None = None
    """The column mapping of the ``jsonl`` layout."""

    def load(self, limit: int | None = None) -> list[EvalProblem]:
        """The benchmark's problems (the first ``limit`` when given)."""
        if self.layout == "jsonl":
            return load_jsonl(self.path, columns=self.columns or {}, limit=limit)
        return LOADERS[self.layout](self.path, limit=limit)


def _parse_columns(text: str) -> tuple[str, dict[str, str]]:
    name, sep, pairs = text.partition(":")
    mapping = dict(pair.partition("=")[::2] for pair in pairs.split(",") if pair)
    if not sep or not name or not mapping or not all(mapping.values()):
        raise ValueError(f"--columns {text!r}: expected NAME:question=COL,answer=COL[,id=COL]")
    try:
        _check_columns(mapping)
    except ValueError as err:
        raise ValueError(f"--columns {text!r}: {err}") from None
    return name, mapping


def parse_benches(benches: Iterable[str], columns: Iterable[str] = ()) -> list[BenchSpec]:
    """Parses ``NAME=FILE`` / ``NAME:LAYOUT=FILE`` specs and ``NAME:question=COL,answer=COL[,id=COL]`` mappings.

    ``NAME=FILE`` reads FILE with the layout called NAME (case-insensitive) or, when ``columns`` maps NAME,
    with the ``jsonl`` layout; ``NAME:LAYOUT=FILE`` names the layout. Names are used in file names, so
    they hold only letters, digits, ``_``, ``-`` and ``.``; each may be given once.
    """
    mappings = dict(_parse_columns(text) for text in columns)
    specs: dict[str, BenchSpec] = {}
    for text in benches:
        head, sep, path = text.partition("=")
        name, _, layout = head.partition(":")
        if not sep or not name or not path:
            raise ValueError(f"--bench {text!r}: expected NAME=FILE or NAME:LAYOUT=FILE")
        if not all(ch.isalnum() or ch in "_-." for ch in name) or name.startswith("."):
            raise ValueError(f"--bench {text!r}: a name holds only letters, digits, '_', '-' and '.'")
        layout = layout.lower() or ("jsonl" if name in mappings else name.lower())
        if layout not in LOADERS:
            raise ValueError(
                f"--bench {text!r}: unknown layout {layout!r} (layouts: {', '.join(LOADERS)}; "
                f"or give --columns {name}:question=COL,answer=COL for the jsonl layout)"
            )
        if (layout == "jsonl") != (name in mappings):
            raise ValueError(f"--bench {text!r}: --columns {name}:... goes with the jsonl layout, and only with it")
        if name in specs:
            raise ValueError(f"--bench {text!r}: benchmark {name!r} given twice")
        specs[name] = BenchSpec(name, layout, Path(path), mappings.get(name))
    unused = sorted(set(mappings) - set(specs))
    if unused:
        raise ValueError(f"--columns for {', '.join(unused)}: no --bench of that name")
    return list(specs.values())
