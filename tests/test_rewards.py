"""Math rewards: boxed-answer extraction, math-verify equivalence, robustness to any text, threads, and the
process-pool grader with its deadline."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import random
import threading
import time

import pytest

from rl.rewards import RewardGrader, format_reward, last_boxed, math_reward

# (completion, gold, reward), each checked against math-verify 0.9 before being written down.
REWARD_CASES = [
    ("\\boxed{3}", "3", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("so x = \\boxed{-3}", "-3", 1.0),
    ("\\boxed{x = -3}", "-3", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{7.0}", "7", 1.0),
    ("\\boxed{ 7 }", "7", 1.0),
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("First \\boxed{2}, no wait: \\boxed{3}", "3", 1.0),
    ("First \\boxed{3}, no wait: \\boxed{2}", "3", 0.0),
    ("Candidates: \\boxed{1} \\boxed{2} \\boxed{3}", "2", 0.0),
    ("The answer is 3.", "3", 0.0),
    ("", "3", 0.0),
    ("\\boxed{3", "3", 0.0),
    ("\\boxed{Lima}", "Lima.", 1.0),
    ("\\boxed{  lima }", "Lima", 1.0),
    ("\\boxed{\\text{Lima}}", "Lima", 1.0),
    ("\\boxed{Paris}", "Lima", 0.0),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{42}", "42"),
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{1, \\{2\\}\\right\\}}", "\\left\\{1, \\{2\\}\\right\\}"),
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\boxed{1} then \\boxed{2} then \\boxed{3}", "3"),
        ("\\boxed{\\boxed{7}}", "7"),
        ("\\boxed{}", ""),
        ("\\boxed{5}}}", "5"),
        ("\\boxed{1} \\boxed{2", None),
        ("\\boxed{{1}", None),
        ("\\boxed{", None),
        ("no box here {1}", None),
        ("\\boxed 5", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(("completion", "gold", "reward"), REWARD_CASES)
def test_math_reward(completion, gold, reward):
    assert math_reward(completion, gold) == reward


def test_math_reward_in_threads_matches_main_thread():
    expected = [reward for _, _, reward in REWARD_CASES]
    assert [math_reward(c, g) for c, g, _ in REWARD_CASES] == expected
    results = []
    thread = threading.Thread(target=lambda: results.extend(math_reward(c, g) for c, g, _ in REWARD_CASES))
    thread.start()
    thread.join()
    assert results == expected
    with cf.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(math_reward, *zip(*((c, g) for c, g, _ in REWARD_CASES), strict=True))) == expected


_PIECES = (
    *("\\boxed{", "\\boxed", "{", "}", "\\frac", "\\sqrt", "\\left(", "\\right)", "\\text{", "\\begin{pmatrix}"),
    *("\\end{", "\\\\", "\\", "$", "^", "_", "&", "%", "=", ",", ".", "-", "(", ")", "[", "]", " ", "\n"),
    *("1", "2.5", "x", "e", "\\pi", "\\infty", "é", "数", "\ud800", "\x00", "<|im_end|>"),
)


def _garbage(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200))).decode("latin-1")
    text = "".join(rng.choice(_PIECES) for _ in range(rng.randrange(40)))
    return f"\\boxed{{{text}}}" if kind == 1 else text


def test_rewards_never_raise_on_garbage():
    rng = random.Random(0)
    for _ in range(300):
        completion = _garbage(rng)
        gold = rng.choice(["3", "\\frac{1}{2}", "x", "", "Lima", _garbage(rng)])
        assert math_reward(completion, gold) in (0.0, 1.0), (completion, gold)
        assert format_reward(completion) in (0.0, 1.0), completion
        boxed = last_boxed(completion)
        assert boxed is None or f"\\boxed{{{boxed}}}" in completion, completion


@pytest.mark.parametrize(
    "completion",
    [
        "x" * 1_000_000,
        "\\boxed{" + "1" * 100_000 + "}",
        "\\boxed{" * 10_000,
        "{" * 50_000 + "\\boxed{1" + "}" * 10,
        "\\boxed{\\frac{" + "\\left(" * 300 + "}",
    ],
    ids=["no-box", "huge-number", "many-open-boxes", "unbalanced", "unbalanced-latex"],
)
def test_math_reward_survives_huge_inputs(completion):
    assert math_reward(completion, "2") == 0.0


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("Work.\n\\boxed{3}", 1.0),
        ("\\boxed{3}\n  \n", 1.0),
        ("\\boxed{\\frac{1}{2}}", 1.0),
        ("\\boxed{3} and then more text", 0.0),
        ("\\boxed{3}.", 0.0),
        ("\\boxed{2} \\boxed{3}", 0.0),
        ("no box at all", 0.0),
        ("", 0.0),
        ("\\boxed{3", 0.0),
    ],
)
def test_format_reward(completion, reward):
    assert format_reward(completion) == reward


@pytest.mark.parametrize("completion", ["\\boxed{3} so x = \\frac{1}{2}", "\\boxed{3} }", "\\boxed{3} {x}"])
def test_format_reward_text_after_box_ending_in_brace(completion):
    assert format_reward(completion) == 0.0


MIXED = [
    *((c, g) for c, g, _ in REWARD_CASES),
    ("\\boxed{3}" + "\x00\ud800", "3"),
    ("<|im_end|>\\boxed{12}<|endoftext|>", "12"),
    ("\\boxed{\\frac{2}{4}}", "0.5"),
]


@pytest.fixture(scope="module")
def grader():
    with RewardGrader(workers=2, timeout_s=10.0, chunk=3) as grader:
        yield grader


def test_grader_matches_in_process(grader):
    completions, answers = zip(*MIXED, strict=True)
    expected = [math_reward(c, g) for c, g in MIXED]
    assert grader(completions, answers) == expected
    assert grader([], []) == []
    assert RewardGrader(workers=0)(completions, answers) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_grader_rejects_mismatched_lengths(workers):
    grader = RewardGrader(workers=workers)
    with pytest.raises(ValueError, match="3 completions but 2 answers"):
        grader(["a", "b", "c"], ["1", "2"])
    grader.close()


def test_grader_tiny_timeout_scores_zero_then_recovers(grader, monkeypatch):
    # Fresh expressions that need math-verify (no string match, nothing cached in the workers): milliseconds
    # of work each, beyond the tiny deadline unless a chunk already finished while earlier ones were awaited.
    completions = [f"\\boxed{{\\frac{{{k}}}{{{2 * k}}}}}" for k in range(1001, 1010)]
    monkeypatch.setattr(grader, "timeout_s", 1e-4)
    late = grader(completions, ["0.5"] * len(completions))
    assert len(late) == len(completions) and set(late) <= {0.0, 1.0} and 0.0 in late
    monkeypatch.undo()
    assert grader.timeout_s == 10.0
    assert grader(completions, ["0.5"] * len(completions)) == [1.0] * len(completions)


def test_context_manager_stops_workers():
    before = {p.pid for p in multiprocessing.active_children()}
    with RewardGrader(workers=1, timeout_s=10.0) as grader:
        assert grader(["\\boxed{1}"], ["1"]) == [1.0]
        started = {p.pid for p in multiprocessing.active_children()} - before
        assert started
    deadline = time.monotonic() + 10
    while started & {p.pid for p in multiprocessing.active_children()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not started & {p.pid for p in multiprocessing.active_children()}


@pytest.mark.slow
def test_grader_deadline_zeroes_a_pathological_completion_only():
    # The deeply nested box runs into math-verify's 5 s alarm; the others take about a millisecond, so
    # 0.2 s each is a generous deadline for them. (A fresh worker takes ~0.5 s to start, which is not
    # the completion's time.)
    pathological = "\\boxed{" + "{" * 5000 + "}" * 5000 + "}"
    completions = ["\\boxed{1}", "\\boxed{0.5}", pathological, "\\boxed{3}", "\\boxed{2}"]
    answers = ["1", "\\frac{1}{2}", "2", "3", "5"]
    with RewardGrader(workers=2, timeout_s=0.2, chunk=8) as grader:
        assert grader(completions, answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
