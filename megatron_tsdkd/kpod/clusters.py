"""Question clusters for the diversity term (METHOD.md KPOD 4): k-means (Lloyd, k-means++ start, fixed seed) on
each question's mean word embedding, with the student's input embedding as the word embedding."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_embeddings(embedding: np.ndarray, questions: Sequence[Sequence[int]]) -> np.ndarray:
    return np.stack([embedding[list(q)].mean(axis=0) for q in questions])


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], centroids [k', D]) with k' = min(k, N)."""
    rng = np.random.default_rng(seed)
    points = np.asarray(points, dtype=np.float64)
    k = min(k, len(points))
    centroids = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = np.min([((points - c) ** 2).sum(1) for c in centroids], axis=0)
        total = d2.sum()
        pick = rng.choice(len(points), p=d2 / total) if total > 0 else rng.integers(len(points))
        centroids.append(points[pick])
    centroids = np.stack(centroids)
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        labels_new = ((points[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        for c in range(k):
            if (labels_new == c).any():
                centroids[c] = points[labels_new == c].mean(0)
        if _ and (labels_new == labels).all():
            break
        labels = labels_new
    return labels, centroids
