"""``saerl engineer``: feature store + problems -> quality filter -> clusters -> difficulty -> curriculum plan,
with probes, cluster explanations, ``report.json`` and PNG plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
from sklearn.metrics import roc_auc_score

from saerl_jax.data.problems import column_mapping, load_problems
from saerl_jax.engineering.difficulty import DifficultyModel
from saerl_jax.engineering.diversity import Diversity
from saerl_jax.engineering.planner import CurriculumPlanner
from saerl_jax.engineering.probes import probe_report
from saerl_jax.engineering.quality import QualityFilter
from saerl_jax.engineering.report import render_report
from saerl_jax.errors import UserError
from saerl_jax.features import METADATA_COLUMNS, load_store
from saerl_jax.features.store import MANIFEST, file_hash
from saerl_jax.io import atomic_write


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineerJob:
    """Options of ``saerl engineer``."""

    store: Path
    """Feature store from ``saerl extract``."""
    data: Path
    """The problems the store was made from (labels: ``source``, ``difficulty``, ``topic``)."""
    out: Path
    """Directory for ``plan.json``, ``report.json`` and plots."""
    n_clusters: int = 64
    """MiniBatchKMeans clusters."""
    n_labelled: int = 3000
    """Rows with a difficulty label the difficulty model may use (capped by ``max_labelled_fraction``)."""
    n_quality_labelled: int = 3000
    """Rows whose ``source`` label (noise or not) the quality filter is fitted on (capped by
    ``max_labelled_fraction``); the filter is applied to the other rows."""
    max_labelled_fraction: float = 0.2
    """Cap on each labelled subset (quality filter, difficulty model) as a share of the rows it is drawn
    from (all rows; the kept rows), in (0, 1]."""
    difficulty: Literal["sae", "external"] = "sae"
    """Order by the calibrated SAE proxy, or by the dataset's own labels (ablation)."""
    quality: bool = True
    """Fit and apply the quality filter when every row has a ``source`` label and some are noise; False
    keeps every row (e.g. a re-plan over rows an earlier filter already kept)."""
    quality_threshold: float = 0.5
    """Keep an unlabelled row whose out-of-sample in-distribution probability is at least this (needs
    ``source`` labels); a labelled row is kept or removed by its own label."""
    batch_size: int = 128
    """Ids per plan batch: must equal the trainer's global batch size (``saerl train --batch-size``), which
    trains one plan batch per step."""
    n_stages: int = 4
    """Curriculum stages."""
    mixing_ratio: float = 0.25
    """Share of each cluster batch mixed: in [0, 0.5] with ``mixing="pairs"``, [0, 1] with ``"pooled"``."""
    mixing: Literal["pairs", "pooled"] = "pairs"
    """Swap with the neighbouring cluster's batch, or deal a stage-wide pool back at random (see
    :class:`CurriculumPlanner`)."""
    sort: bool = True
    """The easy-to-hard order; False (ablation) removes it entirely, stages included (see
    :class:`CurriculumPlanner`)."""
    cluster: bool = True
    """Cluster-first batches; False (ablation) cuts each difficulty stage directly."""
    order: Literal["curriculum", "random"] = "curriculum"
    """``random`` is the vanilla shuffled baseline on the kept rows."""
    probes: bool = True
    """Run the probe report (SAE features vs metadata only)."""
    probe_sample: int = 4000
    """Rows (seeded sample) the probes use."""
    dense_store: Path | None = None
    """A store made with ``saerl extract --dense`` over the same problems: probed beside the SAE codes."""
    column: tuple[str, ...] = ()
    """``field=column`` mappings for a problems file with other column names, as ``saerl extract --column``."""
    skip_invalid: bool = False
    """Skip invalid problem rows instead of stopping, as ``saerl extract --skip-invalid``."""
    seed: int = 0
    """Seed of every estimator, the labelled subsets and the planner."""

    def __post_init__(self) -> None:
        if not 0 < self.max_labelled_fraction <= 1:
            raise UserError(f"max_labelled_fraction must be in (0, 1], got {self.max_labelled_fraction}")
        for name in ("n_labelled", "n_quality_labelled", "batch_size", "n_stages", "n_clusters"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


def _labels(job: EngineerJob, ids: list[str]) -> dict[str, np.ndarray]:
    loaded = load_problems(job.data, columns=column_mapping(job.column) or None, skip_invalid=job.skip_invalid)
    problems = {p.id: p for p in loaded.problems}
    missing = [i for i in ids if i not in problems]
    if missing:
        raise UserError(f"{job.data}: {len(missing)} store ids are not in the problems file (first: {missing[0]})")
    rows = [problems[i] for i in ids]
    return {
        "noise": np.array([(p.source or "").startswith("noise/") for p in rows]),
        "has_source": np.array([p.source is not None for p in rows]),
        "difficulty": np.array([np.nan if p.difficulty is None else p.difficulty for p in rows]),
        "topic": np.array([p.topic or "" for p in rows]),
        "question": np.array([p.question for p in rows]),
    }


def _explain_clusters(codes_NC, columns, labels_N, standardized_NC, centers_KC, questions, top=5) -> list[dict]:
    """Per cluster: size, top latents by standardized lift of their mean prompt activation, and the three
    questions nearest the cluster centre."""
    prompt_mean = [i for i, c in enumerate(columns) if c.startswith("prompt_mean_")]
    overall = codes_NC[:, prompt_mean].mean(axis=0)
    spread = codes_NC[:, prompt_mean].std(axis=0) + 1e-6  # lift in standard deviations: scale-free
    out = []
    for k in range(len(centers_KC)):
        members = np.flatnonzero(labels_N == k)
        if not len(members):
            continue
        lift = (codes_NC[members][:, prompt_mean].mean(axis=0) - overall) / spread
        nearest = members[np.argsort(np.linalg.norm(standardized_NC[members] - centers_KC[k], axis=1))[:3]]
        out.append(
            {
                "cluster": k,
                "size": len(members),
                "top_latents": [columns[prompt_mean[i]].removeprefix("prompt_mean_") for i in np.argsort(-lift)[:top]],
                "typical_questions": [str(questions[i]) for i in nearest],
            }
        )
    return out


def run_engineer(job: EngineerJob) -> dict:
    """Builds and saves the plan; returns the report (also written to ``out/report.json``)."""
    store = load_store(job.store)
    labels = _labels(job, store.ids)
    X = store.features
    n_meta = len(METADATA_COLUMNS)
    report: dict = {"store": str(job.store), "samples": len(store.ids), "config": dataclasses.asdict(job)}
    keep = np.ones(len(X), bool)
    if job.quality and labels["has_source"].all() and labels["noise"].any():
        keep, report["quality"] = _quality_filter(job, X, labels["noise"], store.ids)
    kept = np.flatnonzero(keep)
    X_kept = X[kept]  # one copy of the kept rows for every later stage
    diversity = Diversity(n_clusters=job.n_clusters, random_state=job.seed).fit(X_kept)
    clusters = diversity.labels_
    if job.difficulty == "external":
        if np.isnan(labels["difficulty"][kept]).any():
            raise UserError(f"{job.data}: --difficulty external needs a difficulty label on every kept problem")
        difficulty = labels["difficulty"][kept]
    else:
        model = DifficultyModel(
            n_labelled=job.n_labelled, max_labelled_fraction=job.max_labelled_fraction, random_state=job.seed
        )
        difficulty = model.fit(X_kept, labels["difficulty"][kept], clusters).predict(X_kept, clusters)
        report["difficulty"] = model.report()
    ids = [store.ids[i] for i in kept]
    lengths = X_kept[:, -n_meta] + X_kept[:, -n_meta + 1]  # prompt + solution tokens
    standardized = diversity.transform(X_kept)
    meta = {"seed": job.seed, "store_manifest": file_hash(job.store / MANIFEST), "data": file_hash(job.data)}
    planner = _planner(job, job.mixing_ratio)
    plan = planner.plan(ids, difficulty, clusters, lengths, standardized[:, :-n_meta], meta=meta)
    job.out.mkdir(parents=True, exist_ok=True)
    plan.save(job.out / "plan.json")
    report["plan"] = plan.summary()
    report["mixing_sweep"] = {}
    for m in (0.0, 0.1, 0.25, 0.5) + ((0.75, 1.0) if job.mixing == "pooled" else ()):
        same = m == job.mixing_ratio  # the plan just built; its features only add diversity, not used here
        summary = report["plan"] if same else _planner(job, m).plan(ids, difficulty, clusters, lengths).summary()
        report["mixing_sweep"][str(m)] = {
            "distinct_clusters": summary["mean_distinct_clusters"],
            "cluster_entropy": summary["mean_cluster_entropy"],
        }
    report["clusters"] = _explain_clusters(
        X_kept[:, :-n_meta],
        store.columns,
        clusters,
        standardized,
        diversity.kmeans_.cluster_centers_,
        labels["question"][kept],
    )
    if job.probes:
        report["probes"] = _probes(job, X, labels, n_meta, store.ids)
    text = json.dumps(report, indent=1, default=str) + "\n"
    atomic_write(job.out / "report.json", lambda tmp: Path(tmp).write_text(text))
    render_report(job.out)
    print(
        f"wrote {job.out / 'plan.json'} ({report['plan']['n_batches']} batches), {job.out / 'report.json'}, report.md"
    )
    return report


def _quality_filter(job: EngineerJob, X, noise_N: np.ndarray, ids: list[str]) -> tuple[np.ndarray, dict]:
    """Fits the filter on a seeded labelled subset and applies it to the other (held-out) rows.

    Returns the keep mask ``[N]`` and the report. A labelled row is kept or removed by its own label; a
    held-out row by its probability. The out-of-fold probabilities use 5 folds, fewer (at least 2) when the
    subset holds fewer than 5 rows of a label. Every figure is out of sample: ``cv_roc_auc`` from the labelled rows'
    out-of-fold probabilities, ``heldout_roc_auc`` / ``noise_removed`` / ``clean_kept`` on the held-out rows
    (None where those rows lack a class).
    """
    n = len(noise_N)
    budget = min(job.n_quality_labelled, int(job.max_labelled_fraction * n))
    labelled = np.sort(np.random.default_rng(job.seed).permutation(n)[:budget])
    n_noise = int(noise_N[labelled].sum())
    n_minority = min(n_noise, budget - n_noise)
    if n_minority < 2:
        raise UserError(
            f"the quality filter's labelled subset ({budget} of {n} rows: --n-quality-labelled "
            f"{job.n_quality_labelled}, --max-labelled-fraction {job.max_labelled_fraction}) holds {n_noise} "
            "noise rows; it needs at least 2 of each label: label more rows"
        )
    quality = QualityFilter(threshold=job.quality_threshold, cv=min(5, n_minority), random_state=job.seed)
    quality.fit(X[labelled], (~noise_N[labelled]).astype(int))
    scores_N = quality.score_samples(X)
    scores_N[labelled] = quality.oof_scores_
    keep = quality.keep_scores(scores_N)
    keep[labelled] = ~noise_N[labelled]
    heldout = np.setdiff1d(np.arange(n), labelled)
    noise, clean = heldout[noise_N[heldout]], heldout[~noise_N[heldout]]
    both = len(noise) and len(clean)
    fitted = {k: v for k, v in quality.report().items() if k != "n_train"}  # n_train is n_labelled
    return keep, fitted | {
        "kept": int(keep.sum()),
        "n_labelled": budget,
        "n_labelled_noise": n_noise,
        "n_heldout": len(heldout),
        "heldout_roc_auc": float(roc_auc_score(~noise_N[heldout], scores_N[heldout])) if both else None,
        "noise_removed": float((~keep[noise]).mean()) if len(noise) else None,
        "clean_kept": float(keep[clean].mean()) if len(clean) else None,
        "labelled_ids": [ids[i] for i in labelled],
    }


def _planner(job: EngineerJob, mixing_ratio: float) -> CurriculumPlanner:
    return CurriculumPlanner(
        batch_size=job.batch_size,
        n_stages=job.n_stages,
        mixing_ratio=mixing_ratio,
        mixing=job.mixing,
        sort=job.sort,
        cluster=job.cluster,
        order=job.order,
        random_state=job.seed,
    )


def _dense_features(job: EngineerJob, ids: list[str]) -> np.ndarray:
    """The dense store's pooled hidden states for ``ids`` (the paper's dense baseline), metadata dropped."""
    dense = load_store(job.dense_store)
    if dense.manifest.get("latent_ids") is not None:
        raise UserError(f"{job.dense_store}: not a dense store (made without --dense)")
    row = {sample_id: i for i, sample_id in enumerate(dense.ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise UserError(f"{job.dense_store}: {len(missing)} ids of {job.store} are missing (first: {missing[0]})")
    return dense.features[[row[i] for i in ids], : -len(METADATA_COLUMNS)]


def probe_store(job: EngineerJob) -> dict:
    """The probe table of ``job.store`` (SAE codes, metadata only, and ``job.dense_store`` when given) without
    building a plan: ``{feature_set: {probe: result}}`` as in ``report.json``'s ``probes``."""
    store = load_store(job.store)
    return _probes(job, store.features, _labels(job, store.ids), len(METADATA_COLUMNS), store.ids)


def _probes(job: EngineerJob, X, labels, n_meta, ids: list[str]) -> dict:
    """Topic and difficulty probes on clean rows, the noise probe on all, for SAE codes, dense states (with
    ``dense_store``) and metadata only."""
    rows = np.sort(np.random.default_rng(job.seed).permutation(len(X))[: job.probe_sample])
    clean = rows[~labels["noise"][rows]]
    tasks = {
        "topic": clean,
        "difficulty": clean[np.isfinite(labels["difficulty"][clean])],
        "noise": rows,
    }
    sets = {"sae": X[:, :-n_meta], "metadata": X[:, -n_meta:]}
    if job.dense_store is not None:
        sets["dense"] = _dense_features(job, ids)
    out: dict = {name: {} for name in sets}
    for probe, subset in tasks.items():
        y = labels[probe][subset]
        if len(subset) < 10 or len(np.unique(y)) < 2:
            continue
        for name, features in sets.items():
            out[name] |= probe_report({name: features[subset]}, {probe: y}, random_state=job.seed)[name]
    return out
