"""Diversity: MiniBatchKMeans clusters in standardized feature space, and how mixed a batch is."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.cluster import MiniBatchKMeans
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted


class Diversity(BaseEstimator):
    """``StandardScaler`` + ``MiniBatchKMeans(n_clusters)``; ``labels_`` holds each row's cluster.

    Args:
      n_clusters: clusters K.
      batch_size: MiniBatchKMeans mini-batch size.
      n_init: initialisations, the best inertia wins.
      random_state: seed.
    """

    def __init__(self, n_clusters: int = 64, batch_size: int = 4096, n_init: int = 3, random_state=0):
        self.n_clusters = n_clusters
        self.batch_size = batch_size
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, X, y=None) -> Diversity:
        X = check_array(X, dtype=np.float32)
        if not 1 <= self.n_clusters <= len(X):
            raise ValueError(f"n_clusters={self.n_clusters} must be in [1, {len(X)}] (the number of rows)")
        self.scaler_ = StandardScaler().fit(X)
        self.kmeans_ = MiniBatchKMeans(
            self.n_clusters, batch_size=self.batch_size, n_init=self.n_init, random_state=self.random_state
        ).fit(self.scaler_.transform(X))
        self.labels_ = self.kmeans_.labels_.astype(np.int64)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """Nearest cluster ``[N]`` of new rows."""
        check_is_fitted(self, "kmeans_")
        return self.kmeans_.predict(self.scaler_.transform(check_array(X, dtype=np.float32))).astype(np.int64)

    def transform(self, X) -> np.ndarray:
        """Standardized rows (the space the clusters live in)."""
        check_is_fitted(self, "scaler_")
        return self.scaler_.transform(check_array(X, dtype=np.float32))


def counts_entropy(counts) -> float:
    """Shannon entropy (nats) of a histogram given by its (positive) counts."""
    p = np.asarray(counts, float)
    p = p / p.sum()
    return float(-(p * np.log(p)).sum())


def cluster_entropy(labels: np.ndarray) -> float:
    """Shannon entropy (nats) of the cluster histogram of one batch."""
    return counts_entropy(np.unique(labels, return_counts=True)[1])


def mean_pairwise_distance(rows_NC: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows (0 for fewer than two)."""
    n = len(rows_NC)
    if n < 2:
        return 0.0
    sq = np.sum(rows_NC**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows_NC @ rows_NC.T, 0.0)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def batch_diversity(batches: Sequence[np.ndarray], labels: np.ndarray, features_NC: np.ndarray | None = None) -> dict:
    """Mean over batches (row-index arrays) of distinct clusters, cluster entropy and pairwise distance."""
    distinct = [len(np.unique(labels[b])) for b in batches]
    entropy = [cluster_entropy(labels[b]) for b in batches]
    out = {"distinct_clusters": float(np.mean(distinct)), "cluster_entropy": float(np.mean(entropy))}
    if features_NC is not None:
        out["pairwise_distance"] = float(np.mean([mean_pairwise_distance(features_NC[b]) for b in batches]))
    return out
