"""Quality filter: a linear classifier on standardized features separating in-distribution problems from
an off-distribution (noisy) pool."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, check_X_y


class QualityFilter(BaseEstimator):
    """``StandardScaler`` + ``LogisticRegression``; ``y`` is 1 for in-distribution rows, 0 for noise.

    Args:
      C: inverse L2 strength of the logistic regression.
      threshold: keep rows whose probability of being in-distribution is at least this.
      top_k: keep exactly the ``top_k`` most in-distribution rows instead of thresholding.
      cv: folds of the cross-validated ROC-AUC reported after ``fit``.
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
        """Fits on labelled rows and records the cross-validated ROC-AUC in ``cv_roc_auc_`` (one per fold)."""
        X, y = check_X_y(X, y)
        classes = np.unique(y)
        if not np.array_equal(classes, [0, 1]):
            raise ValueError(f"QualityFilter needs labels 0 (noise) and 1 (in-distribution), got {classes.tolist()}")
        folds = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
        self.cv_roc_auc_ = cross_val_score(self._pipeline(), X, y, cv=folds, scoring="roc_auc")
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
        scores = self.score_samples(X)
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
