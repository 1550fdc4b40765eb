"""The positive-control world: deterministic, the planted shares and rungs, plausible wrong answers, a clean
held-out set disjoint from the pool; the conditions report."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from saerl_jax.data import control
from saerl_jax.data.problems import load_problems

N = 1000


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return control.generate(N, seed=3)


def test_same_seed_same_rows(rows):
    assert control.generate(N, seed=3) == rows
    assert control.generate(N, seed=4) != rows


def test_planted_shares(rows):
    counts = Counter(row["source"] for row in rows)
    spec = control.ControlSpec()
    assert counts["noise/wrong_answer"] == round(N * spec.noise_fraction)
    assert sum(counts[f"noise/{k}"] for k in control.OFF_KINDS) == round(N * spec.off_fraction)
    clean = N - round(N * spec.noise_fraction) - round(N * spec.off_fraction)
    for rung, share in zip(control.RUNGS, spec.rung_shares, strict=True):
        assert abs(counts[f"control/{rung}"] - share * clean) <= 1
    assert len({row["id"] for row in rows}) == N


def _numbers(question: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", question)]


def test_rungs_follow_digits(rows):
    for row in rows:
        if not row["source"].startswith("control/"):
            continue
        a = _numbers(row["question"])[0]
        rung = row["source"].removeprefix("control/")
        if "Multiplication" in row["topic"]:
            assert len(str(a)) == control.RUNGS.index(rung) + 1
        elif rung == "easy":
            assert a < 100
        elif rung == "medium":
            assert 100 <= a < 10_000
        else:
            assert a >= 10_000


def test_wrong_answers_are_plausible_slips(rows):
    wrong = [row for row in rows if row["source"] == "noise/wrong_answer"]
    for row in wrong:
        numbers = _numbers(row["question"])
        truth = eval(row["question"].removeprefix("What is ").rstrip("?"))
        assert len(numbers) == 2
        delta = abs(int(row["final_answer"]) - truth)
        assert delta > 0 and str(delta).strip("0") == "1"  # one place value off by one
        assert all(field.endswith(f"\\boxed{{{row['final_answer']}}}") for field in (row["r1_solution_1"],))


def test_eval_is_clean_and_disjoint(rows):
    held = control.generate_eval(300, seed=3, pool=rows)
    assert all(control.is_clean(row) for row in held)
    assert not {row["id"] for row in held} & {row["id"] for row in rows}
    assert not {row["question"] for row in held} & {row["question"] for row in rows}
    assert control.generate_eval(300, seed=3) != held  # without the pool, small problems recur


def test_written_world_loads_in_the_deepmath_schema(tmp_path):
    from saerl_jax.data.tinymath import write_jsonl

    path = write_jsonl(control.generate(50, seed=1), tmp_path / "pool.jsonl")
    problems = load_problems(path).problems
    assert len(problems) == 50 and all(p.source for p in problems)


@pytest.mark.parametrize(
    "spec",
    [dict(rung_shares=(0.5, 0.5, 0.5)), dict(noise_fraction=0.6, off_fraction=0.4), dict(off_fraction=-0.1)],
)
def test_bad_specs_raise(spec):
    with pytest.raises(ValueError):
        control.ControlSpec(**spec)


def test_slip_never_negative_nor_right():
    rng = np.random.default_rng(0)
    for answer in [0, 1, 9, 10, 100, 12345]:
        for _ in range(50):
            wrong = control.slip(rng, answer)
            assert wrong >= 0 and wrong != answer


def test_planted_conditions_report(tmp_path):
    from saerl_jax.data.tinymath import write_jsonl
    from saerl_jax.engineering.baselines import PassRates
    from saerl_jax.experiments.control import check_conditions, conditions_table, planted_conditions

    pool = write_jsonl(control.generate(40, seed=2), tmp_path / "pool.jsonl")
    held = write_jsonl(control.generate_eval(10, seed=2), tmp_path / "eval.jsonl")
    problems = load_problems(pool).problems
    rates = np.asarray([0.0 if p.source.startswith("noise/") else 0.5 for p in problems])
    rates[0] = 1.0
    pass_rates = PassRates(ids=tuple(p.id for p in problems), pass_rate=rates, k=4, cost={}, settings={})
    c = planted_conditions(pool, held, pass_rates, [1.0] * 10, group_size=4)
    assert c["pass_rate"]["noise/wrong_answer"]["mean"] == 0.0
    assert c["zero_variance"]["noise/wrong_answer"]["mean"] == 1.0
    clean_zero = [r == 1.0 for p, r in zip(problems, rates, strict=True) if not p.source.startswith("noise/")]
    assert c["zero_variance_clean"] == pytest.approx(np.mean(clean_zero))
    assert abs(sum(c["pool"].values()) - 1) < 1e-9
    assert "| noise/wrong_answer |" in conditions_table(c)
    c["checks"] = check_conditions(c)
    assert not c["checks"]["hard rung starves GRPO: base pass rate <= 0.15"]["ok"]  # 0.5 here
    assert c["checks"]["wrong answers rarely rewarded: base pass rate <= 0.1"]["ok"]
    assert "| NO |" in conditions_table(c)


def test_rung_curriculum_orders_the_clean_rows_by_true_rung(tmp_path):
    from saerl_jax.data.tinymath import write_jsonl
    from saerl_jax.pipeline.sampler import ExternalDifficultySampler

    problems = load_problems(write_jsonl(control.generate(200, seed=5), tmp_path / "pool.jsonl")).problems
    ordered = control.rung_curriculum(problems, seed=1)
    assert [p.id for p in ordered] == [p.id for p in problems if control.is_clean({"source": p.source})]
    assert control.rung_curriculum(problems, seed=1) == ordered
    assert control.rung_curriculum(problems, seed=2) != ordered
    sampler = ExternalDifficultySampler([p.id for p in ordered], [p.difficulty for p in ordered], batch_size=8)
    order = [i for b in range(len(ordered) // 8) for i in sampler.batch(b)]
    rung = {p.id: control.RUNGS.index(p.source.removeprefix("control/")) for p in ordered}
    ranks = [rung[i] for i in order]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    by_id = sorted(p.id for p in ordered if rung[p.id] == 2)
    assert [i for i in order if rung[i] == 2] != by_id  # random within a rung, not by id


def test_control_config_pairs_with_its_reference():
    from saerl_jax.experiments.control import ControlConfig

    cfg = ControlConfig(arms=("oracle_order",), reference="vanilla_clean")
    assert cfg.arms == ("vanilla_clean", "oracle_order")
    assert ControlConfig(arms=("saerl",)).arms == ("vanilla", "saerl")
    with pytest.raises(ValueError, match="reference"):
        ControlConfig(reference="nope")
