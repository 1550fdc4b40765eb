"""Problem loading: tiny-math as JSONL and as DeepMath-shaped parquet, ids, column mapping, every kind of
bad row with a message naming file, row and field, skip mode, file-level errors, limit and round trips."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saerl_jax.data import LoadResult, Problem, ProblemDataError, content_id, load_problems, write_problems_jsonl

TINY_MATH = Path(__file__).resolve().parent.parent / "assets" / "tiny-math" / "problems.jsonl"
DEEPMATH_COLUMNS = (
    "question",
    "final_answer",
    "difficulty",
    "topic",
    "r1_solution_1",
    "r1_solution_2",
    "r1_solution_3",
)


def _row(i: int, **overrides) -> dict:
    row = {
        "id": f"p{i}",
        "question": f"What is {i} + 1?",
        "final_answer": str(i + 1),
        "difficulty": 1.5,
        "topic": "Mathematics -> Arithmetic -> Addition",
        "r1_solution_1": f"\\boxed{{{i + 1}}}",
        "r1_solution_2": None,
        "r1_solution_3": None,
        "source": "test",
    }
    return row | overrides


def _jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts as JSON, strings as raw lines) to ``path``."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def tiny_rows() -> list[dict]:
    return [json.loads(line) for line in TINY_MATH.read_text().splitlines()]


def test_tiny_math_jsonl_loads_every_row(tiny_rows):
    result = load_problems(TINY_MATH)
    assert len(result.problems) == len(tiny_rows) == 20_000
    assert result.skipped == [] and result.ignored_columns == []
    assert [dataclasses.asdict(p) for p in result.problems] == tiny_rows
    assert "loaded 20000 problems" in result.summary() and "skipped 0 rows" in result.summary()


def test_deepmath_shaped_parquet_gets_stable_hash_ids(tiny_rows, tmp_path):
    deepmath = [{c: r[c] for c in DEEPMATH_COLUMNS} for r in tiny_rows]
    path = _parquet(tmp_path / "deepmath.parquet", deepmath, row_group_size=3000)
    assert pq.ParquetFile(path).num_row_groups > 1
    result = load_problems(path)
    assert result.skipped == [] and result.ignored_columns == []
    assert [p.question for p in result.problems] == [r["question"] for r in tiny_rows]
    assert [p.final_answer for p in result.problems] == [r["final_answer"] for r in tiny_rows]
    assert all(p.source is None for p in result.problems)
    ids = [p.id for p in result.problems]
    assert len(set(ids)) == len(ids)  # tiny-math's duplicate noise repeats content; suffixes keep ids unique
    assert ids[0] == content_id(tiny_rows[0]["question"], tiny_rows[0]["final_answer"])
    assert ids == [p.id for p in load_problems(path).problems]


def test_jsonl_and_parquet_load_identically(tmp_path):
    rows = [_row(i) for i in range(5)] + [_row(5, difficulty=None, r1_solution_1=None)]
    from_jsonl = load_problems(_jsonl(tmp_path / "p.jsonl", rows))
    from_json = load_problems(_jsonl(tmp_path / "p.json", rows))
    from_parquet = load_problems(_parquet(tmp_path / "p.parquet", rows))
    assert from_jsonl.problems == from_parquet.problems == from_json.problems
    assert from_jsonl.problems[0] == Problem(**rows[0])
    assert from_jsonl.problems[5].difficulty is None


def test_content_id_is_fixed():
    # Changing the hashing changes every id of every file without an id column: this must be noticed.
    assert content_id("What is 1 + 1?", "2") == "96f85e03577ce9c4"
    assert content_id("What is 1 + 1?", "3") != content_id("What is 1 + 1?", "2")


def test_ids_from_column_or_hash(tmp_path):
    rows = [_row(0, id=7), _row(1)]
    assert [p.id for p in load_problems(_jsonl(tmp_path / "a.jsonl", rows)).problems] == ["7", "p1"]
    same = {"question": "Q?", "final_answer": 3}
    result = load_problems(_jsonl(tmp_path / "b.jsonl", [same, {"question": "R?", "final_answer": "3"}, same]))
    digest = content_id("Q?", "3")
    assert [p.id for p in result.problems] == [digest, content_id("R?", "3"), f"{digest}-2"]
    assert result.problems[0].final_answer == "3"  # numbers become text


def test_column_mapping(tmp_path):
    rows = [{"problem": "What is 2 + 2?", "answer": "4", "question": "unused", "level": 3}]
    path = _jsonl(tmp_path / "other.jsonl", rows)
    result = load_problems(path, columns={"question": "problem", "final_answer": "answer", "difficulty": "level"})
    assert result.problems[0].question == "What is 2 + 2?"
    assert result.problems[0].difficulty == 3.0
    assert result.ignored_columns == ["question"]
    assert "ignored columns: question" in result.summary()
    parquet = load_problems(
        _parquet(tmp_path / "other.parquet", rows), columns={"question": "problem", "final_answer": "answer"}
    )
    assert parquet.problems[0].question == "What is 2 + 2?" and parquet.ignored_columns == ["question", "level"]


BAD_ROWS = {
    "missing question": ({"id": "b", "final_answer": "1"}, "question", "field 'question' is missing"),
    "empty question": (_row(9, question="  "), "question", "field 'question' is empty"),
    "null answer": (_row(9, final_answer=None), "final_answer", "field 'final_answer' is null"),
    "bool answer": (_row(9, final_answer=True), "final_answer", "must be a string or a number, got bool"),
    "list difficulty": (_row(9, difficulty=[1]), "difficulty", "field 'difficulty' must be a number, got list"),
    "numeric-string difficulty": (_row(9, difficulty="3.5"), "difficulty", "must be a number, got str '3.5'"),
    "non-finite difficulty": (_row(9, difficulty=float("nan")), "difficulty", "must be finite"),
    "non-str topic": (_row(9, topic=4), "topic", "field 'topic' must be a string, got int"),
    "non-str solution": (_row(9, r1_solution_2={"a": 1}), "r1_solution_2", "must be a string, got dict"),
    "float id": (_row(9, id=1.5), "id", "field 'id' must be a string or an integer"),
    "duplicate id": (_row(9, id="p0"), "id", "duplicate id 'p0' in field 'id' (first at line 1)"),
    "invalid JSON": ('{"question": "Q?", "final_answer": ', None, "invalid JSON"),
    "non-object line": ("[1, 2]", None, "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_message_names_file_row_and_field(case, tmp_path):
    bad, field, reason = BAD_ROWS[case]
    path = _jsonl(tmp_path / "data.jsonl", [_row(0), bad, _row(1)])
    with pytest.raises(ProblemDataError) as info:
        load_problems(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)
    skipped = load_problems(path, skip_invalid=True)
    assert [p.id for p in skipped.problems] == ["p0", "p1"]
    assert [(s.row, s.field) for s in skipped.skipped] == [(2, field)]
    assert reason in skipped.skipped[0].reason


def test_parquet_bad_row_names_row_index(tmp_path):
    path = _parquet(tmp_path / "data.parquet", [_row(0), _row(1, difficulty=None, topic=""), _row(2, question="")])
    with pytest.raises(ProblemDataError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}: row index 2: field 'question' is empty"
    result = load_problems(path, skip_invalid=True)
    assert [s.row for s in result.skipped] == [2] and "row index 2: field 'question'" in result.summary()
    mistyped = _parquet(tmp_path / "typed.parquet", [_row(0, difficulty="hard")])
    with pytest.raises(ProblemDataError, match=r"row index 0: field 'difficulty' must be a number, got str"):
        load_problems(mistyped)


def test_skip_mode_counts_reports_and_keeps_order(tmp_path):
    rows = [_row(0), _row(1, question=""), "not json", _row(2), _row(3, difficulty="2"), _row(2), "", _row(4)]
    result = load_problems(_jsonl(tmp_path / "mixed.jsonl", rows), skip_invalid=True)
    assert isinstance(result, LoadResult)
    assert [p.id for p in result.problems] == ["p0", "p2", "p4"]
    assert [(s.row, s.field) for s in result.skipped] == [(2, "question"), (3, None), (5, "difficulty"), (6, "id")]
    assert result.skipped[3].reason == "duplicate id 'p2' in field 'id' (first at line 4)"
    summary = result.summary()
    assert summary.startswith(f"loaded 3 problems from {tmp_path / 'mixed.jsonl'}, skipped 4 rows (line 2: ")
    assert "line 5: field 'difficulty' must be a number, got str '2'" in summary
    assert "more" not in summary and "more" in result.summary(max_listed=2)


def test_duplicate_id_names_both_rows(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", [_row(0), _row(1), _row(0)])
    with pytest.raises(ProblemDataError, match=r"dup\.jsonl:3: duplicate id 'p0' in field 'id' \(first at line 1\)"):
        load_problems(path)


def test_bad_mapping(tmp_path):
    jsonl = _jsonl(tmp_path / "m.jsonl", [_row(0)])
    with pytest.raises(ProblemDataError, match=r"unknown schema field.*answer.*fields: id, question, final_answer"):
        load_problems(jsonl, columns={"answer": "final_answer"})
    parquet = _parquet(tmp_path / "m.parquet", [_row(0)])
    for path in (jsonl, parquet):
        with pytest.raises(
            ProblemDataError,
            match=rf"{re.escape(path.name)}.*no column 'problem' for field 'question'.*columns: id, question",
        ):
            load_problems(path, columns={"question": "problem"})
        with pytest.raises(ProblemDataError, match="no column 'level' for field 'difficulty'"):
            load_problems(path, columns={"difficulty": "level"}, skip_invalid=True)
    with pytest.raises(ProblemDataError, match="no column 'problem' for field 'question'"):
        load_problems(jsonl, columns={"question": "problem"}, skip_invalid=True)


def test_file_level_errors(tmp_path):
    with pytest.raises(ProblemDataError, match=r"missing\.jsonl: no such file"):
        load_problems(tmp_path / "missing.jsonl")
    for name in ("empty.jsonl", "blank.json"):
        (tmp_path / name).write_text("" if name == "empty.jsonl" else "\n  \n")
        with pytest.raises(ProblemDataError, match=f"{name}: no rows"):
            load_problems(tmp_path / name, skip_invalid=True)
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(
        pa.Table.from_pylist([], schema=pa.table({"question": ["q"], "final_answer": ["a"]}).schema), empty_parquet
    )
    with pytest.raises(ProblemDataError, match=r"empty\.parquet: no rows"):
        load_problems(empty_parquet)
    fake = _jsonl(tmp_path / "fake.parquet", [_row(0)])
    with pytest.raises(ProblemDataError, match=r"fake\.parquet: not a readable parquet file"):
        load_problems(fake, skip_invalid=True)
    with pytest.raises(ProblemDataError, match=r"unsupported file type '\.csv'"):
        load_problems(_jsonl(tmp_path / "p.csv", [_row(0)]))
    all_bad = _jsonl(tmp_path / "bad.jsonl", [_row(0, question=""), "[]"])
    with pytest.raises(ProblemDataError, match=r"bad.jsonl: no valid rows \(2 skipped"):
        load_problems(all_bad, skip_invalid=True)


def test_limit(tmp_path):
    rows = [_row(i) for i in range(10)]
    for path in (_jsonl(tmp_path / "l.jsonl", rows), _parquet(tmp_path / "l.parquet", rows, row_group_size=3)):
        assert [p.id for p in load_problems(path, limit=4).problems] == ["p0", "p1", "p2", "p3"]
        assert len(load_problems(path, limit=100).problems) == 10
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_problems(tmp_path / "l.jsonl", limit=0)
    # Rows past the limit are never read: a bad row there does not matter.
    assert len(load_problems(_jsonl(tmp_path / "tail.jsonl", [_row(0), "oops"]), limit=1).problems) == 1


def test_write_round_trip(tmp_path):
    problems = [Problem(**_row(i)) for i in range(3)] + [Problem(id="x", question="Q ∑?", final_answer="½")]
    path = write_problems_jsonl(problems, tmp_path / "out.jsonl")
    assert load_problems(path).problems == problems
    assert list(json.loads(path.read_text().splitlines()[0])) == [f.name for f in dataclasses.fields(Problem)]
