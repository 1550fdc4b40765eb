"""Data: tokenizer loading and Qwen chat prompts with exact token spans."""

from saerl_jax.data.problems import (
    LoadResult,
    Problem,
    ProblemDataError,
    SkippedRow,
    content_id,
    load_problems,
    write_problems_jsonl,
)
from saerl_jax.data.prompt import SYSTEM_PROMPT, FormattedExample, format_example, load_tokenizer, render_prompt

__all__ = [
    "SYSTEM_PROMPT",
    "FormattedExample",
    "LoadResult",
    "Problem",
    "ProblemDataError",
    "SkippedRow",
    "content_id",
    "format_example",
    "load_problems",
    "load_tokenizer",
    "render_prompt",
    "write_problems_jsonl",
]
