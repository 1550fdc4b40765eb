"""Problem files in the DeepMath-103K schema: strict, streaming loading of local parquet and JSON lines.

Every row is checked field by field; an error names the file, the row (``data.jsonl:17`` is the 1-based
line of a JSON-lines file, ``data.parquet: row index 16`` the 0-based row of a parquet file) and the field.
With ``skip_invalid=True`` invalid rows are recorded in :attr:`LoadResult.skipped` instead, and columns the
schema does not use are listed in :attr:`LoadResult.ignored_columns`, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write

_JSON_LINES = (".jsonl", ".json")
_PARQUET_BATCH_ROWS = 1024


class ProblemDataError(UserError):
    """A problem file cannot be loaded; the message names the file and, for a bad row, the row and field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One math problem in the DeepMath-103K schema."""

    id: str
    """The file's ``id`` column, or :func:`content_id` of question and answer when the file has none."""
    question: str
    """The problem statement; never empty."""
    final_answer: str
    """The reference answer as text; never empty (numbers in the file are converted with ``str``)."""
    difficulty: float | None = None
    """DeepMath's difficulty rating (about 1 to 10), or ``None`` when the file has none."""
    topic: str | None = None
    """A topic path such as ``"Mathematics -> Algebra -> Linear Equations"``."""
    r1_solution_1: str | None = None
    """First reference solution (DeepSeek-R1 in DeepMath-103K)."""
    r1_solution_2: str | None = None
    """Second reference solution."""
    r1_solution_3: str | None = None
    """Third reference solution."""
    source: str | None = None
    """Where the problem comes from (not a DeepMath-103K column; tiny-math uses it to label noise)."""


SCHEMA_FIELDS = tuple(field.name for field in dataclasses.fields(Problem))
_REQUIRED = ("question", "final_answer")
_NOT_NULL = ("id", *_REQUIRED)


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """An invalid row left out by ``load_problems(..., skip_invalid=True)``."""

    row: int
    """1-based line number for JSON lines, 0-based row index for parquet."""
    field: str | None
    """The offending schema field, or ``None`` when the whole row is unreadable (invalid JSON, not an object)."""
    reason: str
    """What is wrong, e.g. ``"field 'question' is empty"``."""


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What :func:`load_problems` read from one file."""

    path: Path
    problems: list[Problem]
    """Valid problems, in file order."""
    skipped: list[SkippedRow]
    """Invalid rows left out (only with ``skip_invalid=True``), in file order."""
    ignored_columns: list[str]
    """File columns no schema field reads, in file order (for JSON lines: every key seen in any row read)."""

    def summary(self, max_listed: int = 10) -> str:
        """One line: ``loaded N problems from FILE, skipped M rows (line 3: field 'question' is empty; ...)``."""
        text = f"loaded {len(self.problems)} problems from {self.path}, skipped {len(self.skipped)} rows"
        if self.skipped:
            listed = [f"{row_where(self.path, s.row)}: {s.reason}" for s in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                listed.append(f"and {len(self.skipped) - max_listed} more")
            text += f" ({'; '.join(listed)})"
        if self.ignored_columns:
            text += f"; ignored columns: {', '.join(self.ignored_columns)}"
        return text


def content_id(question: str, final_answer: str) -> str:
    """A stable id from content: the first 16 hex digits of SHA-1 over ``question + "\\x00" + final_answer``."""
    return hashlib.sha1(f"{question}\x00{final_answer}".encode()).hexdigest()[:16]


class RowError(Exception):
    """One row's problem, before the file and row are known to the message (see :func:`located`)."""

    def __init__(self, field: str | None, reason: str, missing_column: str | None = None):
        super().__init__(reason)
        self.field, self.reason, self.missing_column = field, reason, missing_column


def row_where(path: Path, row: int) -> str:
    """How a row is named in messages: a parquet row index or a JSON-lines line number."""
    return f"row index {row}" if path.suffix.lower() == ".parquet" else f"line {row}"


def located(path: Path, row: int, reason: str) -> str:
    """``reason`` prefixed with the file and row, the way every data error names its place."""
    if path.suffix.lower() == ".parquet":
        return f"{path}: row index {row}: {reason}"
    return f"{path}:{row}: {reason}"


def _column_error(path: Path, field: str, column: str, available: Iterable[str], line: str = "") -> str:
    return f"{path}{line}: no column {column!r} for field {field!r} (columns: {', '.join(available) or 'none'})"


def _resolve_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    unknown = sorted(set(columns or {}) - set(SCHEMA_FIELDS))
    if unknown:
        raise ProblemDataError(
            f"unknown schema field(s) {', '.join(unknown)} in columns (fields: {', '.join(SCHEMA_FIELDS)})"
        )
    return {field: (columns or {}).get(field, field) for field in SCHEMA_FIELDS}


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(field: str, value: object) -> str | float | None:
    """The schema value of ``field``, or raises ``RowError``; ``None`` means absent (optional fields only)."""
    if value is None:
        if field in _NOT_NULL:
            raise RowError(field, f"field {field!r} is null")
        return None
    if field == "difficulty" or (field == "final_answer" and _is_number(value)):
        if not _is_number(value):
            raise RowError(field, f"field {field!r} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise RowError(field, f"field {field!r} must be finite, got {value!r}")
        return float(value) if field == "difficulty" else str(value)
    if field == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        expected = {"id": "a string or an integer", "final_answer": "a string or a number"}.get(field, "a string")
        raise RowError(field, f"field {field!r} must be {expected}, got {_describe(value)}")
    if field in _NOT_NULL and not value.strip():
        raise RowError(field, f"field {field!r} is empty")
    return value


def _parse(raw: dict, mapping: dict[str, str], explicit_id: bool, repeats: dict[str, int]) -> dict[str, object]:
    """Schema values of one row, with a content id when the row has no id column (and none was mapped).

    ``repeats`` counts content ids given so far; a repeat gets ``-2``, ``-3``... appended.
    """
    values = {}
    for field, column in mapping.items():
        if column in raw:
            values[field] = _check(field, raw[column])
        elif field in _REQUIRED or (field == "id" and explicit_id):
            named = "" if column == field else f" (column {column!r})"
            raise RowError(field, f"field {field!r} is missing{named}", missing_column=column)
        else:
            values[field] = None
    if values["id"] is None:
        digest = content_id(values["question"], values["final_answer"])
        repeats[digest] = repeats.get(digest, 0) + 1
        values["id"] = digest if repeats[digest] == 1 else f"{digest}-{repeats[digest]}"
    return values


def jsonl_rows(path: Path, available: dict[str, None]) -> Iterator[tuple[int, dict | RowError]]:
    """``(line number, object or error)`` per non-blank line; adds every key seen to ``available``."""
    try:
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    yield line_number, RowError(None, f"invalid JSON ({e})")
                    continue
                if not isinstance(raw, dict):
                    yield line_number, RowError(None, f"expected a JSON object, got {type(raw).__name__}")
                    continue
                available.update(dict.fromkeys(raw))
                yield line_number, raw
    except OSError as e:
        raise ProblemDataError(f"{path}: cannot read ({e})") from None


def parquet_rows(
    path: Path, mapping: dict[str, str], explicit: set[str], available: dict[str, None]
) -> Iterator[tuple[int, dict]]:
    """``(row index, row)`` per parquet row, read in batches of the mapped columns; fills ``available``."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ProblemDataError(f"{path}: not a readable parquet file ({e})") from None
    with parquet:
        names = parquet.schema_arrow.names
        available.update(dict.fromkeys(names))
        for field, column in mapping.items():
            if column not in names and (field in _REQUIRED or field in explicit):
                raise ProblemDataError(_column_error(path, field, column, names))
        if parquet.metadata.num_rows == 0:
            raise ProblemDataError(f"{path}: no rows")
        wanted = [name for name in names if name in set(mapping.values())]
        index = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
                for raw in batch.to_pylist():
                    yield index, raw
                    index += 1
        except (pa.ArrowException, OSError) as e:
            raise ProblemDataError(f"{path}: row index {index}: unreadable parquet data ({e})") from None


def column_mapping(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("question=problem", ...)`` -> ``{"question": "problem"}``."""
    mapping = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise UserError(f"--column {pair!r}: expected FIELD=COLUMN, e.g. question=problem")
        mapping[field] = column
    return mapping


def load_problems(
    path: str | os.PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Loads and validates the problems of a local ``.parquet`` or JSON-lines (``.jsonl``/``.json``) file.

    Args:
        path: the file; read in streaming fashion (parquet batches, JSON line by line).
        columns: schema field -> file column, for files with other column names (e.g. ``{"question":
            "problem", "final_answer": "answer"}``); unmapped fields read the column of their own name.
        skip_invalid: record invalid rows in ``LoadResult.skipped`` instead of raising.
        limit: stop after this many valid problems.

    Returns:
        The problems in file order. A row without an ``id`` column gets :func:`content_id` as its id; one
        repeating an earlier question and answer gets that id with ``-2``, ``-3``... appended.

    Raises:
        ProblemDataError: the file is missing, unreadable, empty or has no valid row; ``columns`` names an
            unknown field or a column the file lacks; or (unless ``skip_invalid``) a row is invalid: a
            required field (question, final_answer) missing, null or empty, a value of the wrong type
            (a numeric string is not a difficulty), an id repeated, a line that is not a JSON object.
    """
    path = Path(path)
    mapping = _resolve_columns(columns)
    explicit = set(columns or {})
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not path.is_file():
        raise ProblemDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    available: dict[str, None] = {}
    if suffix == ".parquet":
        rows = parquet_rows(path, mapping, explicit, available)
    elif suffix in _JSON_LINES:
        rows = jsonl_rows(path, available)
    else:
        raise ProblemDataError(f"{path}: unsupported file type {suffix!r} (expected .parquet, .jsonl or .json)")

    problems, skipped, first_row, repeats = [], [], {}, {}
    read_any = False
    for row, raw in rows:
        read_any = True
        try:
            if isinstance(raw, RowError):
                raise raw
            values = _parse(raw, mapping, "id" in explicit, repeats)
            if values["id"] in first_row:
                first = row_where(path, first_row[values["id"]])
                raise RowError("id", f"duplicate id {values['id']!r} in field 'id' (first at {first})")
        except RowError as err:
            if not skip_invalid and err.missing_column is not None and err.missing_column not in available:
                raise ProblemDataError(
                    _column_error(path, err.field, err.missing_column, available, f":{row}")
                ) from None
            if not skip_invalid:
                raise ProblemDataError(located(path, row, err.reason)) from None
            skipped.append(SkippedRow(row, err.field, err.reason))
            continue
        first_row[values["id"]] = row
        problems.append(Problem(**values))
        if limit is not None and len(problems) >= limit:
            break
    rows.close()

    if not read_any:
        raise ProblemDataError(f"{path}: no rows")
    for field in SCHEMA_FIELDS:
        if (field in _REQUIRED or field in explicit) and mapping[field] not in available:
            raise ProblemDataError(_column_error(path, field, mapping[field], available))
    if not problems:
        raise ProblemDataError(f"{path}: no valid rows ({len(skipped)} skipped; first: {skipped[0].reason})")
    used = set(mapping.values())
    ignored = [column for column in available if column not in used]
    return LoadResult(path=path, problems=problems, skipped=skipped, ignored_columns=ignored)


def write_problems_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> Path:
    """Writes problems as JSON lines (atomically), one object per problem with every schema field in order."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for problem in problems:
                f.write(json.dumps(dataclasses.asdict(problem)) + "\n")

    return atomic_write(Path(path), write)
