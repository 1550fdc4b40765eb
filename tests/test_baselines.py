"""The baselines SAERL is compared with: the rollout-accuracy curriculum (pass rates of the base policy on
tiny-math, batching-independent and resumable) and hidden-state-compression selection (k-center coverage,
dense stores, extraction cost)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.problems import Problem, load_problems
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.engineering import (
    PassRates,
    baselines,
    compressed_selection,
    extraction_cost,
    rollout_difficulty,
    rollout_pass_rates,
    select_from_store,
    write_rollout_pool,
    write_selected_pool,
)
from saerl_jax.features import ExtractJob, feature_columns, run_extract
from saerl_jax.features.store import FORMAT_VERSION, open_store, write_part
from saerl_jax.model import load_pretrained

K, MAX_NEW_TOKENS = 4, 24


def make_problems(n: int) -> list[Problem]:
    return [
        Problem(id=f"p{i}", question=f"What is {i} + 1?", final_answer=str(i + 1), difficulty=5.0, topic="t")
        for i in range(n)
    ]


def blobs(n_blobs: int, per_blob: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs ``[n_blobs * per_blob, dims]`` (shuffled) and each row's blob."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=50.0, size=(n_blobs, dims))
    labels = rng.permutation(np.repeat(np.arange(n_blobs), per_blob))
    return centers[labels] + rng.normal(size=(len(labels), dims)), labels


# --- rollout-accuracy curriculum -----------------------------------------------------------------------
def test_rollout_difficulty_is_high_for_low_pass_rates_and_stays_in_1_to_10():
    difficulty = rollout_difficulty(np.array([0.0, 0.25, 0.5, 1.0]), K)
    np.testing.assert_allclose(difficulty, [10.0, 7.75, 5.5, 1.0])
    for bad_rate, bad_k in [([0.3], 4), ([1.25], 4), ([-0.25], 4), ([0.5], 0)]:
        with pytest.raises(ValueError):
            rollout_difficulty(np.array(bad_rate), bad_k)


def test_write_rollout_pool_keeps_rows_and_their_order_and_replaces_difficulty(tmp_path):
    problems = make_problems(3)
    rates = PassRates(
        ids=("p2", "p0", "p1"), pass_rate=np.array([0.0, 1.0, 0.5]), k=2, cost={}, settings={}
    )  # another order than the pool's
    path = write_rollout_pool(problems, rates, tmp_path / "pool.jsonl")
    written = load_problems(path).problems
    assert [p.id for p in written] == ["p0", "p1", "p2"]
    assert [p.difficulty for p in written] == [1.0, 5.5, 10.0]
    assert [dataclasses.replace(p, difficulty=5.0) for p in written] == problems

    with pytest.raises(ValueError, match="'p3' has no pass rate"):
        write_rollout_pool(make_problems(4), rates, tmp_path / "more.jsonl")


@pytest.fixture(scope="module")
def policy():
    """The shipped tiny-math model and six eval problems short enough to finish in MAX_NEW_TOKENS."""
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    problems = load_problems(ASSETS / "eval.jsonl", limit=60).problems
    problems = sorted(problems, key=lambda p: len(tokenizer.encode(p.r1_solution_1)))[:6]
    return load_pretrained(ASSETS / "model"), tokenizer, problems


def test_pass_rates_do_not_depend_on_batching_and_resume_from_their_file(policy, tmp_path, monkeypatch):
    model, tokenizer, problems = policy
    settings = dict(k=K, max_new_tokens=MAX_NEW_TOKENS, seed=0, progress=False, model_name="tiny-math")
    out = tmp_path / "rates.json"
    rates = rollout_pass_rates(model, tokenizer, problems, batch_size=24, out=out, **settings)
    rebatched = rollout_pass_rates(model, tokenizer, problems, batch_size=4, **settings)

    assert rates.ids == tuple(p.id for p in problems) and rates.k == K
    np.testing.assert_array_equal(rates.pass_rate, rebatched.pass_rate)
    assert set(np.unique(rates.pass_rate * K)) <= set(range(K + 1))
    assert 0 < rates.pass_rate.mean() < 1  # some problems solved, some not: the ordering has a signal
    n = len(problems)
    assert rates.cost["samples"] == n * K
    assert 0 < rates.cost["generated_tokens"] <= n * K * MAX_NEW_TOKENS
    assert rates.cost["prompt_tokens"] == K * sum(
        len(format_example(tokenizer, p.question).input_ids) for p in problems
    )
    assert rates.cost["seconds"] > 0

    saved = PassRates.load(out)
    assert (saved.ids, saved.k, saved.cost, saved.settings) == (rates.ids, rates.k, rates.cost, rates.settings)
    np.testing.assert_array_equal(saved.pass_rate, rates.pass_rate)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(baselines, "sample_and_grade", no_sampling)
    reused = rollout_pass_rates(model, tokenizer, problems, batch_size=8, out=out, **settings)
    np.testing.assert_array_equal(reused.pass_rate, rates.pass_rate)
    assert reused.cost == rates.cost
    for changed in (dict(settings, seed=1), dict(settings, k=2), dict(settings, model_name="other")):
        with pytest.raises(AssertionError, match="sampled again"):
            rollout_pass_rates(model, tokenizer, problems, out=out, **changed)
    with pytest.raises(AssertionError, match="sampled again"):
        rollout_pass_rates(model, tokenizer, problems[:5], out=out, **settings)


def test_pass_rates_reject_bad_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="'p0' is given twice"):
        rollout_pass_rates(None, None, make_problems(2) * 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rollout_pass_rates(None, None, make_problems(2), k=0)
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"ids": ["a"]}))
    with pytest.raises(ValueError, match="not a pass-rates file"):
        PassRates.load(path)


# --- hidden-state-compression selection ----------------------------------------------------------------
def test_k_center_order_on_a_line_is_the_hand_computed_one():
    x = np.arange(7.0)[:, None]  # mean 3; then the farthest ends (tie: lower index), then gaps of 1
    np.testing.assert_array_equal(compressed_selection(x, 4), [3, 0, 6, 1])


@pytest.mark.parametrize("method", ["pca", "random"])
def test_selection_is_distinct_deterministic_and_covers_every_blob(method):
    features, labels = blobs(n_blobs=6, per_blob=30, dims=12)
    features = np.hstack([features, np.full((len(features), 1), 7.0)])  # a constant column is harmless
    for budget in (6, 9, 40):
        chosen = compressed_selection(features, budget, n_components=8, method=method, seed=3)
        assert chosen.dtype == np.int64 and len(chosen) == budget == len(set(chosen.tolist()))
        assert set(labels[chosen[:6]]) == set(range(6))  # the first six picks hit six different blobs
        np.testing.assert_array_equal(
            chosen, compressed_selection(features, budget, n_components=8, method=method, seed=3)
        )


def test_selection_of_identical_rows_is_still_distinct_and_components_are_clipped():
    chosen = compressed_selection(np.ones((5, 3)), 5, n_components=32)
    assert sorted(chosen.tolist()) == [0, 1, 2, 3, 4]


def test_selection_errors_name_the_numbers():
    features = np.zeros((10, 4))
    for budget in (0, 11):
        with pytest.raises(ValueError, match=rf"budget must be in \[1, 10\].*got {budget}"):
            compressed_selection(features, budget)
    with pytest.raises(ValueError, match="unknown method 'umap'; known: pca, random"):
        compressed_selection(features, 2, method="umap")


def test_write_selected_pool_keeps_selection_order(tmp_path):
    problems = make_problems(5)
    path = write_selected_pool(problems, np.array([3, 0, 4]), tmp_path / "selected.jsonl")
    assert [p.id for p in load_problems(path).problems] == ["p3", "p0", "p4"]
    with pytest.raises(ValueError, match="distinct"):
        write_selected_pool(problems, [1, 1], tmp_path / "again.jsonl")


def fake_store(directory, ids, features, *, dense=True, prompt_span="question"):
    """A complete store written with the store's own functions, in the layout ``saerl extract`` writes."""
    hidden = features.shape[1] // 4
    options = dict(dense=dense, prompt_span=prompt_span, selection_sample=None, latent_ids_file=None)
    manifest = dict(
        format_version=FORMAT_VERSION,
        model={"path": "m"},
        layer=2,
        sae=None,
        dataset={"path": "d"},
        options=options,
        latent_ids=None if dense else list(range(hidden)),
        columns=feature_columns(None, hidden),
        ids=list(ids),
        part_size=len(ids),
    )
    open_store(directory, manifest)
    metadata = np.random.default_rng(1).integers(1, 50, size=(len(ids), 5)).astype(np.float32)
    write_part(directory, 0, list(ids), np.hstack([features, metadata]))
    return directory


def test_select_from_store_aligns_ids_and_uses_the_hidden_states_only(tmp_path):
    features, labels = blobs(n_blobs=4, per_blob=10, dims=16, seed=2)
    problems = make_problems(40)
    order = np.random.default_rng(0).permutation(40)  # the store's rows in another order than the problems
    store = fake_store(tmp_path / "dense", [problems[i].id for i in order], features[order])

    chosen = select_from_store(store, problems, 4, n_components=4)
    assert {labels[int(p.id[1:])] for p in chosen} == {0, 1, 2, 3}
    expected = compressed_selection(features[order], 4, n_components=4)  # metadata columns left out
    assert [p.id for p in chosen] == [problems[order[i]].id for i in expected]

    with pytest.raises(ValueError, match="'p0' is not in the feature store"):
        select_from_store(fake_store(tmp_path / "part", [p.id for p in problems[1:]], features[1:]), problems, 4)
    with pytest.raises(ValueError, match="id 'p39' is not among the 39 problems"):
        select_from_store(store, problems[:39], 4)
    with pytest.raises(ValueError, match="not a dense store"):
        select_from_store(fake_store(tmp_path / "sae", [p.id for p in problems], features, dense=False), problems, 4)


def test_extraction_cost_counts_the_tokens_a_dense_extraction_forwarded(tmp_path):
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    rows = [json.loads(line) for line in (ASSETS / "eval.jsonl").read_text().splitlines()[:5]]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for prompt_span in ("question", "template"):
        job = ExtractJob(
            model=ASSETS / "model",
            tokenizer=ASSETS / "tokenizer",
            data=data,
            out=tmp_path / prompt_span,
            dense=True,
            layer=2,
            prompt_span=prompt_span,
            max_solution_tokens=8,
        )
        cost = extraction_cost(run_extract(job))
        forwarded = sum(
            len(format_example(tokenizer, r["question"], r["r1_solution_1"], max_solution_tokens=8).input_ids)
            for r in rows
        )
        assert cost["forward_sequences"] == 5 and cost["selection_sequences"] == 0 and cost["layer"] == 2
        if prompt_span == "question":
            assert "tokens" not in cost and cost["span_tokens"] < forwarded
            assert extraction_cost(job.out, tokenizer)["tokens"] == forwarded
        else:
            assert cost["tokens"] == cost["span_tokens"] == forwarded
