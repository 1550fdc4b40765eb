"""Evaluation: Pass@k / Avg@k maths, benchmark loaders in their native layouts, and ``saerl eval`` on tiny-math."""

from __future__ import annotations

import functools
import itertools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.benchmarks import LOADERS, EvalProblem, parse_benches
from rl.evaluate import avg_at_k, evaluate, pass_at_k
from saerl_jax.cli import main
from saerl_jax.data.problems import ProblemDataError
from saerl_jax.data.prompt import load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.model import load_pretrained
from saerl_jax.sft import greedy_accuracy, greedy_completions


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- metrics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "c", "k"), [(5, c, k) for c in range(6) for k in range(1, 6)] + [(3, 1, 2)])
def test_pass_at_k_equals_enumeration_over_all_k_subsets(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_checks_its_arguments():
    assert pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500), rel=1e-12)
    assert pass_at_k(4, 2, 1) == 0.5
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="need 0 <= c <= n"):
            pass_at_k(n, c, k)


def test_avg_at_k_averages_over_samples_then_problems():
    table = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert avg_at_k(table) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="non-empty"):
        avg_at_k([])


# --- loaders -------------------------------------------------------------------------------------------
LAYOUT_CASES = {
    "gsm8k": (
        [
            {"question": "Tom has 1,000 apples and buys 234.", "answer": "1000+234 = <<1000+234=1234>>\n#### 1,234"},
            {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        ],
        [EvalProblem("0", "Tom has 1,000 apples and buys 234.", "1234"), EvalProblem("1", "What is 2 + 3?", "5")],
    ),
    "math500": (
        [
            {
                "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
                "solution": "... $\\boxed{\\frac{3}{4}}$",
                "answer": "\\frac{3}{4}",
                "subject": "Algebra",
                "level": 1,
                "unique_id": "test/algebra/1.json",
            }
        ],
        [EvalProblem("test/algebra/1.json", "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "\\frac{3}{4}")],
    ),
    "aime24": (  # HuggingFaceH4/aime_2024 layout, then the capitalised Maxwell-Jia/AIME_2024 one
        [{"id": 60, "problem": "Find x.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}],
        [EvalProblem("60", "Find x.", "204")],
    ),
    "amc23": (
        [{"id": 0, "question": "How many?", "answer": 27.0}, {"id": 1, "question": "Ratio?", "answer": 0.5}],
        [EvalProblem("0", "How many?", "27"), EvalProblem("1", "Ratio?", "0.5")],
    ),
    "minervamath": (  # Qwen2.5-Math's minerva_math/test.jsonl: the answer is boxed in the solution
        [{"problem": "Mass of the Sun?", "solution": "So $\\boxed{2 \\times 10^{30}}$ kg.", "type": "x", "idx": 3}],
        [EvalProblem("3", "Mass of the Sun?", "2 \\times 10^{30}")],
    ),
    "olympiadbench": (
        [
            {"id": 2231, "question": "Find all n.", "final_answer": ["$3$", "$5$"], "is_multiple_answer": True},
            {"id": 2232, "question": "Compute r.", "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False},
        ],
        [EvalProblem("2231", "Find all n.", "3, 5"), EvalProblem("2232", "Compute r.", "\\frac{1}{2}")],
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_CASES))
def test_each_layout_reads_its_benchmark_rows(tmp_path, layout):
    rows, expected = LAYOUT_CASES[layout]
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    assert LOADERS[layout](path) == expected
    assert LOADERS[layout](path, limit=1) == expected[:1]


def test_capitalised_aime_layout_parquet_and_minerva_answer_column(tmp_path):
    aime = tmp_path / "aime.parquet"
    row = {"ID": "2024-I-1", "Problem": "Find y.", "Solution": "s", "Answer": 33}
    pq.write_table(pa.Table.from_pylist([row]), aime)
    assert LOADERS["aime24"](aime) == [EvalProblem("2024-I-1", "Find y.", "33")]
    minerva = write_jsonl(tmp_path / "minerva.jsonl", [{"question": "Speed?", "answer": "3e8"}])
    assert LOADERS["minervamath"](minerva) == [EvalProblem("0", "Speed?", "3e8")]


def test_generic_jsonl_layout_uses_the_column_mapping(tmp_path):
    rows = [{"q": "1+1?", "a": 2, "key": "p1"}, {"q": "2+2?", "a": "4", "key": "p2"}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    problems = LOADERS["jsonl"](path, columns={"question": "q", "answer": "a", "id": "key"})
    assert problems == [EvalProblem("p1", "1+1?", "2"), EvalProblem("p2", "2+2?", "4")]
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        LOADERS["jsonl"](path, columns={"question": "q"})


@pytest.mark.parametrize(
    ("layout", "rows", "message"),
    [
        ("gsm8k", [{"question": "a", "answer": "#### 1"}, {"question": "b"}], r"g\.jsonl:2: field 'answer' is missing"),
        ("gsm8k", [{"question": "a", "answer": "no marker"}], r"g\.jsonl:1: field 'answer' has no '#### '"),
        ("math500", [{"question": "a", "answer": "1"}], r"g\.jsonl:1: field 'problem' is missing \(columns: question"),
        ("aime24", [{"Problem": "a"}], r"g\.jsonl:1: field 'answer' or 'Answer' is missing"),
        ("amc23", [{"question": "a", "answer": "many"}], r"g\.jsonl:1: field 'answer' must be a number"),
        ("minervamath", [{"problem": "a", "solution": "no box"}], r"g\.jsonl:1: field 'solution' has no \\boxed"),
        ("olympiadbench", [{"question": "a", "final_answer": []}], r"g\.jsonl:1: field 'final_answer' must be a non"),
        ("olympiadbench", [{"question": "", "final_answer": ["1"]}], r"g\.jsonl:1: field 'question' is empty"),
        ("math500", [{"problem": "a", "answer": "1", "unique_id": "x"}] * 2, r"g\.jsonl:2: duplicate id 'x' .*line 1"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, layout, rows, message):
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(ProblemDataError, match=message):
        LOADERS[layout](path)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ProblemDataError, match=r"bad\.jsonl:2: invalid JSON"):
        LOADERS["gsm8k"](tmp_path / "bad.jsonl")
    table = pa.Table.from_pylist([{"question": "a", "answer": 1.0}, {"question": "b", "answer": None}])
    pq.write_table(table, tmp_path / "amc.parquet")
    with pytest.raises(ProblemDataError, match=r"amc\.parquet: row index 1: field 'answer' is null"):
        LOADERS["amc23"](tmp_path / "amc.parquet")
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "level": 1}]), tmp_path / "m.parquet")
    with pytest.raises(
        ProblemDataError, match=r"m\.parquet: row index 0: field 'answer' is missing \(columns: problem, level"
    ):
        LOADERS["math500"](tmp_path / "m.parquet")
    with pytest.raises(ProblemDataError, match="no such file"):
        LOADERS["math500"](tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ProblemDataError, match=r"unsupported file type '\.csv'"):
        LOADERS["gsm8k"](tmp_path / "data.csv")


def test_bench_specs_choose_layouts_and_reject_mistakes():
    specs = parse_benches(["gsm8k=a.jsonl", "hard:math500=b.parquet", "mine=c.jsonl"], ["mine:question=q,answer=a"])
    assert [(s.name, s.layout, str(s.path)) for s in specs] == [
        ("gsm8k", "gsm8k", "a.jsonl"),
        ("hard", "math500", "b.parquet"),
        ("mine", "jsonl", "c.jsonl"),
    ]
    assert specs[2].columns == {"question": "q", "answer": "a"}
    assert parse_benches(["gsm8k=a.jsonl"], ["gsm8k:question=q,answer=a"])[0].layout == "jsonl"  # columns win
    for benches, columns, message in [
        (["mydata=x.jsonl"], [], "unknown layout 'mydata'"),
        (["gsm8k"], [], "expected NAME=FILE"),
        (["gsm8k=x", "gsm8k=y"], [], "given twice"),
        (["a/b=x"], [], "a name holds only"),
        (["g:gsm8k=x"], ["g:question=q,answer=a"], "goes with the jsonl layout"),
        (["m=x"], ["m:question=q"], "missing \\['answer'\\]"),
        (["gsm8k=x"], ["other:question=q,answer=a"], "no --bench of that name"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_benches(benches, columns)


# --- end to end on tiny-math ---------------------------------------------------------------------------
MAX_NEW_TOKENS, BATCH = 64, 16


@pytest.fixture(scope="module")
def tiny_benchmarks(tmp_path_factory):
    """8 tiny-math eval problems in the MATH500 layout and 8 in the GSM8K layout."""
    rows = [json.loads(line) for line in (ASSETS / "eval.jsonl").read_text().splitlines()[:16]]
    directory = tmp_path_factory.mktemp("bench")
    math500 = [
        {"problem": r["question"], "solution": r["r1_solution_1"], "answer": r["final_answer"], "unique_id": r["id"]}
        for r in rows[:8]
    ]
    gsm8k = [{"question": r["question"], "answer": f"{r['r1_solution_1']}\n#### {r['final_answer']}"} for r in rows[8:]]
    return {
        "math500": (write_jsonl(directory / "math500.jsonl", math500), rows[:8]),
        "gsm8k": (write_jsonl(directory / "gsm8k.jsonl", gsm8k), rows[8:]),
    }


def eval_argv(benches, out, *extra):
    argv = ["eval", "--model", str(ASSETS / "model"), "--tokenizer", str(ASSETS / "tokenizer"), "--out", str(out)]
    argv += ["--k", "2", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), *extra]
    for name, (path, _) in benches.items():
        argv += ["--bench", f"{name}={path}"]
    return argv


def test_greedy_eval_matches_greedy_accuracy_and_resumes(tiny_benchmarks, tmp_path, capsys):
    out = tmp_path / "greedy"
    assert main([*eval_argv(tiny_benchmarks, out, "--greedy", "--reward-workers", "0")]) == 0
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"math500", "gsm8k"} and results["settings"]["k"] == 1
    model, tokenizer = load_pretrained(ASSETS / "model"), load_tokenizer(ASSETS / "tokenizer")
    for name, (_, rows) in tiny_benchmarks.items():
        accuracy, rewards = greedy_accuracy(model, tokenizer, rows, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
        result = results["benchmarks"][name]
        assert result["n_problems"] == 8 and result["avg_at_k"] == pytest.approx(accuracy)
        assert result["pass_at_k"] == {"1": pytest.approx(accuracy)}
        samples = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert [s["scores"] for s in samples] == [[r] for r in rewards]
        questions = [row["question"] for row in rows]
        greedy = functools.partial(greedy_completions, model, tokenizer, questions, max_new_tokens=MAX_NEW_TOKENS)
        assert greedy(batch_size=3) == greedy(batch_size=BATCH, engine="static")  # the two engines
    average = results["average"]
    assert average["avg_at_k"] == pytest.approx(
        (results["benchmarks"]["math500"]["avg_at_k"] + results["benchmarks"]["gsm8k"]["avg_at_k"]) / 2
    )
    assert "| **average** |" in (out / "results.md").read_text()

    finished = {p: p.stat().st_mtime_ns for p in (out / "benchmarks").iterdir()}
    assert main([*eval_argv(tiny_benchmarks, out, "--greedy", "--reward-workers", "0")]) == 0
    printed = capsys.readouterr().out
    assert "math500: already evaluated" in printed and "gsm8k: already evaluated" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "benchmarks").iterdir()} == finished
    assert json.loads((out / "results.json").read_text()) == results


def test_sampled_eval_reports_pass_at_k_and_does_not_depend_on_batching(tiny_benchmarks, tmp_path):
    out = tmp_path / "sampled"
    assert main([*eval_argv(tiny_benchmarks, out, "--reward-workers", "1")]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("math500", "gsm8k"):
        result = results["benchmarks"][name]
        samples = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        correct = [[float(s > 0) for s in sample["scores"]] for sample in samples]
        assert result["k"] == result["n"] == 2 and all(len(s["completions"]) == 2 for s in samples)
        assert result["avg_at_k"] == pytest.approx(avg_at_k(correct))
        assert result["pass_at_k"]["2"] == pytest.approx(sum(any(c) for c in correct) / 8)
        assert result["pass_at_k"]["1"] <= result["pass_at_k"]["2"] and 0 <= result["truncation_rate"] <= 1
    assert set(results["average"]["pass_at_k"]) == {"1", "2"}

    problems = LOADERS["gsm8k"](tiny_benchmarks["gsm8k"][0])[:5]  # other batching, neighbours and engine
    model, tokenizer = load_pretrained(ASSETS / "model"), load_tokenizer(ASSETS / "tokenizer")
    rebatched = tmp_path / "rebatched"
    settings = dict(k=2, max_new_tokens=MAX_NEW_TOKENS, batch_size=4, engine="static", progress=False, out=rebatched)
    again = evaluate(model, tokenizer, {"gsm8k": problems}, **settings)
    first = [json.loads(line) for line in (out / "samples" / "gsm8k.jsonl").read_text().splitlines()][:5]
    second = [json.loads(line) for line in (rebatched / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert [s["completions"] for s in second] == [s["completions"] for s in first]
    assert again["benchmarks"]["gsm8k"]["n_problems"] == 5


def test_eval_options_are_checked_before_any_model_is_loaded(tmp_path):
    base = ["eval", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="need 1 <= k <= n, got k=4, n=2"):
        main([*base, "--bench", "gsm8k=x.jsonl", "--k", "4", "--n", "2"])
    with pytest.raises(SystemExit, match="unknown layout 'mydata'"):
        main([*base, "--bench", "mydata=x.jsonl"])
    with pytest.raises(SystemExit, match=r"x\.jsonl: no such file"):
        main([*base, "--bench", "gsm8k=x.jsonl"])
