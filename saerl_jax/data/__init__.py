"""Data: tokenizer loading and Qwen chat prompts with exact token spans."""

from saerl_jax.data.prompt import SYSTEM_PROMPT, FormattedExample, format_example, load_tokenizer, render_prompt

__all__ = [
    "SYSTEM_PROMPT",
    "FormattedExample",
    "format_example",
    "load_tokenizer",
    "render_prompt",
]
