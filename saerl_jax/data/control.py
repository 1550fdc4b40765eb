"""The positive-control world: a tiny-math pool in which the paper's mechanisms must help if they work.

The plain tiny-math pool gives the shipped policy about 50% accuracy on every topic, so most GRPO groups
already have reward variance and 10% of noise costs little: an easy-to-hard order and a quality filter
have almost nothing to act on. This pool plants both conditions on purpose, in column arithmetic
(addition, subtraction, multiplication), where every rung reuses the skills of the one below:

- **A difficulty ladder that starves vanilla GRPO.** Clean problems come in three rungs of the same
  algorithms: ``easy`` (1-2 digit sums and differences, 1-digit products), ``medium`` (3-4 digits, or a
  2-digit times 1-digit product) and ``hard`` (5 digits with at least two carries or borrows, or a 3-digit
  times 1-digit product). Measured with
  the shipped policy at temperature 1 over 4 samples, the hard rung is solved almost never (pass rate
  about 0.1, most groups all-wrong), the medium rung about half the time (the learnable band) and the easy
  rung almost always. Half of the clean rows are hard, so a shuffled order spends about half of its
  prompts on groups with no reward variance.
- **Label noise that costs.** ``noise_fraction`` of the rows (30% by default) are clean problems whose
  ``final_answer`` (and boxed answers) carry a plausible column slip: one digit off by one, or a carry
  dropped. Their rewards are almost always zero (wasted prompts) and, when the policy makes that very
  slip, they reward the error. ``off_fraction`` (10%) are off-distribution rows: non-math requests,
  garbled and truncated questions, as in the plain pool.

``source`` says what each row is: ``control/easy``, ``control/medium``, ``control/hard``,
``noise/wrong_answer``, ``noise/non_math``, ``noise/garbled``, ``noise/truncated``. The held-out file is
clean, drawn from the same rungs in the same proportions. Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from saerl_jax.data import tinymath
from saerl_jax.data.problems import Problem
from saerl_jax.data.tinymath import Draft

RUNGS = ("easy", "medium", "hard")
TOPICS = ("addition", "subtraction", "multiplication")
OFF_KINDS = ("non_math", "garbled", "truncated")
EVAL_SEED_OFFSET = 1
EVAL_ID_OFFSET = 1_000_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlSpec:
    """The shares of the positive-control pool."""

    rung_shares: tuple[float, float, float] = (0.15, 0.35, 0.5)
    """Shares of the easy, medium and hard rungs among the clean rows."""
    noise_fraction: float = 0.3
    """Share of rows with a plausible wrong ``final_answer``."""
    off_fraction: float = 0.1
    """Share of off-distribution rows (non-math, garbled, truncated)."""

    def __post_init__(self) -> None:
        if len(self.rung_shares) != 3 or min(self.rung_shares) < 0 or not np.isclose(sum(self.rung_shares), 1):
            raise ValueError(f"rung_shares must be 3 non-negative shares summing to 1, got {self.rung_shares}")
        if self.noise_fraction < 0 or self.off_fraction < 0 or self.noise_fraction + self.off_fraction >= 1:
            raise ValueError(
                "noise_fraction and off_fraction must be non-negative with a sum below 1, got "
                f"{self.noise_fraction} and {self.off_fraction}"
            )


def rung(topic: str, draft: Draft) -> str | None:
    """The rung of a generated problem, or None when it falls outside the ladder (5-digit sums with fewer
    than two carries or borrows, products with a 2-digit multiplier)."""
    p = draft.params
    if topic in ("addition", "subtraction"):
        digits, slips = p["digits"], p.get("carries", p.get("borrows", 0))
        if digits <= 2:
            return "easy"
        if digits <= 4:
            return "medium"
        return "hard" if slips >= 2 else None
    if topic == "multiplication":
        a, b = p["digits_a"], p["digits_b"]
        return RUNGS[a - 1] if b == 1 else None
    raise ValueError(f"the control world has no topic {topic!r} (known: {', '.join(TOPICS)})")


def draw(rng: np.random.Generator, topic: str, wanted: str, tries: int = 10_000) -> Draft:
    """A problem of ``topic`` on rung ``wanted``, by rejection from the tiny-math generator."""
    generate: Callable[[np.random.Generator], Draft] = tinymath.GENERATORS[topic]
    for _ in range(tries):
        draft = generate(rng)
        if rung(topic, draft) == wanted:
            return draft
    raise RuntimeError(f"no {wanted} {topic} problem in {tries} draws")  # pragma: no cover


def slip(rng: np.random.Generator, answer: int) -> int:
    """A plausible column-arithmetic slip of ``answer``: one digit off by one (carried or not), never
    negative and never the answer itself."""
    digits = len(str(abs(answer)))
    while True:
        place = 10 ** int(rng.integers(digits))
        wrong = answer + int(rng.choice([-1, 1])) * place
        if wrong >= 0 and wrong != answer:
            return wrong


def _clean_row(index: int, topic: str, draft: Draft, name: str) -> dict:
    return tinymath._row(index, topic, draft, source=f"control/{name}")


def _wrong(rng: np.random.Generator, row: dict, index: int) -> dict:
    wrong = slip(rng, int(row["final_answer"]))
    out = dict(row, id=f"tm-{index:06d}", source="noise/wrong_answer", final_answer=str(wrong))
    for field in ("r1_solution_1", "r1_solution_2", "r1_solution_3"):
        head = row[field].rsplit("\\boxed{", 1)[0]
        out[field] = f"{head}\\boxed{{{wrong}}}"
    return out


def generate(
    n: int,
    *,
    seed: int = 0,
    spec: ControlSpec = ControlSpec(),
    id_offset: int = 0,
    exclude: frozenset[str] = frozenset(),
) -> list[dict]:
    """``n`` rows of the positive-control pool (see the module docstring), shuffled; same arguments, same
    rows. The counts are rounded: ``round(n * noise_fraction)`` wrong answers, ``round(n * off_fraction)``
    off-distribution rows, the clean rest split over the rungs by ``spec.rung_shares``. Clean rows never
    repeat a question of ``exclude``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    n_wrong, n_off = round(n * spec.noise_fraction), round(n * spec.off_fraction)
    n_clean = n - n_wrong - n_off
    counts = np.floor(np.asarray(spec.rung_shares) * n_clean).astype(int)
    counts[np.argmax(spec.rung_shares)] += n_clean - counts.sum()
    rows, index = [], id_offset
    for name, count in zip(RUNGS, counts, strict=True):
        for _ in range(int(count)):
            topic = TOPICS[int(rng.integers(len(TOPICS)))]
            draft = draw(rng, topic, name)
            while draft.question in exclude:
                draft = draw(rng, topic, name)
            rows.append(_clean_row(index, topic, draft, name))
            index += 1
    templates = []
    for _ in range(n_wrong + n_off):  # fresh clean problems under the noise, from the same rungs
        name = RUNGS[int(rng.choice(3, p=np.asarray(spec.rung_shares) / sum(spec.rung_shares)))]
        topic = TOPICS[int(rng.integers(len(TOPICS)))]
        templates.append(_clean_row(0, topic, draw(rng, topic, name), name))
    for template in templates[:n_wrong]:
        rows.append(_wrong(rng, template, index))
        index += 1
    for template in templates[n_wrong:]:
        kind = OFF_KINDS[int(rng.integers(len(OFF_KINDS)))]
        rows.append(tinymath._noise(rng, kind, template, index))
        index += 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def generate_eval(
    n: int, *, seed: int = 0, spec: ControlSpec = ControlSpec(), pool: list[dict] | None = None
) -> list[dict]:
    """The clean held-out set of the world generated with ``seed``: the same rungs and shares, no noise,
    generator seed ``seed + 1`` and ids from ``tm-1000000``; no question of ``pool`` (any row, noise
    included) is repeated, so nothing trained on is scored (small products and sums would otherwise recur)."""
    clean = dataclasses.replace(spec, noise_fraction=0.0, off_fraction=0.0)
    exclude = frozenset(row["question"] for row in pool or ())
    return generate(n, seed=seed + EVAL_SEED_OFFSET, spec=clean, id_offset=EVAL_ID_OFFSET, exclude=exclude)


def is_clean(row: dict) -> bool:
    """Whether a control row is a correct, on-distribution problem."""
    return str(row.get("source", "")).startswith("control/")


def rung_curriculum(problems: Sequence[Problem], *, seed: int = 0) -> list[Problem]:
    """The clean rows of ``problems`` with ``difficulty`` set to their true rung, for the difficulty sampler
    (easy to hard): ``RUNGS.index(rung) + u`` with ``u`` uniform in [0, 1) from ``seed``, so the rungs come
    in order and the rows of one rung in a random order. The best curriculum the world allows (it knows
    the labels SAERL has to estimate): against the clean rows shuffled, what ordering can do here at all."""
    clean = [p for p in problems if is_clean({"source": p.source})]
    jitter = np.random.default_rng(seed).random(len(clean))
    return [
        dataclasses.replace(p, difficulty=RUNGS.index(p.source.removeprefix("control/")) + float(u))
        for p, u in zip(clean, jitter, strict=True)
    ]
