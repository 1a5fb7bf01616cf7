"""k nearest neighbours on L2-normalised features: the kNN evaluation of DINO and DINOv2.

Each row is scaled to unit length, so the dot product of two rows is their cosine
similarity.  A query's k most similar training rows vote for their classes, either each
with weight exp(similarity / T) (DINO's temperature-weighted vote, T = 0.07) or one vote
each; the probabilities are the normalised votes.  There is no training: ``fit`` keeps the
normalised rows (as float16 if asked, half the memory and bundle size).

The similarities are matrix products in torch, on the GPU when there is one, a block of
queries against a block of training rows at a time, keeping a running top k per query: the
working memory is ``query_rows x train_rows`` similarities whatever the sizes.  One
neighbour search serves every k and both votes (:meth:`CosineKNN.search_scores`), as one
warm-started path serves every C of the logistic regression.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

VOTES = ("temperature", "majority")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unit_rows(X: np.ndarray, blocks: tuple[int, ...] | None = None) -> np.ndarray:
    """Rows scaled to unit L2 length (a zero row stays zero), as float32.

    ``blocks``: the widths of taps side by side (``fit --tap A --tap B``): each tap's part
    of a row is scaled to unit length on its own, then the row by 1/sqrt(taps), so the
    cosine of two rows is the mean of their taps' cosines: a wide tap weighs no more than a
    narrow one."""
    X = np.asarray(X, dtype=np.float32)
    if blocks and len(blocks) > 1:
        if sum(blocks) != X.shape[1]:
            raise ValueError(f"blocks {blocks} do not add up to the {X.shape[1]} features")
        edges = np.cumsum((0,) + tuple(blocks))
        return np.concatenate([unit_rows(X[:, a:b]) for a, b in zip(edges[:-1], edges[1:])], axis=1) \
            / np.float32(np.sqrt(len(blocks)))
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class CosineKNN(ClassifierMixin, BaseEstimator):
    """kNN by cosine similarity with DINO's weighted vote.

    Args:
        k: neighbours that vote.
        vote: ``temperature`` (weight exp(similarity / temperature)) or ``majority``.
        temperature: DINO's T.
        dtype: how the training rows are kept: ``float32`` or ``float16``.
        block_rows: rows of each block of queries and of training rows multiplied at once.
        blocks: widths of combined taps, each scaled to unit length on its own
            (:func:`unit_rows`); None: one.
    """

    def __init__(self, k: int = 20, vote: str = "temperature", temperature: float = 0.07, dtype: str = "float32",
                 block_rows: int = 4096, blocks: tuple[int, ...] | None = None):
        self.k = k
        self.vote = vote
        self.temperature = temperature
        self.dtype = dtype
        self.block_rows = block_rows
        self.blocks = blocks

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], reset=True)
        check_classification_targets(y)
        if int(self.k) < 1:
            raise ValueError(f"k must be at least 1; got {self.k!r}")
        if self.vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}; got {self.vote!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16; got {self.dtype!r}")
        self.classes_, yi = np.unique(y, return_inverse=True)
        self.train_ = unit_rows(X, self.blocks).astype(self.dtype, copy=False)  # unit_rows made the copy
        self.train_labels_ = yi.astype(np.int64)
        return self

    def keep_rows(self, unit: np.ndarray, y: np.ndarray, classes: np.ndarray) -> "CosineKNN":
        """Fit on rows already scaled to unit length (:func:`unit_rows` with :attr:`blocks`), kept as they are,
        of any dtype: out of core, featx reads them block by block into float16."""
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = unit.shape[1]
        self.train_ = unit
        self.train_labels_ = np.searchsorted(self.classes_, y).astype(np.int64)
        return self

    def keep_as(self, dtype: str) -> "CosineKNN":
        """Keep the training rows as ``dtype`` from now on (float16: half the memory and bundle)."""
        check_is_fitted(self)
        self.set_params(dtype=dtype)
        self.train_ = self.train_.astype(dtype)
        return self

    def neighbours(self, X, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar training rows of each query: similarities (n, k), best
        first, and their class indices (n, k)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        k = min(int(k), len(self.train_))
        dev, b = _device(), max(1, int(self.block_rows))
        labels = torch.from_numpy(self.train_labels_).to(dev)
        sims, idx = np.empty((len(X), k), np.float32), np.empty((len(X), k), np.int64)
        with torch.inference_mode():
            for qs in range(0, len(X), b):
                q = torch.from_numpy(unit_rows(X[qs:qs + b], self.blocks)).to(dev)
                best_s = torch.full((len(q), 0), -2.0, device=dev)
                best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=dev)
                for ts in range(0, len(self.train_), b):
                    t = torch.from_numpy(self.train_[ts:ts + b]).to(dev, torch.float32)
                    s = q @ t.T
                    top = min(k, s.shape[1])
                    s, i = s.topk(top, dim=1)
                    s, j = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + top), dim=1)
                    best_i = torch.cat([best_i, i + ts], 1).gather(1, j)
                    best_s = s
                sims[qs:qs + b] = best_s.cpu().numpy()
                idx[qs:qs + b] = labels[best_i].cpu().numpy()
        return sims, idx

    def votes(self, sims: np.ndarray, labels: np.ndarray, k: int, vote: str) -> np.ndarray:
        """Class probabilities from the neighbours :meth:`neighbours` found (the first ``k``)."""
        s, c = sims[:, :k], labels[:, :k]
        w = np.exp((s - 1.0) / self.temperature) if vote == "temperature" else np.ones_like(s)  # exp(-x) overflows never
        proba = np.zeros((len(s), len(self.classes_)), np.float64)
        np.add.at(proba, (np.repeat(np.arange(len(s)), c.shape[1]), c.ravel()), w.ravel())
        return proba / np.maximum(proba.sum(1, keepdims=True), 1e-300)

    def predict_proba(self, X) -> np.ndarray:
        sims, labels = self.neighbours(X, self.k)
        return self.votes(sims, labels, int(self.k), self.vote)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def search_scores(self, X, y, points: list[dict]) -> list[float]:
        """Accuracy on (X, y) of each setting (``k``, ``vote``) from a single neighbour
        search with the largest k."""
        most = max(int(p.get("k", self.k)) for p in points)
        sims, labels = self.neighbours(X, most)
        y = np.asarray(y)
        return [float(np.mean(self.classes_[np.argmax(self.votes(sims, labels, int(p.get("k", self.k)),
                                                                   p.get("vote", self.vote)), 1)] == y))
                for p in points]
