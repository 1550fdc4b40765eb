"""Qwen chat prompts: tokenizer loading and piecewise tokenization with exact prompt/question/solution spans."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import transformers

from saerl_jax.errors import UserError

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

_USER_PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
_ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"


def load_tokenizer(path: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerBase:
    """Loads a local Hugging Face tokenizer directory that knows the Qwen chat special tokens.

    Args:
        path: directory with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` (and usually
            ``tokenizer_config.json``); nothing is downloaded.

    Returns:
        The tokenizer, as ``transformers.AutoTokenizer`` builds it.

    Raises:
        FileNotFoundError: ``path`` is not a directory or holds no tokenizer files.
        UserError: ``<|im_start|>`` or ``<|im_end|>`` is not a single token of the tokenizer.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    if not (directory / "tokenizer.json").is_file() and not has_bpe_files:
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    vocab = tokenizer.get_vocab()
    for token in _CHAT_TOKENS:
        if token not in vocab or tokenizer.encode(token, add_special_tokens=False) != [vocab[token]]:
            raise UserError(f"{path}: tokenizer lacks the chat special token {token!r}")
    return tokenizer


def stop_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """``(eos_ids, pad_id)`` for sampling chat completions: ``<|im_end|>`` and the tokenizer's EOS (either
    ends a completion), and the pad id written after them (the tokenizer's, else the first EOS id)."""
    eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def render_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """The Qwen chat prompt: a system turn, a user turn with ``question``, and the assistant header."""
    return _USER_PREFIX.format(system=system) + question + _ASSISTANT_HEADER


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: == on ndarray fields is ambiguous.
class FormattedExample:
    """One tokenized chat example; spans are ``[start, end)`` token indices into ``input_ids``."""

    input_ids: np.ndarray
    """Token ids, int32, shape ``[T]``: the prompt tokens, then the solution tokens."""
    prompt_span: tuple[int, int]
    """The whole rendered prompt (system turn, user turn, assistant header); always starts at 0."""
    question_span: tuple[int, int]
    """The tokens of the question text alone, inside ``prompt_span``."""
    solution_span: tuple[int, int]
    """The solution tokens after the prompt; ``(T, T)`` when there is no solution."""

    def __post_init__(self) -> None:
        (p0, p1), (q0, q1), (s0, s1) = self.prompt_span, self.question_span, self.solution_span
        nested = p0 == 0 and p0 <= q0 <= q1 <= p1 == s0 <= s1 == len(self.input_ids)
        if self.input_ids.ndim != 1 or not nested:
            raise ValueError(
                f"inconsistent spans for {len(self.input_ids)} tokens: prompt {self.prompt_span}, "
                f"question {self.question_span}, solution {self.solution_span}"
            )


def format_example(
    tokenizer: transformers.PreTrainedTokenizerBase,
    question: str,
    solution: str | None = None,
    *,
    system: str = SYSTEM_PROMPT,
    max_solution_tokens: int | None = None,
) -> FormattedExample:
    """Tokenizes ``render_prompt(question, system) + solution`` with exact spans.

    The four pieces (the text up to the question, the question, the assistant header, the solution)
    are tokenized separately with ``add_special_tokens=False`` and concatenated, so every span is a
    token boundary by construction: decoding ``input_ids[slice(*prompt_span)]`` gives exactly
    ``render_prompt(question, system)`` and ``input_ids[slice(*solution_span)]`` exactly ``solution``.
    It is also how generation sees the text: the model continues after the prompt tokens, so a
    solution never shares a token with the prompt. Whole-string tokenization can differ where a
    byte-level BPE merges across a piece boundary (e.g. a question that starts with a newline merges
    it with the newline after ``user``).

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer`.
        question: the user's question; must not be empty.
        solution: the assistant's answer, or None for a prompt alone.
        system: the system prompt.
        max_solution_tokens: keep at most this many solution tokens; None keeps all.

    Returns:
        The token ids and the prompt, question and solution spans.

    Raises:
        ValueError: empty question or negative ``max_solution_tokens``.
    """
    if not question:
        raise ValueError("question is empty")
    if max_solution_tokens is not None and max_solution_tokens < 0:
        raise ValueError(f"max_solution_tokens must be >= 0, got {max_solution_tokens}")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prefix = encode(_USER_PREFIX.format(system=system))
    question_ids = encode(question)
    header = encode(_ASSISTANT_HEADER)
    solution_ids = encode(solution or "")[:max_solution_tokens]
    prompt_end = len(prefix) + len(question_ids) + len(header)
    return FormattedExample(
        input_ids=np.asarray(prefix + question_ids + header + solution_ids, dtype=np.int32),
        prompt_span=(0, prompt_end),
        question_span=(len(prefix), len(prefix) + len(question_ids)),
        solution_span=(prompt_end, prompt_end + len(solution_ids)),
    )
