"""A classifier trained on mini-batches: what ``featx fit`` uses when features exceed memory.

:class:`StreamingClassifier` is softmax regression (``loss="log_loss"``), a linear SVM
(``"squared_hinge"``, one-vs-rest, probabilities by a fitted softmax scale) or a
one-hidden-layer MLP (``hidden > 0``), trained with Adam on mini-batches that a stream
provides, so only a buffer of rows is ever in memory.  The objective is scikit-learn's:
mean (class-weighted) loss + ``alpha * ||W||^2 / (2 n)``, so ``alpha = 1 / C`` for the
linear models and sklearn MLP's own ``alpha`` for the MLP.

Training runs to convergence, not for a fixed number of epochs: when an epoch lowers the
objective by less than ``tol`` (relative), the learning rate drops tenfold; after
``lr_drops`` drops the fit has converged.  The MLP, whose training objective keeps falling
as it overfits, stops early instead when a validation stream is given (as scikit-learn's
``early_stopping``): after ``n_iter_no_change`` epochs without a validation accuracy better
by ``tol``, keeping its best epoch (``best_epoch_``).  ``alpha`` may be a sequence: every value is
trained on the same mini-batches at once (the stream is read once for the whole
regularisation path), the validation stream picks ``alpha_`` and the estimator keeps that
model; ``path_scores_`` has each value's validation accuracy.

It follows scikit-learn's conventions (``fit(X, y)`` on arrays, fitted state set only by
``fit``/``fit_stream``) and passes ``check_estimator`` (tests/test_online.py).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

Batches = Iterable[tuple[np.ndarray, np.ndarray]]


class StreamingClassifier(ClassifierMixin, BaseEstimator):
    """Linear or one-hidden-layer classifier fitted by Adam on streamed mini-batches.

    Args:
        loss: ``"log_loss"`` (softmax) or ``"squared_hinge"`` (one-vs-rest linear SVM).
        alpha: L2 strength, or a sequence of them (a regularisation path, selected on the
            validation stream of :meth:`fit_stream`; ``fit`` on arrays takes the first).
        hidden: units of one ReLU hidden layer; 0 for a linear model.
        batch_size: rows per Adam step.
        lr: initial learning rate; None: 1e-2 for linear models, 1e-3 for the MLP.
        tol: relative decrease of the epoch's objective below which the rate drops; with
            early stopping, the gain in validation accuracy that counts as better.
        lr_drops: rate drops (x 0.1) before the fit counts as converged.
        max_epochs: epochs at most (``converged_`` is False when they run out).
        n_iter_no_change: MLP with a validation stream: epochs without a better validation
            accuracy before it stops.
        class_weight: None or ``"balanced"``.
        random_state: seed of the initialisation and of the in-memory shuffling.
    """

    def __init__(self, loss: str = "log_loss", alpha=1.0, hidden: int = 0, batch_size: int = 512,
                 lr: float | None = None, tol: float = 1e-3, lr_drops: int = 2, max_epochs: int = 100,
                 n_iter_no_change: int = 5, class_weight=None, random_state: int = 0):
        self.loss = loss
        self.alpha = alpha
        self.hidden = hidden
        self.batch_size = batch_size
        self.lr = lr
        self.tol = tol
        self.lr_drops = lr_drops
        self.max_epochs = max_epochs
        self.n_iter_no_change = n_iter_no_change
        self.class_weight = class_weight
        self.random_state = random_state

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, X, y):
        """Fit on arrays in memory (shuffled mini-batches, a new order every epoch)."""
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], reset=True)
        check_classification_targets(y)
        X = np.asarray(X, dtype=np.float32)
        n, bs, seed = len(X), batch_rows(len(X), self.batch_size), self.random_state

        def batches(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            order = np.random.default_rng([seed, epoch]).permutation(n)
            for s in range(0, n, bs):
                idx = order[s:s + bs]
                yield X[idx], y[idx]

        alphas = self._alphas()
        return self._fit(batches, y, X.shape[1], alphas[:1], None)

    def fit_stream(self, batches: Callable[[int], Batches], y: np.ndarray, n_features: int,
                   val: Callable[[], Batches] | None = None):
        """Fit on a stream: the out-of-core entry point.

        Args:
            batches: ``batches(epoch)`` yields ``(X, y)`` mini-batches of the training rows,
                each row once per epoch, in an order that may change with the epoch.
            y: the labels of all training rows (for the classes, their counts and n).
            n_features: width of the rows.
            val: ``val()`` yields ``(X, y)`` batches of validation rows; it selects
                ``alpha_`` on a path and calibrates the SVM's probabilities.
        """
        y = np.asarray(y)
        check_classification_targets(y)
        self.n_features_in_ = int(n_features)
        alphas = self._alphas()
        if len(alphas) > 1 and val is None:
            raise ValueError("a path of alpha values needs a validation stream to choose from")
        return self._fit(batches, y, n_features, alphas, val)

    def _alphas(self) -> list[float]:
        a = self.alpha if isinstance(self.alpha, (list, tuple, np.ndarray)) else [self.alpha]
        a = [float(v) for v in a]
        if not a or min(a) < 0:
            raise ValueError(f"alpha must be >= 0 (or a non-empty sequence of such); got {self.alpha!r}")
        return a

    def _fit(self, batches, y, d: int, alphas: list[float], val):
        if self.loss not in ("log_loss", "squared_hinge"):
            raise ValueError(f"loss must be 'log_loss' or 'squared_hinge'; got {self.loss!r}")
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(f"This solver needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {classes[0]!r}")
        n, k = len(y), len(classes)
        cw = np.ones(k)
        if self.class_weight is not None:
            cw = compute_class_weight(self.class_weight, classes=classes, y=y)
        net = _Nets(len(alphas), d, k, int(self.hidden), self.random_state)
        # a small problem runs faster on one thread than with two threads waking each other
        small = batch_rows(n, self.batch_size) * d * max(k, int(self.hidden)) * len(alphas) < 10_000_000
        threads = torch.get_num_threads()
        lr = self.lr if self.lr is not None else (1e-3 if self.hidden else 1e-2)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        penalty = torch.tensor(alphas, dtype=torch.float32) / (2 * n)
        weights = torch.tensor(cw, dtype=torch.float32)
        lookup = {c: i for i, c in enumerate(classes.tolist())}
        early = val is not None and self.hidden > 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            torch.set_num_threads(1 if small else threads)
            try:
                history, converged, best_acc, best_epoch, kept = self._epochs(
                    net, opt, batches, penalty, weights, lookup, n, val if early else None)
            finally:
                torch.set_num_threads(threads)
        best, scores = 0, None
        if early:
            scores = best_acc
        elif val is not None:
            scores = _accuracies(net, val, lookup)
        if scores is not None:
            best = int(np.argmax(scores))  # the first of equals: the order given
        self.classes_ = classes
        self.alpha_ = alphas[best]
        self.path_scores_ = None if scores is None else np.asarray(scores)
        self.n_iter_ = len(history)
        self.best_epoch_ = best_epoch[best] if early else len(history)
        self.converged_ = converged
        self.objective_ = float(history[-1][best]) if history else float("nan")
        self.params_ = kept[best] if early else net.export(best)
        self.proba_scale_ = 1.0
        if self.loss == "squared_hinge":
            self.proba_scale_ = _fit_scale(lambda X: self._scores(X), val or (lambda: batches(0)), lookup)
        return self

    def _epochs(self, net, opt, batches, penalty, weights, lookup, n, val):
        """Adam epochs until the objective stops falling (or, with ``val``, the validation
        accuracy stops rising).  Returns the history and what early stopping kept."""
        a = len(penalty)
        prev, drops, history, converged = None, 0, [], False
        best_acc, best_epoch, kept = [-1.0] * a, [0] * a, [None] * a
        for epoch in range(self.max_epochs):
            total = torch.zeros(a, dtype=torch.float64)
            for Xb, yb in batches(epoch):
                xb = torch.as_tensor(np.asarray(Xb, dtype=np.float32))
                yi = torch.as_tensor(_encode(yb, lookup))
                # an unbiased estimate of each path member's objective (mean loss + penalty)
                obj = _loss(net(xb), yi, weights, self.loss).mean(1) + penalty * net.sq_norm()
                opt.zero_grad(set_to_none=True)
                obj.sum().backward()  # the members share no parameter: one backward serves all
                opt.step()
                total += obj.detach().double() * (len(yi) / n)
            history.append(total.tolist())
            if val is not None:
                for i, acc in enumerate(_accuracies(net, val, lookup)):
                    if acc > best_acc[i] + (self.tol if kept[i] is not None else 0):  # a real gain, not noise
                        best_acc[i], best_epoch[i], kept[i] = acc, epoch + 1, net.export(i)
                if epoch + 1 - max(best_epoch) >= self.n_iter_no_change:
                    converged = True
                    break
                continue
            if prev is not None:
                gain = float(((prev - total) / prev.abs().clamp(min=1e-12)).max())
                if gain < self.tol:
                    if drops == self.lr_drops:
                        converged = True
                        break
                    drops += 1
                    for g in opt.param_groups:
                        g["lr"] *= 0.1
            prev = total
        return history, converged, best_acc, best_epoch, kept

    # -- prediction -------------------------------------------------------------------------

    def _scores(self, X: np.ndarray) -> np.ndarray:
        p = self.params_
        h = np.asarray(X, dtype=np.float32)
        if "w1" in p:
            h = np.maximum(h @ p["w1"].T + p["b1"], 0)
        return h @ p["w"].T + p["b"]

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        s = self._scores(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        s = self._scores(X).astype(np.float64) * self.proba_scale_
        s -= s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        return np.log(np.clip(self.predict_proba(X), 1e-300, None))

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        return self.classes_[self._scores(X).argmax(axis=1)]


# ----------------------------------------------------------------------------- internals


class _Nets(torch.nn.Module):
    """``A`` independent networks (one per alpha of a path), evaluated as one batched product."""

    def __init__(self, a: int, d: int, k: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if hidden:
            bound1, bound2 = 1 / d ** 0.5, 1 / hidden ** 0.5  # torch.nn.Linear's initialisation
            w1 = (torch.rand(hidden, d, generator=g) * 2 - 1) * bound1
            w2 = (torch.rand(k, hidden, generator=g) * 2 - 1) * bound2
            self.w1 = torch.nn.Parameter(w1.expand(a, -1, -1).clone())
            self.b1 = torch.nn.Parameter(torch.zeros(a, 1, hidden))
            self.w = torch.nn.Parameter(w2.expand(a, -1, -1).clone())
        else:  # a convex problem: start at zero, as scikit-learn's solvers do
            self.w1 = None
            self.w = torch.nn.Parameter(torch.zeros(a, k, d))
        self.b = torch.nn.Parameter(torch.zeros(a, 1, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0)  # (1, B, d), broadcast over the path
        if self.w1 is not None:
            h = torch.relu(torch.matmul(h, self.w1.transpose(1, 2)) + self.b1)
        return torch.matmul(h, self.w.transpose(1, 2)) + self.b  # (A, B, k)

    def sq_norm(self) -> torch.Tensor:
        """||W||^2 per path member (weights only; biases are not penalised, as in scikit-learn)."""
        sq = self.w.pow(2).sum((1, 2))
        return sq + self.w1.pow(2).sum((1, 2)) if self.w1 is not None else sq

    def export(self, i: int) -> dict:
        out = {"w": self.w[i].detach().numpy().copy(), "b": self.b[i, 0].detach().numpy().copy()}
        if self.w1 is not None:
            out.update(w1=self.w1[i].detach().numpy().copy(), b1=self.b1[i, 0].detach().numpy().copy())
        return out


def batch_rows(n: int, batch_size: int) -> int:
    """Rows per step: ``batch_size``, but small enough for 64 steps an epoch (16 rows at
    least), so that an epoch moves the model enough on small data for the plateau test."""
    return max(1, min(batch_size, max(16, -(-n // 64))))


def _encode(y, lookup: dict) -> np.ndarray:
    return np.fromiter((lookup[v] for v in np.asarray(y).tolist()), dtype=np.int64, count=len(y))


def _loss(scores: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row (class-weighted) losses, shape (A, B)."""
    w = weights[y]
    if kind == "log_loss":
        nll = -torch.log_softmax(scores, dim=2).gather(2, y.view(1, -1, 1).expand(scores.shape[0], -1, 1))[..., 0]
        return nll * w
    sign = -torch.ones_like(scores)
    sign[:, torch.arange(len(y)), y] = 1.0
    return torch.clamp(1 - sign * scores, min=0).pow(2).sum(2) * w


@torch.no_grad()
def _accuracies(net: _Nets, val: Callable[[], Batches], lookup: dict) -> list[float]:
    right, n = None, 0
    for Xb, yb in val():
        pred = net(torch.as_tensor(np.asarray(Xb, dtype=np.float32))).argmax(2)  # (A, B)
        hits = (pred == torch.as_tensor(_encode(yb, lookup))).sum(1)
        right = hits if right is None else right + hits
        n += len(yb)
    return (right.double() / max(n, 1)).tolist()


def _fit_scale(scores_of, batches: Callable[[], Batches], lookup: dict, max_rows: int = 20_000) -> float:
    """The softmax scale ``a`` that makes ``softmax(a * scores)`` calibrated (least log loss)."""
    from scipy.optimize import minimize_scalar

    S, Y = [], []
    for Xb, yb in batches():
        S.append(scores_of(Xb))
        Y.append(_encode(yb, lookup))
        if sum(len(y) for y in Y) >= max_rows:
            break
    S, Y = np.concatenate(S).astype(np.float64), np.concatenate(Y)

    def nll(log_a: float) -> float:
        z = S * np.exp(log_a)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(Y)), Y]))

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))
