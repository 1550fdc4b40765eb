"""Data-engineering estimators and probes on synthetic features with planted clusters, difficulty and noise;
shuffled labels must score near chance, so a probe that cannot fail would be caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from saerl_jax.cli import main
from saerl_jax.engineering.difficulty import DifficultyModel
from saerl_jax.engineering.diversity import Diversity, batch_diversity, cluster_entropy, mean_pairwise_distance
from saerl_jax.engineering.planner import Plan
from saerl_jax.engineering.probes import probe_report, topic_probe
from saerl_jax.engineering.quality import QualityFilter
from saerl_jax.features import feature_columns, store


@pytest.fixture(scope="module")
def planted():
    """1,800 rows x 30 features: 6 clusters, a linear difficulty, and 200 noise rows off the manifold."""
    rng = np.random.default_rng(0)
    n, d, k = 1800, 30, 6
    centers = rng.normal(0, 4, (k, d))
    clusters = rng.integers(k, size=n)
    X = centers[clusters] + rng.normal(0, 1, (n, d))
    w = rng.normal(0, 1, d)
    difficulty = X @ w / np.sqrt(d) + rng.normal(0, 0.3, n)
    noise = np.zeros(n, bool)
    noise[rng.choice(n, 200, replace=False)] = True
    X[noise, :10] += rng.normal(0, 1, 10) * 3  # a shift along a few directions
    return X, clusters, difficulty, noise


def test_diversity_recovers_planted_clusters(planted):
    X, clusters, _, noise = planted
    div = Diversity(n_clusters=6, batch_size=512, random_state=0).fit(X[~noise])
    assert adjusted_rand_score(clusters[~noise], div.labels_) > 0.95
    assert np.array_equal(div.predict(X[~noise]), div.labels_)
    again = Diversity(n_clusters=6, batch_size=512, random_state=0).fit(X[~noise])
    assert np.array_equal(again.labels_, div.labels_)  # seeded


def test_diversity_rejects_more_clusters_than_rows():
    with pytest.raises(ValueError, match=r"n_clusters=5 must be in \[1, 3\]"):
        Diversity(n_clusters=5).fit(np.zeros((3, 2)))


def test_batch_diversity_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2])
    assert cluster_entropy(labels[[0, 1]]) == 0.0
    assert cluster_entropy(labels[[0, 2]]) == pytest.approx(np.log(2))
    rows = np.random.default_rng(1).normal(size=(5, 3))
    assert mean_pairwise_distance(rows) == pytest.approx(pdist(rows).mean())
    assert mean_pairwise_distance(rows[:1]) == 0.0
    out = batch_diversity([np.array([0, 1]), np.array([2, 3, 4])], labels, rows[[0, 1, 2, 3, 4, 0]])
    assert out["distinct_clusters"] == 1.5
    h_two_of_three = -(1 / 3) * np.log(1 / 3) - (2 / 3) * np.log(2 / 3)  # batch 2: clusters 1, 2, 2
    assert out["cluster_entropy"] == pytest.approx((0.0 + h_two_of_three) / 2)


def test_quality_filter_finds_planted_noise_and_not_shuffled_labels(planted):
    X, _, _, noise = planted
    y = (~noise).astype(int)
    qf = QualityFilter(threshold=0.5, random_state=0).fit(X, y)
    assert qf.report()["cv_roc_auc"] > 0.97
    kept = qf.keep_mask(X)
    assert kept[~noise].mean() > 0.95 and kept[noise].mean() < 0.2
    shuffled = QualityFilter(random_state=0).fit(X, np.random.default_rng(0).permutation(y))
    assert 0.35 < shuffled.report()["cv_roc_auc"] < 0.65


def test_quality_filter_out_of_fold_scores_do_not_see_their_labels():
    # 300 rows x 400 random columns, random labels: in-sample the model separates them, out of fold not.
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(300, 400)), (rng.random(300) > 0.2).astype(int)
    qf = QualityFilter(random_state=0).fit(X, y)
    assert roc_auc_score(y, qf.score_samples(X)) > 0.99
    assert abs(roc_auc_score(y, qf.oof_scores_) - 0.5) < 0.12
    assert len(qf.cv_roc_auc_) == 5 and abs(qf.report()["cv_roc_auc"] - 0.5) < 0.12
    assert np.array_equal(qf.keep_scores(qf.oof_scores_), qf.oof_scores_ >= 0.5)
    with pytest.raises(ValueError, match="at least cv=5 rows of each label, got 3 noise"):
        QualityFilter().fit(X[:50], np.r_[np.zeros(3), np.ones(47)])


def test_quality_filter_top_k_and_errors(planted):
    X, _, _, noise = planted
    qf = QualityFilter(top_k=100, random_state=0).fit(X, (~noise).astype(int))
    keep = qf.keep_mask(X)
    assert keep.sum() == 100 and not keep[noise].any()
    with pytest.raises(ValueError, match="labels 0 \\(noise\\) and 1"):
        QualityFilter().fit(X, np.full(len(X), 2))


def test_difficulty_model_predicts_planted_difficulty_not_shuffled(planted):
    X, clusters, difficulty, _ = planted
    labels = np.full(len(X), np.nan)
    labelled = np.random.default_rng(2).choice(len(X), 900, replace=False)
    labels[labelled] = difficulty[labelled]
    model = DifficultyModel(n_labelled=600, max_labelled_fraction=0.5, random_state=0).fit(X, labels, clusters)
    report = model.report()
    assert report["n_train"] == 480 and report["n_test"] == 120 and report["n_unlabelled"] == 300
    assert report["spearman_unlabelled"] > 0.9
    assert report["spearman"] > 0.9
    unlabelled = np.isnan(labels)
    assert spearmanr(model.predict(X[unlabelled], clusters[unlabelled]), difficulty[unlabelled]).statistic > 0.9
    labels[labelled] = np.random.default_rng(3).permutation(difficulty[labelled])
    shuffled = DifficultyModel(n_labelled=600, max_labelled_fraction=0.5, random_state=0).fit(X, labels, clusters)
    assert abs(shuffled.report()["spearman_uncalibrated"]) < 0.25


def test_difficulty_labels_are_capped_at_a_fraction_of_the_pool(planted):
    # 3,000 labels asked for on 1,800 rows: only 20% (360) are used; the other 1,440 labelled rows score
    # the model out of sample.
    X, clusters, difficulty, _ = planted
    model = DifficultyModel(random_state=0).fit(X, difficulty, clusters)
    report = model.report()
    assert report["n_train"] + report["n_test"] == 360 and report["n_unlabelled"] == 1440
    rest = np.setdiff1d(np.arange(len(X)), np.concatenate([model.train_rows_, model.test_rows_]))
    expected = spearmanr(model.predict(X[rest], clusters[rest]), difficulty[rest]).statistic
    assert report["spearman_unlabelled"] == pytest.approx(expected) and expected > 0.9
    full = DifficultyModel(max_labelled_fraction=1.0, random_state=0).fit(X, difficulty, clusters).report()
    assert full["n_train"] + full["n_test"] == 1800 and full["spearman_unlabelled"] is None
    with pytest.raises(ValueError, match=r"max_labelled_fraction must be in \(0, 1\]"):
        DifficultyModel(max_labelled_fraction=0.0).fit(X, difficulty, clusters)


def test_cluster_calibration_is_the_shrunken_mean_residual(planted):
    X, clusters, difficulty, _ = planted
    # Per-cluster offsets the features cannot see: calibration must move each cluster by n/(n+lam) of its
    # mean residual over its labelled training rows.
    y = difficulty + np.array([3.0, -2.0, 0.0, 1.0, 5.0, -4.0])[clusters] * (np.arange(len(X)) % 2)
    model = DifficultyModel(n_labelled=1000, lam=20.0, random_state=0).fit(X, y, clusters)
    train = model.train_rows_
    residual = y[train] - model.pipeline_.predict(X[train])
    for c in range(6):
        r = residual[clusters[train] == c]
        assert model.offsets_[c] == pytest.approx(len(r) / (len(r) + 20.0) * r.mean())
    d_hat = model.pipeline_.predict(X[:5])
    assert np.allclose(model.predict(X[:5], clusters[:5]), d_hat + [model.offsets_[c] for c in clusters[:5]])
    assert model.predict(X[:1], [99])[0] == pytest.approx(model.pipeline_.predict(X[:1])[0])  # unseen cluster


def test_difficulty_model_needs_labels(planted):
    X, clusters, _, _ = planted
    with pytest.raises(ValueError, match="only 0 rows have a difficulty label"):
        DifficultyModel().fit(X, np.full(len(X), np.nan), clusters)


def test_probes_find_planted_structure_and_chance_on_shuffled(planted):
    X, clusters, difficulty, noise = planted
    rng = np.random.default_rng(4)
    labels = {"topic": clusters, "difficulty": difficulty, "quality": difficulty * 0.5 + 1, "noise": noise}
    report = probe_report({"sae": X, "metadata": X[:, :2]}, labels, cv=4)
    sae = report["sae"]
    assert sae["topic"]["accuracy"]["mean"] > 0.95 > sae["topic"]["majority_baseline"] + 0.5
    assert sae["difficulty"]["spearman"]["mean"] > 0.9
    assert sae["quality"]["pearson"]["mean"] > 0.9
    assert sae["noise"]["roc_auc"]["mean"] > 0.97
    for result in (sae["topic"]["accuracy"], sae["noise"]["roc_auc"]):
        assert result["ci_low"] <= result["mean"] <= result["ci_high"]
    assert report["metadata"]["topic"]["accuracy"]["mean"] < sae["topic"]["accuracy"]["mean"]
    shuffled = probe_report({"sae": X}, {k: rng.permutation(v) for k, v in labels.items()}, cv=4)["sae"]
    assert shuffled["topic"]["accuracy"]["mean"] < shuffled["topic"]["majority_baseline"] + 0.08
    assert abs(shuffled["difficulty"]["spearman"]["mean"]) < 0.15
    assert 0.35 < shuffled["noise"]["roc_auc"]["mean"] < 0.65


def test_probe_report_rejects_unknown_labels(planted):
    with pytest.raises(ValueError, match="unknown probe label"):
        probe_report({"x": planted[0]}, {"topics": planted[1]})
    assert topic_probe(planted[0], planted[1], cv=3)["majority_baseline"] < 0.25


def _synthetic_store(directory, planted, n_latents=6, dense=False, name="store"):
    """A feature store + problems file carrying the planted structure (columns named as extract names them)."""
    X, clusters, difficulty, noise = planted
    n = len(X)
    columns = feature_columns(None, hidden_size=n_latents) if dense else feature_columns(np.arange(n_latents))
    codes = X[:, : 4 * n_latents]
    meta = np.stack([np.full(n, 40.0), 20 + 3 * difficulty, np.zeros(n), np.full(n, 0.2), np.ones(n)], axis=1)
    ids = [f"p{i:05d}" for i in range(n)]
    latent_ids = None if dense else list(range(n_latents))
    manifest = {"ids": ids, "columns": columns, "part_size": 1000, "latent_ids": latent_ids, "format_version": 1}
    manifest |= {"model": "synthetic", "layer": 0, "sae": None, "dataset": {"path": "problems.jsonl"}, "options": {}}
    store.open_store(directory / name, manifest)
    for index, (start, end) in enumerate(store.part_ranges(n, 1000)):
        store.write_part(directory / name, index, ids[start:end], np.hstack([codes, meta])[start:end])
    rows = [
        {
            "id": ids[i],
            "question": f"q{i}",
            "final_answer": "1",
            "difficulty": float(difficulty[i]),
            "topic": f"Mathematics -> T{clusters[i]}",
            "source": "noise/garbled" if noise[i] else "tinymath",
        }
        for i in range(n)
    ]
    (directory / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / name, directory / "problems.jsonl"


def test_saerl_engineer_builds_a_plan_with_report_and_plots(planted, tmp_path):
    store_dir, data = _synthetic_store(tmp_path, planted)
    argv = ["engineer", "--store", str(store_dir), "--data", str(data), "--n-clusters", "6", "--n-labelled", "600"]
    dense_dir, _ = _synthetic_store(tmp_path, planted, n_latents=5, dense=True, name="dense")
    argv += ["--batch-size", "32", "--probe-sample", "900", "--dense-store", str(dense_dir)]
    assert main([*argv, "--out", str(tmp_path / "plan")]) == 0
    report = json.loads((tmp_path / "plan" / "report.json").read_text())
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    noise_ids = {f"p{i:05d}" for i in np.flatnonzero(planted[3])}
    quality = report["quality"]
    assert quality["noise_removed"] > 0.7 and quality["clean_kept"] > 0.95 and quality["heldout_roc_auc"] > 0.95
    assert quality["n_labelled"] == len(quality["labelled_ids"]) == 360 and quality["n_heldout"] == 1440
    difficulty = report["difficulty"]
    assert difficulty["n_train"] + difficulty["n_test"] == int(0.2 * quality["kept"])
    assert difficulty["spearman_unlabelled"] > 0.9
    assert len(set(plan.ids()) & noise_ids) < 0.2 * len(noise_ids)
    assert report["plan"]["difficulty_monotonicity"] > 0.8
    sweep = report["mixing_sweep"]
    assert sweep["0.5"]["cluster_entropy"] > sweep["0.1"]["cluster_entropy"] > sweep["0.0"]["cluster_entropy"]
    assert sweep["0.1"]["distinct_clusters"] > sweep["0.0"]["distinct_clusters"]
    assert len(report["clusters"]) == 6 and all(len(c["typical_questions"]) == 3 for c in report["clusters"])
    assert report["probes"]["sae"]["topic"]["accuracy"]["mean"] > 0.9
    assert set(report["probes"]) == {"sae", "dense", "metadata"}
    assert report["probes"]["dense"]["topic"]["accuracy"]["mean"] > 0.9
    assert (tmp_path / "plan" / "plan.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "plan" / "report.md").read_text()
    assert "## Probes" in markdown and "| sae | topic accuracy |" in markdown and "## Clusters" in markdown
    assert "Fitted on 360 labelled rows" in markdown and "applied to the other 1440 rows" in markdown
    (tmp_path / "plan" / "report.md").unlink()
    assert main(["report", "--plan", str(tmp_path / "plan")]) == 0
    assert (tmp_path / "plan" / "report.md").read_text() == markdown
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "plan.json").read_bytes() == (tmp_path / "plan" / "plan.json").read_bytes()


def test_engineer_names_store_ids_missing_from_the_problems(planted, tmp_path):
    store_dir, data = _synthetic_store(tmp_path, planted)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SystemExit, match=r"1 store ids are not in the problems file \(first: p01799\)"):
        main(["engineer", "--store", str(store_dir), "--data", str(data), "--out", str(tmp_path / "o")])


def test_engineer_refuses_a_sae_store_as_the_dense_baseline(planted, tmp_path):
    store_dir, data = _synthetic_store(tmp_path, planted)
    with pytest.raises(SystemExit, match="not a dense store"):
        main(["engineer", "--store", str(store_dir), "--data", str(data), "--out", str(tmp_path / "o"),
              "--dense-store", str(store_dir), "--n-clusters", "6", "--n-labelled", "600"])  # fmt: skip


def _random_pool(n: int = 500, n_columns: int = 600, seed: int = 6):
    """Random features with 15% of rows labelled noise at random: nothing to find."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_columns))
    difficulty = X[:, :10].sum(axis=1) + rng.normal(size=n)
    return X, rng.integers(4, size=n), difficulty, rng.random(n) < 0.15


def test_engineer_quality_figures_are_out_of_sample_on_random_labels(tmp_path):
    # In-sample, a 600-column filter "removed" most of the random noise labels; out of sample it removes
    # noise at the rate it removes clean rows, and its AUC is chance.
    store_dir, data = _synthetic_store(tmp_path, _random_pool(), n_latents=150)
    argv = ["engineer", "--store", str(store_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*argv, "--n-clusters", "4", "--batch-size", "16", "--no-probes"]) == 0
    quality = json.loads((tmp_path / "o" / "report.json").read_text())["quality"]
    assert quality["n_labelled"] == 100 and quality["n_heldout"] == 400
    assert quality["noise_removed"] < 0.5
    assert abs(quality["noise_removed"] - (1 - quality["clean_kept"])) < 0.15
    assert abs(quality["heldout_roc_auc"] - 0.5) < 0.12 and abs(quality["cv_roc_auc"] - 0.5) < 0.2
    kept_ids = set(Plan.load(tmp_path / "o" / "plan.json").ids())
    labelled = set(quality["labelled_ids"])
    noise = {f"p{i:05d}" for i in np.flatnonzero(_random_pool()[3])}
    assert not kept_ids & labelled & noise and labelled - noise <= kept_ids  # labelled rows: by their label


def test_engineer_reads_problems_through_column_mappings_and_skips_invalid_rows(planted, tmp_path):
    store_dir, data = _synthetic_store(tmp_path, planted)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [{("problem" if k == "question" else k): v for k, v in row.items()} for row in rows]
    rows.append({"id": "bad", "problem": "no answer"})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["engineer", "--store", str(store_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    argv += ["--n-clusters", "6", "--batch-size", "32", "--no-probes"]
    with pytest.raises(SystemExit, match="question"):
        main(argv)
    assert main([*argv, "--column", "question=problem", "--skip-invalid"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["clusters"][0]["typical_questions"][0].startswith("q")
    assert report["config"]["column"] == ["question=problem"] and report["config"]["skip_invalid"]
