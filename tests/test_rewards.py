"""Math rewards: boxed-answer extraction, math-verify equivalence, robustness to any text, threads, and the
process-pool grader with its deadline."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    ("\\boxed{  lima }", "Lima", 0.0),  # in math mode these are letters (products of variables): l != L
    ("\\boxed{\\text{Lima}}", "Lima", 1.0),
    ("\\boxed{Paris}", "Lima", 0.0),
]


# Adversarial pairs (completion, gold, reward), each run through math-verify 0.9.0 before being written down;
# the comment says why the reward is right mathematically. Pairs math-verify gets wrong (e^{i\pi} vs -1,
# \epsilon vs \varepsilon, 1 < x < 2 vs (1, 2)) are left out rather than pinned.
ADVERSARIAL_CASES = [
    # Case is part of a symbol's name: math-verify lowercases every symbol, the grader does not.
    ("\\boxed{\\delta}", "\\Delta", 0.0),  # lower and upper delta are different symbols
    ("\\boxed{\\phi(n)}", "\\Phi(n)", 0.0),  # Euler's totient is not the normal CDF
    ("\\boxed{x}", "X", 0.0),  # a variable x is not a random variable / set X
    ("\\boxed{X}", "x", 0.0),  # ... nor the other way round
    ("\\boxed{\\Gamma}", "\\gamma", 0.0),  # the Gamma function is not the Euler-Mascheroni constant
    ("\\boxed{\\Omega}", "\\omega", 0.0),  # different Greek letters
    ("\\boxed{\\pi}", "\\Pi", 0.0),  # pi is a number, Pi a product or a plane
    ("\\boxed{\\theta}", "\\Theta", 0.0),  # different Greek letters
    ("\\boxed{E}", "e", 0.0),  # a point or expectation E is not Euler's number
    ("\\boxed{i}", "I", 0.0),  # the imaginary unit is not the identity I
    ("\\boxed{\\frac{A}{B}}", "\\frac{a}{b}", 0.0),  # other variables
    ("\\boxed{2X}", "2x", 0.0),  # other variable
    ("\\boxed{x + X}", "2x", 0.0),  # x + X is not 2x (math-verify merges them)
    ("\\boxed{X^2+2X+1}", "(x+1)^2", 0.0),  # (X+1)^2, not (x+1)^2
    ("\\boxed{X=3}", "x=3", 0.0),  # a claim about another variable
    ("\\boxed{x_1}", "X_1", 0.0),  # other indexed variable
    ("\\boxed{F(x)}", "f(x)", 0.0),  # an antiderivative F is not f
    ("\\boxed{n!}", "N!", 0.0),  # other variable
    ("\\boxed{P(A)}", "P(a)", 0.0),  # probability of an event vs of a value
    ("\\boxed{\\delta x}", "\\Delta x", 0.0),  # a variation is not an increment
    ("\\boxed{2\\pi R}", "2 \\pi r", 0.0),  # other radius
    ("\\boxed{\\mathbf{X}}", "\\mathbf{x}", 0.0),  # a matrix is not a vector
    ("\\boxed{AB}", "ab", 0.0),  # a segment AB is not the product ab
    ("\\boxed{a}", "A", 0.0),  # choice a is not choice A either: case is compared everywhere outside \text
    ("\\boxed{\\Delta x}", "\\Delta x", 1.0),  # the same symbols in the same case
    ("\\boxed{2\\pi r}", "2 \\pi r", 1.0),  # the same, spaced differently
    ("\\boxed{\\text{lima}}", "Lima", 1.0),  # words in \text{} are compared case-insensitively, as math-verify does
    ("\\boxed{\\text{Lima}}", "\\text{lima}", 1.0),  # the same word
    # Other negatives.
    ("\\boxed{\\sin x}", "\\sinh x", 0.0),  # sine is not hyperbolic sine
    ("\\boxed{\\tan x}", "\\tanh x", 0.0),  # tangent is not hyperbolic tangent
    ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", 0.0),  # wrong sign
    ("\\boxed{\\infty}", "-\\infty", 0.0),  # wrong sign
    ("\\boxed{(2, 1)}", "(1, 2)", 0.0),  # an ordered pair with its entries swapped
    ("\\boxed{[1, 2)}", "(1, 2]", 0.0),  # the interval with the other end closed
    ("\\boxed{(-\\infty, 2)}", "(-\\infty, 2]", 0.0),  # 2 left out
    ("\\boxed{[2, \\infty)}", "(2, \\infty)", 0.0),  # 2 included
    ("\\boxed{(3, \\frac{1}{2})}", "(0.5, 3)", 0.0),  # coordinates swapped
    ("\\boxed{\\alpha}", "\\beta", 0.0),  # other symbol
    ("\\boxed{y=3}", "x=3", 0.0),  # other variable
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # a 3-digit truncation is not 1/3
    ("\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0),  # order
    ("so \\boxed 42", "4", 0.0),  # the unbraced box holds 42, not 4
    # True positives that must stay 1.
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # the same number
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),  # the same number
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),  # \dfrac is \frac displayed
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),  # unreduced fraction, same number
    ("\\boxed{1.5}", "\\frac{3}{2}", 1.0),  # the same number
    ("\\boxed{1\\frac{1}{2}}", "\\frac{3}{2}", 1.0),  # a mixed number
    ("\\boxed{2}", "2.0", 1.0),  # the same number
    ("\\boxed{-0}", "0", 1.0),  # the same number
    ("\\boxed{10^6}", "1000000", 1.0),  # the same number
    ("\\boxed{1{,}000{,}000}", "1000000", 1.0),  # thousands separators
    ("\\boxed{2 \\times 10^3}", "2000", 1.0),  # scientific notation
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),  # simplified radical
    ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", 1.0),  # rationalised denominator
    ("\\boxed{\\log_2 8}", "3", 1.0),  # evaluates to 3
    ("\\boxed{\\sqrt{x^2}}", "|x|", 1.0),  # for real x
    ("\\boxed{x^{2}}", "x^2", 1.0),  # braces around an exponent change nothing
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),  # expanded square
    ("\\boxed{a+b}", "b+a", 1.0),  # addition commutes
    ("\\boxed{\\sin(x)}", "\\sin x", 1.0),  # parentheses around the argument
    ("\\boxed{\\arcsin x}", "\\sin^{-1} x", 1.0),  # two notations of the inverse sine
    ("\\boxed{\\{1,2\\}}", "{1, 2}", 1.0),  # the same set
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),  # sets are unordered
    ("\\boxed{3, 2, 1}", "1, 2, 3", 1.0),  # a list of all solutions, in any order
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0),  # \left( \right) are sizing only
    ("\\boxed{\\left[1, 2\\right)}", "[1,2)", 1.0),  # the same interval
    ("\\boxed{\\left( \\frac{1}{2}, 3 \\right)}", "(0.5, 3)", 1.0),  # the same point
    ("\\boxed{x=3}", "3", 1.0),  # the solution stated as an equation
    ("\\boxed{x \\in [1, 2]}", "[1,2]", 1.0),  # the solution set stated as membership
    ("\\boxed{f(x) = 2x}", "2x", 1.0),  # the function stated by its formula
    ("\\boxed{y = 2x + 1}", "y=2x+1", 1.0),  # the same line, spaced differently
    ("\\boxed{10\\text{ cm}}", "10", 1.0),  # a unit added to the number asked for
    ("\\boxed{4\\text{ cm}^2}", "4", 1.0),  # an area's unit
    ("\\boxed{90^\\circ}", "90", 1.0),  # degrees asked in degrees
    ("\\boxed{50\\%}", "50", 1.0),  # a percentage asked as a percentage
    ("\\boxed{2.5\\%}", "0.025", 1.0),  # a percentage is a number
    ("\\boxed{\\$5}", "5", 1.0),  # a currency sign
    ("\\boxed{\\textbf{(C)}}", "C", 1.0),  # a choice letter in bold
    # Box forms: \boxed {..} (space before the brace), \boxed 4 (no braces), \fbox{..}.
    ("\\boxed {4}", "4", 1.0),
    ("\\boxed {x = -3}", "-3", 1.0),
    ("\\boxed 4", "4", 1.0),
    ("The answer is $\\boxed 4$.", "4", 1.0),
    ("\\fbox{4}", "4", 1.0),
    ("\\fbox{\\frac{1}{2}}", "0.5", 1.0),
    ("\\[\\boxed{4}\\]", "4", 1.0),
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
        ("\\boxed 5", "5"),
        ("\\boxed {42}", "42"),
        ("\\boxed\n{42}", "42"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\fbox{2}", "2"),
        ("$\\boxed 5$.", "5"),
        ("\\[\\boxed -3\\]", "-3"),
        ("\\(\\boxed \\frac{1}{2}\\) so", "\\frac{1}{2}"),
        ("\\boxed", None),
        ("\\boxed   ", None),
        ("\\boxedx{1}", None),
        ("\\fbox {1", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(("completion", "gold", "reward"), REWARD_CASES + ADVERSARIAL_CASES)
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
        assert boxed is None or boxed in completion, completion


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
        ("Work.\n\\boxed {3}", 1.0),
        ("Work.\n\\boxed 3", 1.0),
        ("Work.\n\\fbox{3}\n", 1.0),
        ("\\boxed{2} \\fbox{3}", 0.0),
        ("\\boxed 3 and more", 0.0),
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


def test_grading_workers_exit_when_the_trainer_is_killed(tmp_path):
    # A SIGKILLed process cannot stop its pool; its workers must notice and leave on their own.
    script = (
        "import os, signal\n"
        "from rl.rewards import RewardGrader\n"
        "grader = RewardGrader(workers=1)\n"
        "assert grader(['\\\\boxed{2}'], ['2']) == [1.0]\n"
        "print(*grader._pool._processes, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    workers = [int(pid) for pid in done.stdout.split()]
    assert done.returncode == -signal.SIGKILL and workers, done.stderr

    def alive(pid: int) -> bool:  # a zombie waiting for its new parent to reap it has exited
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)
