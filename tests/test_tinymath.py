"""tiny-math: determinism, schema, answers checked by an independent parser, difficulty, noise pool,
the shipped assets reproduced byte for byte, and the tokenizer built for them."""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from rl.rewards import math_reward
from saerl_jax.data import tinymath
from saerl_jax.data.prompt import format_example, load_tokenizer, render_prompt

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny-math"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SOLUTIONS = ("r1_solution_1", "r1_solution_2", "r1_solution_3")
BOXED_INT = re.compile(r"\\boxed\{(-?\d+)\}")


# An independent reading of each question: the topic label it must carry and its answer, worked out here
# from the question text alone (nothing from tinymath but the strings it writes).
def _solve_word(m: re.Match) -> int:
    total = int(m["start"])
    for verb, amount in re.findall(r"(buys|finds|gets|gives away|loses|sells) (\d+)", m["events"]):
        total += int(amount) if verb in ("buys", "finds", "gets") else -int(amount)
        assert total >= 1, m[0]
    return total


def _solve_linear(m: re.Match) -> int:
    a, b, c = int(m["a"]), int(m["b"]) * (1 if m["sign"] == "+" else -1), int(m["c"])
    x, rest = divmod(c - b, a)
    assert rest == 0, m[0]
    return x


def _solve_comparison(m: re.Match) -> int:
    values = [int(v) for v in m["values"].split(", ")]
    assert len(set(values)) == len(values) >= 2, m[0]
    return max(values) if m["word"] == "largest" else min(values)


PARSERS = (
    (
        "Mathematics -> Arithmetic -> Addition",
        re.compile(r"What is (?P<a>\d+) \+ (?P<b>\d+)\?"),
        lambda m: int(m["a"]) + int(m["b"]),
    ),
    (
        "Mathematics -> Arithmetic -> Subtraction",
        re.compile(r"What is (?P<a>\d+) - (?P<b>\d+)\?"),
        lambda m: int(m["a"]) - int(m["b"]),
    ),
    (
        "Mathematics -> Arithmetic -> Multiplication",
        re.compile(r"What is (?P<a>\d+) \* (?P<b>\d+)\?"),
        lambda m: int(m["a"]) * int(m["b"]),
    ),
    (
        "Mathematics -> Number Theory -> Modular Arithmetic",
        re.compile(r"What is the remainder when (?P<a>\d+) is divided by (?P<m>\d+)\?"),
        lambda m: int(m["a"]) % int(m["m"]),
    ),
    (
        "Mathematics -> Algebra -> Linear Equations",
        re.compile(r"Solve for x: (?P<a>\d+)x (?P<sign>[+-]) (?P<b>\d+) = (?P<c>-?\d+)\."),
        _solve_linear,
    ),
    (
        "Mathematics -> Arithmetic -> Comparison",
        re.compile(r"Which is the (?P<word>largest|smallest) of (?P<values>\d+(?:, \d+)+)\?"),
        _solve_comparison,
    ),
    (
        "Mathematics -> Applied Mathematics -> Word Problems",
        re.compile(
            r"(?P<name>[A-Z][a-z]+) has (?P<start>\d+) (?P<item>[a-z]+)\."
            r"(?P<events>(?: (?P=name) (?:(?:buys|finds|gets) \d+ more|(?:gives away|loses|sells) \d+)\.)+)"
            r" How many (?P=item) does (?P=name) have now\?"
        ),
        _solve_word,
    ),
)


def solve(question: str) -> tuple[str, int]:
    """``(topic label, answer)`` of a clean question, from this file's own parsers."""
    found = [(topic, fn(m)) for topic, pattern, fn in PARSERS if (m := pattern.fullmatch(question))]
    assert len(found) == 1, f"{question!r} matches {len(found)} patterns"
    return found[0]


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return tinymath.generate(5000, seed=7, noise_fraction=0.2)


@pytest.fixture(scope="module")
def shipped_bytes() -> bytes:
    return (ASSETS / "problems.jsonl").read_bytes()


@pytest.fixture(scope="module")
def shipped(shipped_bytes) -> list[dict]:
    return [json.loads(line) for line in shipped_bytes.decode().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "tokenizer")


def clean(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["source"] == tinymath.CLEAN_SOURCE]


def noise(rows: list[dict], kind: str) -> list[dict]:
    return [row for row in rows if row["source"] == f"noise/{kind}"]


# Determinism, ids, arguments.
def test_same_seed_same_rows_different_seed_different_rows():
    first = tinymath.generate(600, seed=3, noise_fraction=0.2)
    assert first == tinymath.generate(600, seed=3, noise_fraction=0.2)
    other = tinymath.generate(600, seed=4, noise_fraction=0.2)
    assert [row["question"] for row in other] != [row["question"] for row in first]


def test_ids_unique(sample, shipped):
    for rows in (sample, shipped):
        assert len({row["id"] for row in rows}) == len(rows)


def test_id_offset_shifts_ids_only():
    base = tinymath.generate(300, seed=5, noise_fraction=0.1)
    shifted = tinymath.generate(300, seed=5, noise_fraction=0.1, id_offset=1_000_000)
    assert sorted(int(row["id"].removeprefix("tm-")) for row in shifted) == list(range(1_000_000, 1_000_300))
    for a, b in zip(base, shifted, strict=True):
        assert int(b["id"].removeprefix("tm-")) == int(a["id"].removeprefix("tm-")) + 1_000_000
        assert {**a, "id": None} == {**b, "id": None}


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.1), (999, 0.25), (7, 0.5), (3, 0.9), (50, 0.0), (0, 0.3)])
def test_noise_count_is_rounded_fraction(n, fraction):
    rows = tinymath.generate(n, seed=11, noise_fraction=fraction)
    assert len(rows) == n
    assert sum(row["source"].startswith("noise/") for row in rows) == round(n * fraction)
    assert all(row["source"] in (tinymath.CLEAN_SOURCE, *(f"noise/{k}" for k in tinymath.NOISE_KINDS)) for row in rows)


def test_topics_argument_restricts_topics():
    rows = tinymath.generate(200, seed=2, noise_fraction=0.0, topics=["linear", "word"])
    assert {row["topic"] for row in rows} == {tinymath.TOPICS["linear"], tinymath.TOPICS["word"]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topics": ["addition", "calculus"]}, "calculus"),
        ({"noise_fraction": 1.0}, "noise_fraction"),
        ({"noise_fraction": -0.1}, "noise_fraction"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tinymath.generate(10, seed=0, **kwargs)


def test_empty_topics_raise_named_error():
    with pytest.raises(ValueError, match="topic"):
        tinymath.generate(10, seed=0, topics=[])


# Schema.
def test_rows_have_exactly_the_schema(sample):
    math_topics = set(tinymath.TOPICS.values())
    for row in sample:
        assert sorted(row) == sorted(tinymath.FIELDS), row
        assert isinstance(row["difficulty"], float) and 1.0 <= row["difficulty"] <= 10.0, row
        assert all(isinstance(row[key], str) for key in tinymath.FIELDS if key != "difficulty"), row
        assert row["question"] and all(row[key] for key in SOLUTIONS), row
        if row["source"] == "noise/non_math":
            assert row["topic"].startswith("Other -> "), row
        else:
            assert row["topic"] in math_topics, row


def test_shipped_files_have_the_schema_in_field_order(shipped):
    assert all(tuple(row) == tinymath.FIELDS for row in shipped)
    held_out = [json.loads(line) for line in (ASSETS / "eval.jsonl").read_text().splitlines()]
    assert len(shipped) == 20_000 and len(held_out) == 1000
    assert {row["source"] for row in held_out} == {tinymath.CLEAN_SOURCE}


# Answers.
def test_reference_solutions_earn_full_reward(sample):
    rows = clean(sample)
    assert len(rows) == 4000
    for row in rows:
        for key in SOLUTIONS:
            assert math_reward(row[key], row["final_answer"]) == 1.0, (key, row)


def test_final_answers_match_an_independent_solver(sample, shipped):
    for rows in (clean(sample), clean(shipped)):
        for row in rows:
            topic, answer = solve(row["question"])
            assert row["topic"] == topic, row
            assert row["final_answer"] == str(answer), row
            assert [BOXED_INT.findall(row[key]) for key in SOLUTIONS] == [[str(answer)]] * 3, row


def test_every_topic_occurs(sample):
    assert {row["topic"] for row in clean(sample)} == {topic for topic, _, _ in PARSERS}


# Difficulty.
MAIN_PARAMS = {
    "addition": ["digits"],
    "subtraction": ["digits"],
    "multiplication": ["digits_a", "digits_b"],
    "modular": ["digits"],
    "linear": ["level"],
    "comparison": ["count", "digits"],
    "word": ["steps"],
}


@pytest.mark.parametrize(("topic", "main"), [(topic, main) for topic, mains in MAIN_PARAMS.items() for main in mains])
def test_difficulty_monotone_in_main_parameter(topic, main):
    rng = np.random.default_rng(0)
    drafts = [tinymath.GENERATORS[topic](rng) for _ in range(3000)]
    groups: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    marginal: dict[int, list[float]] = defaultdict(list)
    for draft in drafts:
        others = tuple(sorted((k, v) for k, v in draft.params.items() if k != main))
        groups[others][draft.params[main]].append(draft.difficulty)
        marginal[draft.params[main]].append(draft.difficulty)
    assert len(marginal) >= 2
    compared = 0
    for others, by_value in groups.items():
        values = sorted(by_value)
        for lower, higher in itertools.pairwise(values):
            assert min(by_value[higher]) >= max(by_value[lower]), (others, lower, higher)
            assert np.mean(by_value[higher]) > np.mean(by_value[lower]), (others, lower, higher)
            compared += 1
    assert compared >= len(marginal) - 1
    means = [np.mean(marginal[value]) for value in sorted(marginal)]
    assert all(b > a for a, b in itertools.pairwise(means)), means


def test_multiplication_params_match_operand_digits():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        draft = tinymath.GENERATORS["multiplication"](rng)
        a, b = map(int, re.fullmatch(r"What is (\d+) \* (\d+)\?", draft.question).groups())
        assert (len(str(a)), len(str(b))) == (draft.params["digits_a"], draft.params["digits_b"]), draft


# Noise pool.
def test_all_noise_kinds_occur(shipped):
    assert {row["source"] for row in shipped} == {tinymath.CLEAN_SOURCE, *(f"noise/{k}" for k in tinymath.NOISE_KINDS)}
    assert sum(row["source"] != tinymath.CLEAN_SOURCE for row in shipped) == 2000


def test_wrong_answers_are_wrong_and_consistently_boxed(sample):
    rows = noise(sample, "wrong_answer")
    assert len(rows) > 50
    for row in rows:
        _, truth = solve(row["question"])
        assert row["final_answer"] != str(truth), row
        assert [BOXED_INT.findall(row[key])[-1] for key in SOLUTIONS] == [row["final_answer"]] * 3, row
        assert math_reward(row["r1_solution_1"], str(truth)) == 0.0, row


def test_garbled_and_truncated_questions_differ_from_clean_ones(sample):
    questions = {row["question"] for row in clean(sample)}
    for kind in ("garbled", "truncated"):
        rows = noise(sample, kind)
        assert len(rows) > 50
        assert not questions & {row["question"] for row in rows}, kind


def test_duplicates_copy_a_clean_row(sample):
    def key(row):
        return tuple(row[field] for field in tinymath.FIELDS if field not in ("id", "source"))

    originals = {key(row) for row in clean(sample)}
    rows = noise(sample, "duplicate")
    assert len(rows) > 50
    assert all(key(row) in originals for row in rows)


def test_non_math_rows_are_not_math(sample):
    rows = noise(sample, "non_math")
    assert len(rows) > 50
    for row in rows:
        assert row["topic"].startswith("Other -> ") and not re.search(r"\d", row["question"]), row
        assert all(row[key] == row["final_answer"] for key in SOLUTIONS), row


# Shipped assets.
def test_regeneration_reproduces_shipped_files(tmp_path, shipped_bytes):
    rows = tinymath.generate(20_000, seed=0, noise_fraction=0.1)
    assert tinymath.write_jsonl(rows, tmp_path / "problems.jsonl").read_bytes() == shipped_bytes
    held_out = tinymath.generate(1000, seed=1, noise_fraction=0.0, id_offset=1_000_000)
    written = tinymath.write_jsonl(held_out, tmp_path / "eval.jsonl")
    assert written.read_bytes() == (ASSETS / "eval.jsonl").read_bytes()


def test_tokenizer_rebuild_reproduces_shipped(tmp_path, shipped):
    directory = tinymath.build_tokenizer(shipped, tmp_path / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (directory / name).read_bytes() == (ASSETS / "tokenizer" / name).read_bytes(), name


# Tokenizer.
def test_tokenizer_round_trips_every_problem(tokenizer, shipped):
    texts = [row[key] for key in ("question", "r1_solution_1") for row in shipped]
    backend = tokenizer.backend_tokenizer
    ids = [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    assert backend.decode_batch(ids, skip_special_tokens=False) == texts
    head = texts[:500]
    assert tokenizer(head, add_special_tokens=False)["input_ids"] == ids[:500]
    assert tokenizer.batch_decode(ids[:500]) == head


def test_every_digit_is_its_own_token(tokenizer, shipped):
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        assert not re.search(r"\d", text) or (len(text) == 1 and text.isdigit()), (token_id, text)
    ids = tokenizer.encode("1234567890 x 42", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[:10] == list("1234567890")
    for row in shipped[:300]:
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(row["r1_solution_1"], add_special_tokens=False)]
        assert sum(piece.isdigit() for piece in pieces) == len(re.findall(r"\d", row["r1_solution_1"]))


def test_special_tokens_are_single_and_eos_is_im_end(tokenizer):
    vocab = tokenizer.get_vocab()
    for token in SPECIALS:
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]], token
        assert vocab[token] in tokenizer.encode(f"a{token}b", add_special_tokens=False), token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == vocab["<|im_end|>"]
    assert tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) == 512


@pytest.mark.parametrize("question", ["What is 12 + 3?", "Solve for x: 8x - 23 = -23.", "  odd \\boxed{} {x}\n"])
def test_chat_template_matches_render_prompt(tokenizer, question):
    user = {"role": "user", "content": question}
    default = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert default == render_prompt(question)
    system = {"role": "system", "content": "Answer tersely {in} \\LaTeX."}
    explicit = tokenizer.apply_chat_template([system, user], add_generation_prompt=True, tokenize=False)
    assert explicit == render_prompt(question, system=system["content"])


def test_format_example_spans_decode_exactly(tokenizer, shipped):
    for row in shipped[::400]:
        example = format_example(tokenizer, row["question"], row["r1_solution_1"])
        pieces = [
            tokenizer.decode(example.input_ids[start:end].tolist(), skip_special_tokens=False)
            for start, end in (example.prompt_span, example.question_span, example.solution_span)
        ]
        assert pieces == [render_prompt(row["question"]), row["question"], row["r1_solution_1"]]
