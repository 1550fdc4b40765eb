"""tiny-math: a seeded synthetic problem set in the DeepMath-103K schema, with an off-distribution noise pool.

Seven topics, each with a difficulty in [1, 10] computed from the generating parameters (digits, carries,
borrows, steps), a short step-by-step reference solution ending in ``\\boxed{answer}`` and two shorter
phrasings of it (``r1_solution_2``, ``r1_solution_3``). The noise pool holds wrong answers, garbled text,
non-math text, duplicates and truncated items; ``source`` says which (``tinymath`` for clean problems).
Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tokenizers
import transformers

from saerl_jax.data.problems import SCHEMA_FIELDS, Problem, write_problems_jsonl
from saerl_jax.data.prompt import SYSTEM_PROMPT, render_prompt

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-math"
"""The shipped tiny-math world (problems.jsonl, eval.jsonl, tokenizer/, model/, sae/)."""
CLEAN_SOURCE = "tinymath"
SFT_SEED = 2
"""Generator seed of the supervised fine-tuning problems (no noise), apart from the shipped pool's."""
SFT_ID_OFFSET = 2_000_000
"""First id number of the SFT problems, so their ids never collide with the pool's or eval's."""
NOISE_KINDS = ("wrong_answer", "garbled", "non_math", "duplicate", "truncated")
TOPICS = {
    "addition": "Mathematics -> Arithmetic -> Addition",
    "subtraction": "Mathematics -> Arithmetic -> Subtraction",
    "multiplication": "Mathematics -> Arithmetic -> Multiplication",
    "modular": "Mathematics -> Number Theory -> Modular Arithmetic",
    "linear": "Mathematics -> Algebra -> Linear Equations",
    "comparison": "Mathematics -> Arithmetic -> Comparison",
    "word": "Mathematics -> Applied Mathematics -> Word Problems",
}
FIELDS = SCHEMA_FIELDS


@dataclasses.dataclass(frozen=True)
class Draft:
    """A generated clean problem before it gets an id."""

    question: str
    answer: int
    steps: str
    """The working, without the final boxed line."""
    difficulty: float
    params: dict[str, int]
    """The generating parameters (digits, carries, steps...), kept for tests and analysis."""


def _digits(rng: np.random.Generator, n: int) -> int:
    """A uniformly random integer with exactly ``n`` digits (0-9 for n=1)."""
    return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10**n))


def _clip(value: float) -> float:
    return float(np.clip(round(value, 1), 1.0, 10.0))


def _addition(rng: np.random.Generator) -> Draft:
    n = int(rng.integers(1, 6))
    a, b = _digits(rng, n), _digits(rng, int(rng.integers(1, n + 1)))
    steps, carry, carries = [], 0, 0
    for i in range(len(str(max(a, b)))):
        da, db = a // 10**i % 10, b // 10**i % 10
        total = da + db + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
        carries += carry
    work = ", ".join(steps) + f", so {a}+{b}={a + b}."
    difficulty = _clip(1 + 1.6 * (n - 1) + 0.6 * carries)
    return Draft(f"What is {a} + {b}?", a + b, work, difficulty, {"digits": n, "carries": carries})


def _subtraction(rng: np.random.Generator) -> Draft:
    n = int(rng.integers(1, 6))
    a, b = _digits(rng, n), _digits(rng, int(rng.integers(1, n + 1)))
    a, b = max(a, b), min(a, b)
    steps, borrow, borrows = [], 0, 0
    for i in range(len(str(a))):
        da, db = a // 10**i % 10 - borrow, b // 10**i % 10
        borrow = int(da < db)
        borrows += borrow
        steps.append(f"{da + 10 * borrow}-{db}={da + 10 * borrow - db}")
    work = ", ".join(steps) + f", so {a}-{b}={a - b}."
    difficulty = _clip(1.5 + 1.6 * (n - 1) + 0.7 * borrows)
    return Draft(f"What is {a} - {b}?", a - b, work, difficulty, {"digits": n, "borrows": borrows})


def _multiplication(rng: np.random.Generator) -> Draft:
    na, nb = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    a, b = _digits(rng, na), int(rng.integers(2, 10)) if nb == 1 else _digits(rng, 2)
    if nb == 1:
        steps, carry = [], 0
        for i in range(len(str(a))):
            da = a // 10**i % 10
            total = da * b + carry
            steps.append(f"{da}*{b}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        work = ", ".join(steps) + f", so {a}*{b}={a * b}."
    else:
        tens, ones = b // 10 * 10, b % 10
        work = f"{a}*{b} = {a}*{tens} + {a}*{ones} = {a * tens} + {a * ones} = {a * b}."
    difficulty = _clip(1.5 * (na + nb) - 0.5 + 0.5 * (a * b >= 1000))
    return Draft(f"What is {a} * {b}?", a * b, work, difficulty, {"digits_a": na, "digits_b": nb})


def _modular(rng: np.random.Generator) -> Draft:
    n = int(rng.integers(1, 5))
    m = int(rng.integers(2, 20))
    a = _digits(rng, n)
    q, r = divmod(a, m)
    work = f"{a} = {q}*{m} + {r}, so {a} mod {m} = {r}."
    difficulty = _clip(1.2 + 1.8 * (n - 1) + 1.0 * (m > 9))
    return Draft(f"What is the remainder when {a} is divided by {m}?", r, work, difficulty, {"digits": n, "m": m})


def _linear(rng: np.random.Generator) -> Draft:
    level = int(rng.integers(1, 4))
    a = int(rng.integers(2, 4 + 3 * level))
    x = int(rng.integers(-3 * level if level > 1 else 0, 5 * level + 5))
    b = int(rng.integers(-10 * level if level > 2 else 0, 10 * level + 1))
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    question = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
    move = f"{c} - {b}" if b >= 0 else f"{c} + {-b}"
    work = f"{a}x = {move} = {c - b}, x = {c - b} / {a} = {x}."
    difficulty = _clip(2 + 1.8 * (level - 1) + 0.8 * (x < 0) + 0.6 * (abs(c) >= 100))
    return Draft(question, x, work, difficulty, {"level": level})


def _comparison(rng: np.random.Generator) -> Draft:
    count, n = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    values = [int(v) for v in rng.choice(10**n if n > 1 else 10, size=count, replace=False)]
    largest = bool(rng.integers(2))
    ordered = sorted(values, reverse=largest)
    word = "largest" if largest else "smallest"
    relation = " > " if largest else " < "
    work = f"{relation.join(map(str, ordered))}, so the {word} is {ordered[0]}."
    difficulty = _clip(0.5 + 0.7 * count + 0.8 * n)
    question = f"Which is the {word} of {', '.join(map(str, values))}?"
    return Draft(question, ordered[0], work, difficulty, {"count": count, "digits": n})


_NAMES = ("Ana", "Ben", "Caro", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "marbles", "stamps", "coins", "books", "shells")


def _word(rng: np.random.Generator) -> Draft:
    steps, n = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    name, item = _NAMES[int(rng.integers(len(_NAMES)))], _ITEMS[int(rng.integers(len(_ITEMS)))]
    total = _digits(rng, n) + 1
    sentences, work = [f"{name} has {total} {item}."], []
    for i in range(steps):
        if rng.integers(2) or total < 2:
            delta = _digits(rng, n) + 1
            verb = ("buys", "finds", "gets")[i % 3]
            sentences.append(f"{name} {verb} {delta} more.")
            work.append(f"{total}+{delta}={total + delta}")
            total += delta
        else:
            delta = int(rng.integers(1, total))
            verb = ("gives away", "loses", "sells")[i % 3]
            sentences.append(f"{name} {verb} {delta}.")
            work.append(f"{total}-{delta}={total - delta}")
            total -= delta
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    difficulty = _clip(1 + 2.0 * (steps - 1) + 1.5 * (n - 1) + 1)
    return Draft(question, total, ", ".join(work) + f", so {name} has {total}.", difficulty, {"steps": steps})


GENERATORS: dict[str, Callable[[np.random.Generator], Draft]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "modular": _modular,
    "linear": _linear,
    "comparison": _comparison,
    "word": _word,
}


def solutions(draft: Draft) -> tuple[str, str, str]:
    """Three reference solutions: the step-by-step working, a terse line, and the working with a check."""
    boxed = f"\\boxed{{{draft.answer}}}"
    return (
        f"{draft.steps}\n{boxed}",
        f"The answer is {draft.answer}.\n{boxed}",
        f"{draft.steps} Checking the steps again gives {draft.answer}.\n{boxed}",
    )


def _row(index: int, topic: str, draft: Draft, source: str = CLEAN_SOURCE) -> dict:
    one, two, three = solutions(draft)
    return {
        "id": f"tm-{index:06d}",
        "question": draft.question,
        "final_answer": str(draft.answer),
        "difficulty": draft.difficulty,
        "topic": TOPICS[topic],
        "r1_solution_1": one,
        "r1_solution_2": two,
        "r1_solution_3": three,
        "source": source,
    }


_NON_MATH = (
    "Describe your favourite season in one sentence.",
    "Write a short poem about the sea.",
    "Who painted the ceiling of the Sistine Chapel?",
    "List three colours of the rainbow.",
    "What is the capital city of Peru?",
    "Give a synonym for the word quick.",
    "Translate good morning into French.",
    "Name an animal that lives in the desert.",
)
_NON_MATH_ANSWERS = ("Spring.", "The waves roll in.", "Michelangelo.", "Red.", "Lima.", "Fast.", "Bonjour.", "Camel.")


def _noise(rng: np.random.Generator, kind: str, base: dict, index: int) -> dict:
    row = dict(base, id=f"tm-{index:06d}", source=f"noise/{kind}")
    if kind == "wrong_answer":
        wrong = int(row["final_answer"]) + int(rng.choice([-1, 1])) * int(rng.integers(1, 20))
        row["final_answer"] = str(wrong)
        for field in ("r1_solution_1", "r1_solution_2", "r1_solution_3"):
            head = row[field].rsplit("\\boxed{", 1)[0]
            row[field] = f"{head}\\boxed{{{wrong}}}"
    elif kind == "garbled":
        chars = list(row["question"])
        rng.shuffle(chars)
        row["question"] = "".join(chars)
    elif kind == "non_math":
        pick = int(rng.integers(len(_NON_MATH)))
        row.update(
            question=_NON_MATH[pick],
            final_answer=_NON_MATH_ANSWERS[pick],
            topic="Other -> Non-mathematical",
            r1_solution_1=_NON_MATH_ANSWERS[pick],
            r1_solution_2=_NON_MATH_ANSWERS[pick],
            r1_solution_3=_NON_MATH_ANSWERS[pick],
        )
    elif kind == "truncated":
        question = row["question"]
        row["question"] = question[: max(3, int(len(question) * rng.uniform(0.3, 0.7)))]
    elif kind != "duplicate":
        raise ValueError(f"unknown noise kind {kind!r} (known: {', '.join(NOISE_KINDS)})")
    return row


def generate(
    n: int = 20_000,
    *,
    seed: int = 0,
    noise_fraction: float = 0.1,
    topics: Iterable[str] = tuple(TOPICS),
    id_offset: int = 0,
) -> list[dict]:
    """``n`` problems: ``round(n * noise_fraction)`` from the noise pool, the rest clean, shuffled.

    Topics are drawn uniformly; every row has the fields in :data:`FIELDS`. Same arguments, same rows.
    """
    topics = tuple(topics)
    if not topics:
        raise ValueError(f"topics is empty (known: {', '.join(TOPICS)})")
    unknown = sorted(set(topics) - set(TOPICS))
    if unknown:
        raise ValueError(f"unknown topic(s) {', '.join(unknown)} (known: {', '.join(TOPICS)})")
    if not 0 <= noise_fraction < 1:
        raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}")
    rng = np.random.default_rng(seed)
    n_noise = round(n * noise_fraction)
    rows = []
    for index in range(n - n_noise):
        topic = topics[int(rng.integers(len(topics)))]
        rows.append(_row(id_offset + index, topic, GENERATORS[topic](rng)))
    for index in range(n - n_noise, n):
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        base = rows[int(rng.integers(n - n_noise))] if n > n_noise else _row(0, "addition", _addition(rng))
        rows.append(_noise(rng, kind, base, id_offset + index))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Writes rows as JSON lines (atomically), fields in :data:`FIELDS` order."""
    return write_problems_jsonl([Problem(**row) for row in rows], path)


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The Qwen chat layout in Jinja: one "<|im_start|>role\ncontent<|im_end|>\n" per message, the math system
# prompt when none is given, then the assistant header. Renders exactly what data.prompt.render_prompt does.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(rows: Iterable[dict], directory: str | os.PathLike, *, vocab_size: int = 512) -> Path:
    """Trains a small byte-level BPE (digits always split one per token) on the rows' text; saves it for
    ``AutoTokenizer`` with the Qwen chat special tokens and chat template.

    Single-digit tokens keep arithmetic learnable for a tiny model, as in Qwen's own tokenizer.
    """
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus():
        for row in rows:
            yield render_prompt(row["question"]) + row["r1_solution_1"] + "<|im_end|>"

    tokenizer.train_from_iterator(corpus(), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE.replace("default_system", json.dumps(SYSTEM_PROMPT)),
        model_max_length=1024,
    )
    directory = Path(directory)
    fast.save_pretrained(directory)
    return directory
