"""The paper's probes on any feature matrix: topic accuracy, difficulty Spearman, quality Pearson, noise
ROC-AUC, each cross-validated with a confidence interval over folds, for several feature sets side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _interval(scores: list[float], confidence: float = 0.95) -> dict:
    """Mean and a Student-t confidence interval over fold scores."""
    values = np.asarray(scores, np.float64)
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": float(values.mean()), "ci_low": float(values.mean() - half), "ci_high": float(values.mean() + half)}


def _folds(X, y, score: Callable, make_model, splitter) -> list[float]:
    scores = []
    for train, test in splitter.split(X, y):
        model = make_model().fit(X[train], y[train])
        scores.append(score(model, X[test], y[test]))
    return scores


def topic_probe(X, topics, *, cv: int = 5, random_state=0) -> dict:
    """Multinomial logistic-regression accuracy vs the majority-class baseline."""
    topics = np.asarray(topics)
    splitter = StratifiedKFold(cv, shuffle=True, random_state=random_state)

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=random_state))

    scores = _folds(X, topics, lambda m, x, y: float(np.mean(m.predict(x) == y)), model, splitter)
    majority = float(np.unique(topics, return_counts=True)[1].max() / len(topics))
    return {"accuracy": _interval(scores), "majority_baseline": majority}


def _regression_probe(X, y, correlate, cv, random_state) -> dict:
    splitter = KFold(cv, shuffle=True, random_state=random_state)

    def model():
        return make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))

    return _interval(_folds(X, y, lambda m, x, t: float(correlate(m.predict(x), t).statistic), model, splitter))


def difficulty_probe(X, difficulty, *, cv: int = 5, random_state=0) -> dict:
    """Spearman rho between ridge-predicted and true difficulty on held-out folds."""
    return {"spearman": _regression_probe(X, np.asarray(difficulty, np.float64), stats.spearmanr, cv, random_state)}


def quality_probe(X, quality, *, cv: int = 5, random_state=0) -> dict:
    """Pearson r between ridge-predicted and true quality scores on held-out folds."""
    return {"pearson": _regression_probe(X, np.asarray(quality, np.float64), stats.pearsonr, cv, random_state)}


def noise_probe(X, is_noise, *, cv: int = 5, random_state=0) -> dict:
    """ROC-AUC of logistic regression telling the noisy pool from clean problems."""
    is_noise = np.asarray(is_noise, int)
    splitter = StratifiedKFold(cv, shuffle=True, random_state=random_state)

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=random_state))

    def score(m, x, y):
        return float(roc_auc_score(y, m.predict_proba(x)[:, 1]))

    return {"roc_auc": _interval(_folds(X, is_noise, score, model, splitter))}


def probe_report(feature_sets: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], **kwargs) -> dict:
    """Every probe whose labels are given (``topic``, ``difficulty``, ``quality``, ``noise``) on every
    feature set (e.g. SAE codes, dense states, metadata only): ``{feature_set: {probe: result}}``."""
    probes = {"topic": topic_probe, "difficulty": difficulty_probe, "quality": quality_probe, "noise": noise_probe}
    unknown = sorted(set(labels) - set(probes))
    if unknown:
        raise ValueError(f"unknown probe label(s) {', '.join(unknown)} (known: {', '.join(probes)})")
    return {
        name: {probe: probes[probe](np.asarray(X), y, **kwargs) for probe, y in labels.items()}
        for name, X in feature_sets.items()
    }
