"""Curriculum planner: invariants over a seeded sweep of configs, hand-built plans, mixing, files, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sp_stats

from saerl_jax.engineering.planner import CurriculumPlanner, Plan


def _data(n: int, n_clusters: int, seed: int, *, ties: bool = False):
    """Random ids (not in sorted order), clustered difficulty, lengths; ``ties`` rounds difficulty."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, n_clusters, n)
    difficulty = rng.normal(size=n) + 0.5 * clusters
    if ties:
        difficulty = np.round(difficulty)
    lengths = rng.integers(5, 300, n)
    ids = [f"s{i:05d}" for i in rng.permutation(n)]
    return ids, difficulty, clusters, lengths


# Every combination of the switches, three times with other sizes, plus a few shuffled baselines.
SWEEP = [
    dict(sort=sort, cluster=cluster, mixing=mixing, order="curriculum")
    for _ in range(3)
    for sort, cluster, mixing in itertools.product([True, False], [True, False], ["none", "some", "half"])
] + [dict(sort=True, cluster=True, mixing="some", order="random")] * 6
SWEEP += [dict(sort=sort, cluster=True, mixing="pooled", order="curriculum") for sort in (True, False, True)]


def _sweep_config(seed: int) -> dict:
    case, rng = SWEEP[seed], np.random.default_rng(1000 + seed)
    return dict(
        batch_size=int(rng.integers(1, 40)),
        n_stages=int(rng.integers(1, 7)),
        mixing_ratio={"none": 0.0, "some": float(rng.uniform(0.05, 0.45)), "half": 0.5, "pooled": float(rng.uniform())}[
            case["mixing"]
        ],
        mixing="pooled" if case["mixing"] == "pooled" else "pairs",
        sort=case["sort"],
        cluster=case["cluster"],
        order=case["order"],
        random_state=int(rng.integers(100)),
    )


def _expected_stages(ids, difficulty, n_stages) -> dict[str, int]:
    """Equal-count quantile stages over the samples ranked by (difficulty, id)."""
    ranked = sorted(zip(difficulty, ids, strict=True))
    return {sample_id: rank * n_stages // len(ids) for rank, (_, sample_id) in enumerate(ranked)}


@pytest.mark.parametrize("seed", range(len(SWEEP)))
def test_invariants_over_random_configs(seed):
    config = _sweep_config(seed)
    rng = np.random.default_rng(seed)
    batch_size, n_stages = config["batch_size"], config["n_stages"]
    n = batch_size if seed % 7 == 0 else int(rng.integers(batch_size, 400))  # a pool of one batch too
    ids, difficulty, clusters, lengths = _data(n, int(rng.integers(1, 6)), seed, ties=seed % 3 == 0)
    plan = CurriculumPlanner(**config).plan(ids, difficulty, clusters, lengths)
    d = dict(zip(ids, difficulty, strict=True))
    c = dict(zip(ids, clusters, strict=True))

    # Every batch is full; every id is planned; only the last batch repeats ids, each at most once.
    assert all(len(batch) == batch_size for batch in plan.batches)
    assert set(plan.ids()) == set(ids)
    head, last = [i for batch in plan.batches[:-1] for i in batch], plan.batches[-1]
    assert len(set(head)) == len(head) and len(set(last)) == len(last)
    n_repeated = len(set(head) & set(last))
    assert n_repeated == len(plan.batches) * batch_size - n < batch_size
    assert [s["n_repeated"] for s in plan.stats] == [0] * (len(plan.batches) - 1) + [n_repeated]
    assert (plan.summary()["n_samples"], plan.summary()["n_repeated"]) == (n, n_repeated)
    assert plan.config == {**config, "mixing_ratio": round(config["mixing_ratio"], 6)}
    stages = [s["stage"] for s in plan.stats]
    assert stages == sorted(stages)
    for batch, stat in zip(plan.batches, plan.stats, strict=True):
        assert sum(stat["cluster_hist"].values()) == len(batch)
        assert stat["mean_difficulty"] == pytest.approx(np.mean([d[i] for i in batch]), abs=1e-6)
        assert stat["n_clusters"] == len({c[i] for i in batch})

    if config["order"] == "random":
        assert set(stages) == {0}
        return
    if not config["sort"]:
        return
    # A batch holds samples of its own stage or (carried leftovers) of earlier ones, never of later ones.
    expected = _expected_stages(ids, difficulty, n_stages)
    for batch, stat in zip(plan.batches, plan.stats, strict=True):
        assert max(expected[i] for i in batch) <= stat["stage"]
    first_seen = list(dict.fromkeys(plan.ids()))
    for batch in plan.batches:
        assert np.all(np.diff([d[i] for i in batch]) >= 0)
    if round(config["mixing_ratio"] * batch_size) == 0:
        for s in set(expected.values()):
            for k in set(clusters):
                seq = [d[i] for i in first_seen if expected[i] == s and c[i] == k]
                assert np.all(np.diff(seq) >= 0)


def test_pool_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match="the pool has 3 samples, fewer than batch_size=4"):
        CurriculumPlanner(batch_size=4).plan(["a", "b", "c"], [0.1, 0.2, 0.3], [0, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="the pool has 3 samples, fewer than batch_size=4"):
        CurriculumPlanner(batch_size=4, order="random").plan(["a", "b", "c"], [0.1, 0.2, 0.3], [0, 0, 1], [1, 2, 3])


def test_cluster_first_round_robin_by_hand():
    # Stage of 9: cluster 7 (mean 0.3) before cluster 2 (mean 0.65); remainders pooled at the end, the
    # short last batch topped up with the sample nearest in difficulty ("f", 0.5, like "e").
    difficulty = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5, "f": 0.5, "g": 0.6, "h": 0.7, "i": 0.8}
    clusters = {"a": 7, "b": 7, "c": 7, "d": 7, "e": 7, "f": 2, "g": 2, "h": 2, "i": 2}
    ids = list("ihgfedcba")
    planner = CurriculumPlanner(batch_size=2, n_stages=1, mixing_ratio=0.0)
    plan = planner.plan(ids, [difficulty[i] for i in ids], [clusters[i] for i in ids], [1] * 9)
    assert plan.batches == [["a", "b"], ["f", "g"], ["c", "d"], ["h", "i"], ["e", "f"]]
    assert [s["dominant_cluster"] for s in plan.stats] == [7, 2, 7, 2, 2]
    assert [s["n_repeated"] for s in plan.stats] == [0, 0, 0, 0, 1]
    flat = planner.set_params(cluster=False).plan(
        ids, [difficulty[i] for i in ids], [clusters[i] for i in ids], [1] * 9
    )
    assert flat.batches == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"], ["h", "i"]]
    shuffled = planner.set_params(order="random").plan(
        ids, [difficulty[i] for i in ids], [clusters[i] for i in ids], [1] * 9
    )
    assert shuffled.batches[-1][1] == shuffled.batches[0][0]  # wrapped around to the permutation's start


def test_stage_remainders_carry_into_the_next_stage_by_hand():
    # Two stages of 3 (difficulty 0..5), one cluster, batch 2: stage 0 cuts [a, b] and carries "c" into
    # stage 1's leftover pool, after stage 1's cluster batch [d, e]: [c, f] is recorded in stage 1.
    ids, planner = list("abcdef"), CurriculumPlanner(batch_size=2, n_stages=2, mixing_ratio=0.0)
    plan = planner.plan(ids, range(6), [0] * 6, [1] * 6)
    assert plan.batches == [["a", "b"], ["d", "e"], ["c", "f"]]
    assert [s["stage"] for s in plan.stats] == [0, 1, 1] and plan.summary()["n_repeated"] == 0
    flat = planner.set_params(cluster=False).plan(ids, range(6), [0] * 6, [1] * 6)
    assert flat.batches == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [s["stage"] for s in flat.stats] == [0, 1, 1]


def test_mixing_partner_is_nearest_in_difficulty_and_length():
    # Tail of batch 0 is "d" (0.4, length 10). "y" is closer in difficulty but far longer; "z" wins.
    ids = ["a", "b", "c", "d", "x", "y", "z", "w"]
    difficulty = [0.1, 0.2, 0.3, 0.4, 0.0, 0.41, 0.45, 1.0]
    lengths = [10, 10, 10, 10, 10, 100, 10, 10]
    plan = CurriculumPlanner(batch_size=4, n_stages=1, mixing_ratio=0.25).plan(
        ids, difficulty, [0, 0, 0, 0, 1, 1, 1, 1], lengths
    )
    assert plan.batches == [["a", "b", "c", "z"], ["x", "d", "y", "w"]]
    assert [s["cluster_hist"] for s in plan.stats] == [{0: 3, 1: 1}, {0: 1, 1: 3}]


def test_mixing_raises_cluster_mix_and_keeps_batches():
    ids, difficulty, clusters, lengths = _data(2048, 4, seed=3)
    pure = CurriculumPlanner(batch_size=32, mixing_ratio=0.0).plan(ids, difficulty, clusters, lengths)
    mixed = CurriculumPlanner(batch_size=32, mixing_ratio=0.25).plan(ids, difficulty, clusters, lengths)
    assert [len(b) for b in mixed.batches] == [len(b) for b in pure.batches]
    assert sorted(mixed.ids()) == sorted(ids)
    before, after = pure.summary(), mixed.summary()
    assert after["mean_distinct_clusters"] > before["mean_distinct_clusters"] + 0.3
    assert after["mean_cluster_entropy"] > before["mean_cluster_entropy"] + 0.2
    # A swapped cluster batch holds 24 of its own and 8 of exactly one other cluster.
    swapped = [s["cluster_hist"] for s in mixed.stats if max(s["cluster_hist"].values()) == 24]
    assert len(swapped) > len(mixed.batches) // 2
    assert all(sorted(h.values()) == [8, 24] for h in swapped)
    # Partners are chosen to match, so batch mean difficulty barely moves.
    shift = np.abs(np.subtract([s["mean_difficulty"] for s in mixed.stats], [s["mean_difficulty"] for s in pure.stats]))
    assert shift.mean() < 0.05 * np.std(difficulty)


def test_random_order_has_no_trend_and_curriculum_has_one():
    ids, difficulty, clusters, lengths = _data(3000, 4, seed=5)
    shuffled = CurriculumPlanner(batch_size=32, order="random").plan(ids, difficulty, clusters, lengths).summary()
    curriculum = CurriculumPlanner(batch_size=32).plan(ids, difficulty, clusters, lengths).summary()
    assert abs(shuffled["difficulty_monotonicity"]) < 0.3
    assert curriculum["difficulty_monotonicity"] > 0.9
    # 3000 = 93 * 32 + 24: 94 full batches either way, 8 ids repeated in the last one.
    assert (shuffled["n_batches"], curriculum["n_batches"]) == (94, 94)
    assert shuffled["n_repeated"] == curriculum["n_repeated"] == 8


def test_plan_ignores_row_order():
    ids, difficulty, clusters, lengths = _data(300, 3, seed=8, ties=True)
    perm = np.random.default_rng(0).permutation(len(ids))
    planner = CurriculumPlanner(batch_size=16, sort=False, random_state=4)
    a = planner.plan(ids, difficulty, clusters, lengths)
    b = planner.plan([ids[i] for i in perm], difficulty[perm], clusters[perm], lengths[perm])
    assert a == b


def test_stats_and_summary_by_hand():
    features = [[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [1.0, 1.0]]
    plan = CurriculumPlanner(batch_size=3, n_stages=1, cluster=False).plan(
        ["p", "q", "r", "s"], [0.1, 0.2, 0.3, 0.9], [5, 5, 1, 1], [10, 20, 30, 40], features
    )
    # "s" alone is topped up with the two samples nearest its difficulty (r 0.3, q 0.2), in rank order.
    assert plan.batches == [["p", "q", "r"], ["q", "r", "s"]]
    first, last = plan.stats
    assert first["cluster_hist"] == {1: 1, 5: 2} and first["dominant_cluster"] == 5 and first["n_clusters"] == 2
    assert first["mean_length"] == 20.0 and first["mean_difficulty"] == pytest.approx(0.2)
    assert first["diversity"] == pytest.approx((5 + 4 + 3) / 3)  # distances pq, pr, qr
    assert first["n_repeated"] == 0 and last["n_repeated"] == 2
    assert last["cluster_hist"] == {1: 2, 5: 1} and last["mean_difficulty"] == pytest.approx(1.4 / 3)
    assert last["diversity"] == pytest.approx((3 + 13**0.5 + 10**0.5) / 3)  # distances qr, qs, rs
    summary = plan.summary()
    entropy = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3))
    assert summary["mean_cluster_entropy"] == pytest.approx(entropy, abs=1e-6)
    assert summary["mean_distinct_clusters"] == 2.0
    assert summary["mean_diversity"] == pytest.approx((4 + (3 + 13**0.5 + 10**0.5) / 3) / 2, abs=1e-6)
    assert summary["difficulty_monotonicity"] == 1.0 and summary["n_batches"] == 2
    assert (summary["n_samples"], summary["n_repeated"]) == (4, 2)


def test_save_is_byte_identical_and_round_trips(tmp_path):
    ids, difficulty, clusters, lengths = _data(500, 4, seed=2)
    features = np.random.default_rng(2).normal(size=(500, 6))
    meta = {"seed": 2, "inputs": "abc123"}

    def save(name, **config):
        plan = CurriculumPlanner(batch_size=24, **config).plan(ids, difficulty, clusters, lengths, features, meta=meta)
        return plan, plan.save(tmp_path / name).read_bytes()

    plan, first = save("a.json")
    assert save("b.json")[1] == first
    assert Plan.load(tmp_path / "a.json") == plan
    assert Plan.load(tmp_path / "a.json").meta == meta
    _, shuffled = save("c.json", order="random", random_state=0)
    assert save("d.json", order="random", random_state=0)[1] == shuffled
    assert save("e.json", order="random", random_state=1)[1] != shuffled
    assert save("f.json", sort=False, random_state=1)[1] != save("g.json", sort=False, random_state=2)[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(ids=["a", "b", "a"]), "'a' appears more than once"),
        (dict(clusters=[0, 1]), "clusters has 2 rows, expected 3"),
        (dict(lengths=[1, 2, 3, 4]), "lengths has 4 rows"),
        (dict(difficulty=[0.1, np.nan, 0.3]), "difficulty has non-finite"),
        (dict(difficulty=["x", "y", "z"]), "difficulty must be numeric"),
        (dict(clusters=[0.5, 1.0, 2.0]), "clusters must be integers"),
        (dict(features=np.zeros((2, 4))), "features has 2 rows"),
        (dict(features=np.zeros(3)), "features must be 2-D"),
        (dict(ids=[]), "ids is empty"),
        (dict(ids="abc"), "sequence of strings"),
    ],
)
def test_input_errors(change, message):
    inputs = dict(ids=["a", "b", "c"], difficulty=[0.1, 0.2, 0.3], clusters=[0, 1, 0], lengths=[5, 6, 7], features=None)
    with pytest.raises(ValueError, match=message):
        CurriculumPlanner().plan(**{**inputs, **change})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(mixing_ratio=0.6), "mixing_ratio must be in"),
        (dict(mixing="pooled", mixing_ratio=1.5), r"mixing_ratio must be in \[0, 1.0\] with mixing='pooled'"),
        (dict(mixing="swap"), "mixing must be one of"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(n_stages=2.0), "n_stages must be an integer"),
        (dict(order="vanilla"), "order must be"),
        (dict(sort=1), "sort must be a bool"),
        (dict(random_state=-1), "random_state must be an integer >= 0"),
    ],
)
def test_param_errors(params, message):
    with pytest.raises(ValueError, match=message):
        CurriculumPlanner(**params).plan(["a"], [0.0], [0], [1])


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"batches": []}')
    with pytest.raises(ValueError, match="not a plan file"):
        Plan.load(tmp_path / "x.json")


# --- what each ablation removes, measured on the plan ---------------------------------------------------


def _independent(n: int = 1200, n_clusters: int = 6, seed: int = 11):
    """Clusters of unequal sizes and difficulty that does not depend on the cluster."""
    rng = np.random.default_rng(seed)
    clusters = rng.choice(n_clusters, n, p=np.arange(1, n_clusters + 1) / np.arange(1, n_clusters + 1).sum())
    return [f"s{i:05d}" for i in rng.permutation(n)], rng.normal(size=n), clusters, rng.integers(5, 300, n)


def _random_distinct_clusters(clusters, batch_size: int) -> float:
    """Expected distinct clusters in a batch drawn at random without replacement."""
    n, counts = len(clusters), np.bincount(clusters)
    return float(sum(1 - sp_stats.hypergeom.pmf(0, n, c, batch_size) for c in counts))


def _summaries(data, **params) -> list[dict]:
    return [CurriculumPlanner(batch_size=16, random_state=s, **params).plan(*data).summary() for s in range(20)]


def test_no_sort_removes_the_easy_to_hard_order_even_by_stage():
    data = _data(1200, 6, seed=11)
    ids, difficulty, _, _ = data
    assert CurriculumPlanner(batch_size=16).plan(*data).summary()["difficulty_monotonicity"] > 0.9
    rhos = [s["difficulty_monotonicity"] for s in _summaries(data, sort=False)]
    assert abs(np.mean(rhos)) < 0.1
    d = dict(zip(ids, difficulty, strict=True))
    plan = CurriculumPlanner(batch_size=16, sort=False).plan(*data)
    stage_means = [
        np.mean([d[i] for b, s in zip(plan.batches, plan.stats, strict=True) if s["stage"] == k for i in b])
        for k in range(4)
    ]
    assert np.ptp(stage_means) < 0.25 * np.std(difficulty)  # stages are not difficulty quartiles
    # Clustering and mixing stay: the batches are as cluster-pure as the sorted plan's.
    sorted_mix = CurriculumPlanner(batch_size=16).plan(*data).summary()["mean_distinct_clusters"]
    assert abs(plan.summary()["mean_distinct_clusters"] - sorted_mix) < 0.3


def test_no_cluster_mixes_clusters_as_random_batches_do():
    data = _independent()
    expected = _random_distinct_clusters(data[2], 16)
    flat = CurriculumPlanner(batch_size=16, cluster=False).plan(*data).summary()
    assert flat["mean_distinct_clusters"] == pytest.approx(expected, rel=0.05)
    assert flat["difficulty_monotonicity"] > 0.9  # the order stays
    grouped = CurriculumPlanner(batch_size=16).plan(*data).summary()
    assert grouped["mean_distinct_clusters"] < 0.6 * expected


def test_no_mixing_leaves_cluster_batches_single_cluster():
    data = _independent()
    n_clusters = len(set(data[2]))
    pure = CurriculumPlanner(batch_size=16, mixing_ratio=0.0).plan(*data)
    multi = sum(s["n_clusters"] > 1 for s in pure.stats)
    assert multi <= 4 * n_clusters  # at most the leftover batches at each of the 4 stages' ends
    assert multi < 0.2 * len(pure.batches)
    mixed = CurriculumPlanner(batch_size=16, mixing_ratio=0.25).plan(*data)
    assert sum(s["n_clusters"] > 1 for s in mixed.stats) > 0.8 * len(mixed.batches)


def test_random_order_has_no_trend_and_no_cluster_grouping():
    data = _independent()
    summaries = _summaries(data, order="random")
    assert abs(np.mean([s["difficulty_monotonicity"] for s in summaries])) < 0.1
    expected = _random_distinct_clusters(data[2], 16)
    assert np.mean([s["mean_distinct_clusters"] for s in summaries]) == pytest.approx(expected, rel=0.03)


def test_pooled_mixing_spans_cluster_pure_to_stage_random_batches():
    data = _independent()
    ids, _, clusters, _ = data
    random_distinct = _random_distinct_clusters(clusters, 16)
    pure = CurriculumPlanner(batch_size=16, mixing_ratio=0.0).plan(*data)
    assert CurriculumPlanner(batch_size=16, mixing_ratio=0.0, mixing="pooled").plan(*data).batches == pure.batches
    entropy = []
    for ratio in (0.0, 0.25, 0.5, 0.75, 1.0):
        runs = [
            CurriculumPlanner(batch_size=16, mixing_ratio=ratio, mixing="pooled", random_state=s).plan(*data)
            for s in range(10)
        ]
        for plan in runs:
            assert sorted(plan.ids()) == sorted(ids) and {len(b) for b in plan.batches} == {16}
            assert [s["stage"] for s in plan.stats] == [s["stage"] for s in pure.stats]  # batches stay in their stage
        entropy.append(np.mean([p.summary()["mean_cluster_entropy"] for p in runs]))
        if ratio == 0.25:  # a cluster batch keeps 12 of its own 16
            kept = [max(s["cluster_hist"].values()) for p in runs for s in p.stats]
            assert np.mean(np.array(kept) >= 12) > 0.8
    assert np.all(np.diff(entropy) > 0), entropy
    stage_random = [
        CurriculumPlanner(batch_size=16, mixing_ratio=1.0, mixing="pooled", random_state=s).plan(*data).summary()
        for s in range(10)
    ]
    distinct = np.mean([s["mean_distinct_clusters"] for s in stage_random])
    assert distinct == pytest.approx(random_distinct, rel=0.08)
    assert np.mean([s["difficulty_monotonicity"] for s in stage_random]) > 0.6  # the stages' order stays
