"""Quality filter: a linear classifier on standardized features separating in-distribution problems from
an off-distribution (noisy) pool.

Fit it on a labelled subset and apply it to the other rows; ``oof_scores_`` gives the labelled rows
themselves out-of-fold probabilities, so every row can have a probability from a model that never saw its
label. Scores of the rows a model was fitted on are not evidence of anything (a 960-column logistic
regression separates even random labels in-sample)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, check_X_y


class QualityFilter(BaseEstimator):
    """``StandardScaler`` + ``LogisticRegression``; ``y`` is 1 for in-distribution rows, 0 for noise.

    Args:
      C: inverse L2 strength of the logistic regression.
      threshold: keep rows whose probability of being in-distribution is at least this.
      top_k: keep exactly the ``top_k`` most in-distribution rows instead of thresholding.
      cv: folds of the out-of-fold probabilities and the cross-validated ROC-AUC computed in ``fit``.
      random_state: seed of the CV split and the solver.
    """

    def __init__(self, C: float = 1.0, threshold: float = 0.5, top_k: int | None = None, cv: int = 5, random_state=0):
        self.C = C
        self.threshold = threshold
        self.top_k = top_k
        self.cv = cv
        self.random_state = random_state

    def _pipeline(self) -> Pipeline:
        return make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
        )

    def fit(self, X, y) -> QualityFilter:
        """Fits on labelled rows; records each row's out-of-fold probability in ``oof_scores_`` ``[N]`` and
        the ROC-AUC of each fold's held-out rows in ``cv_roc_auc_``."""
        X, y = check_X_y(X, y)
        classes, counts = np.unique(y, return_counts=True)
        if not np.array_equal(classes, [0, 1]):
            raise ValueError(f"QualityFilter needs labels 0 (noise) and 1 (in-distribution), got {classes.tolist()}")
        if counts.min() < self.cv:
            raise ValueError(
                f"QualityFilter needs at least cv={self.cv} rows of each label, got {counts[0]} noise and "
                f"{counts[1]} in-distribution rows"
            )
        folds = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
        self.oof_scores_ = np.empty(len(y))
        aucs = []
        for train, test in folds.split(X, y):
            self.oof_scores_[test] = self._pipeline().fit(X[train], y[train]).predict_proba(X[test])[:, 1]
            aucs.append(roc_auc_score(y[test], self.oof_scores_[test]))
        self.cv_roc_auc_ = np.array(aucs)
        self.pipeline_ = self._pipeline().fit(X, y)
        self.n_features_in_ = X.shape[1]
        self.n_train_ = len(y)
        return self

    def score_samples(self, X) -> np.ndarray:
        """Probability ``[N]`` that each row is in-distribution."""
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict_proba(X)[:, 1]

    def keep_mask(self, X) -> np.ndarray:
        """Rows to keep ``[N]`` bool: by ``top_k`` if set, else by ``threshold``."""
        return self.keep_scores(self.score_samples(X))

    def keep_scores(self, scores) -> np.ndarray:
        """:meth:`keep_mask` for probabilities already computed (e.g. ``oof_scores_`` joined with
        :meth:`score_samples` of the unlabelled rows)."""
        scores = np.asarray(scores, np.float64)
        if self.top_k is None:
            return scores >= self.threshold
        keep = np.zeros(len(scores), bool)
        keep[np.argsort(-scores, kind="stable")[: self.top_k]] = True
        return keep

    def report(self) -> dict:
        """Cross-validated ROC-AUC (mean, std, per fold) and the training size."""
        check_is_fitted(self, "pipeline_")
        return {
            "cv_roc_auc": float(self.cv_roc_auc_.mean()),
            "cv_roc_auc_std": float(self.cv_roc_auc_.std()),
            "cv_roc_auc_folds": [float(v) for v in self.cv_roc_auc_],
            "n_train": int(self.n_train_),
        }
