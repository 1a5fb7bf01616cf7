"""Train and select: classifiers on stored features, in memory or out of core.

Selection follows the linear-probe protocol of Kornblith, Shlens & Le (CVPR 2019): fit on
the training split for each value of the grid, score on a held-out split (``--val`` file
or a stratified fraction of the training rows), then refit the best setting on
train + validation.  For logistic regression the grid is walked from strong to weak
regularisation, each fit starting from the previous solution, so each further value costs
a few L-BFGS iterations instead of a fit from scratch.

:func:`fit_store` is the policy ``featx fit`` applies to a feature file: in memory when the
features fit the memory budget, out of core otherwise.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featx.classifiers import DEFAULT_GRIDS, make_classifier, make_online_classifier
from featx.errors import FeatxError
from featx.linear import FastLogisticRegression
from featx.metrics import evaluate, evaluate_store
from featx.store import FeatureStore, check_provenance

SEARCH_TOL = 3e-4  # L-BFGS gradient tolerance while walking the regularisation path


@dataclass
class FitResult:
    pipeline: Pipeline
    params: dict  # the selected hyper-parameters
    search: list[dict] = field(default_factory=list)  # one row per grid point: params, val accuracy, seconds
    val_metrics: dict | None = None  # metrics of the selected model fitted on train only
    fit_seconds: float = 0.0
    out_of_core: bool = False

    @property
    def val_accuracy(self) -> float | None:
        """Validation accuracy of the selected setting (None without validation)."""
        if self.val_metrics is not None:
            return self.val_metrics["accuracy"]
        return max((r["val_accuracy"] for r in self.search), default=None)


def _grid_points(grid: dict[str, list]) -> list[dict]:
    points = [{}]
    for k, values in grid.items():
        points = [{**p, k: v} for p in points for v in values]
    return points


def _check_labels(y: np.ndarray, what: str) -> None:
    if (y < 0).any():
        raise FeatxError(f"{what} has {(y < 0).sum()} unlabeled rows (label -1); fit needs labelled features.")
    if len(np.unique(y)) < 2:
        raise FeatxError(f"{what} has a single class; a classifier needs at least two.")


def fit_arrays(X: np.ndarray, y: np.ndarray, clf: str = "logreg", X_val=None, y_val=None,
               val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
               seed: int = 0, refit: bool = True, report: bool = True) -> FitResult:
    """Select hyper-parameters on a held-out split and fit the final pipeline.

    Args:
        X, y: training features (float32) and labels.
        clf: ``logreg``, ``svm`` or ``mlp``.
        X_val, y_val: a separate validation set; if absent, ``val_fraction`` of the
            training rows is held out (stratified).
        search: ``"auto"`` (the classifier's default grid), ``"none"`` (defaults, no
            selection) or a grid such as ``{"C": [0.1, 1]}``.
        class_weight: ``None`` or ``"balanced"``.
        seed: random state of the split and the classifiers.
        refit: refit the selected setting on train + validation (the protocol); if False
            the model fitted on train alone is returned.
        report: compute the full validation metrics of the selected model (per class,
            confusion matrix); without it only the search's accuracies are kept.
    """
    t0 = time.perf_counter()
    X = np.asarray(X, dtype=np.float32)
    _check_labels(y, "the training set")
    grid = DEFAULT_GRIDS[clf] if search == "auto" else ({} if search == "none" else search)
    if not grid and X_val is None:
        pipe = make_classifier(clf, n_samples=len(X), class_weight=class_weight, seed=seed).fit(X, y)
        return FitResult(pipe, {}, [], None, time.perf_counter() - t0)
    if X_val is None:
        X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=val_fraction, stratify=y, random_state=seed)
    else:
        X_tr, y_tr = X, y
        X_val = np.asarray(X_val, dtype=np.float32)
    points = _grid_points(grid) or [{}]
    if clf == "logreg" and set(grid) <= {"C"}:
        rows, best_pipe = _logreg_path(X_tr, y_tr, X_val, y_val, sorted(p.get("C", 1.0) for p in points),
                                       class_weight)
    else:
        rows, best_pipe = _grid_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed)
    best = max(rows, key=lambda r: r["val_accuracy"])  # the first of equals: the order of the grid
    val_metrics = evaluate(best_pipe, X_val, y_val) if report else None
    pipe = best_pipe
    if refit:
        X_all, y_all = np.concatenate([X_tr, X_val]), np.concatenate([y_tr, y_val])
        pipe = make_classifier(clf, n_samples=len(X_all), class_weight=class_weight, seed=seed, **best["params"])
        fit_params = {}
        if clf == "logreg":  # start from the selected solution: a few iterations suffice
            lr = best_pipe.named_steps["clf"]
            fit_params = {"clf__coef_init": lr.coef_, "clf__intercept_init": lr.intercept_}
        pipe.fit(X_all, y_all, **fit_params)
    return FitResult(pipe, best["params"], rows, val_metrics, time.perf_counter() - t0)


def _grid_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed):
    """One fit per grid point, scored on the validation rows; returns the rows and the best pipeline."""
    rows, best_pipe = [], None
    for p in points:
        t = time.perf_counter()
        pipe = make_classifier(clf, n_samples=len(X_tr), class_weight=class_weight, seed=seed, **p)
        pipe.fit(X_tr, y_tr)
        acc = float(skm.accuracy_score(y_val, pipe.predict(X_val)))
        if not rows or acc > max(r["val_accuracy"] for r in rows):
            best_pipe = pipe
        rows.append({"params": p, "val_accuracy": acc, "seconds": time.perf_counter() - t})
    return rows, best_pipe


def _logreg_path(X_tr, y_tr, X_val, y_val, Cs, class_weight):
    """Fit along increasing C, each fit starting from the previous solution; the scaler is
    fitted once on X_tr.  Returns the search rows and the best pipeline (first of equals)."""
    scaler = StandardScaler().fit(X_tr)
    Xs_tr, Xs_val = scaler.transform(X_tr), scaler.transform(X_val)
    # the search only has to rank the values of C: a looser tolerance than the final
    # refit's (1e-4) ranks them the same at a fraction of the iterations
    lr = FastLogisticRegression(class_weight=class_weight, tol=SEARCH_TOL)
    rows, best = [], None
    for C in Cs:
        t = time.perf_counter()
        start = {"coef_init": lr.coef_, "intercept_init": lr.intercept_} if rows else {}
        lr.set_params(C=C).fit(Xs_tr, y_tr, **start)
        acc = float(skm.accuracy_score(y_val, lr.predict(Xs_val)))
        if not rows or acc > max(r["val_accuracy"] for r in rows):
            best = copy.deepcopy(lr)
        rows.append({"params": {"C": C}, "val_accuracy": acc, "seconds": time.perf_counter() - t,
                     "iterations": int(np.max(lr.n_iter_))})
    return rows, Pipeline([("scale", scaler), ("clf", best.set_params(tol=1e-4))])


# ----------------------------------------------------------------------------- out of core


def fit_out_of_core(store, tap: str | None, clf: str = "logreg", val=None, class_weight=None, seed: int = 0,
                    epochs: int = 5, chunk_rows: int | None = None, alpha: float | None = None) -> FitResult:
    """Fit with ``partial_fit`` over HDF5 row chunks: memory holds one chunk, not the store.

    The scaler is learned in a first pass; then ``epochs`` passes of a linear SGD model
    (logistic loss for logreg, hinge for svm) or an MLP visit the chunks in a shuffled order.
    """
    t0 = time.perf_counter()
    n, d = len(store), store.dim(tap)
    chunk_rows = chunk_rows or max(256, (64 << 20) // (4 * d))
    y = store.labels
    _check_labels(y, "the training set")
    classes = np.unique(y)
    starts = list(range(0, n, chunk_rows))
    scaler = StandardScaler()
    for s in starts:
        scaler.partial_fit(store.features(tap, slice(s, s + chunk_rows)))
    params = {"alpha": alpha} if alpha is not None else {}
    model = make_online_classifier(clf, class_weight=None, seed=seed, **params)
    rng = np.random.default_rng(seed)
    weights = None
    if class_weight == "balanced":
        counts = np.bincount(y, minlength=classes.max() + 1)
        weights = len(y) / (len(classes) * np.maximum(counts, 1))
    for _ in range(epochs):
        for s in rng.permutation(starts):
            Xc = scaler.transform(store.features(tap, slice(s, s + chunk_rows)))
            yc = y[s:s + chunk_rows]
            order = rng.permutation(len(yc))
            sw = None if weights is None else weights[yc[order]]
            model.partial_fit(Xc[order], yc[order], classes=classes, sample_weight=sw)
    pipe = Pipeline([("scale", scaler), ("clf", model)])
    val_metrics = evaluate_store(pipe, val, tap) if val is not None else None
    return FitResult(pipe, {"epochs": epochs, "chunk_rows": chunk_rows, **params}, [], val_metrics,
                     time.perf_counter() - t0, out_of_core=True)


# ----------------------------------------------------------------------------- the policy


def parse_size(text: str) -> int:
    """``"512MB"``, ``"4G"``, ``"1.5GiB"`` or a number of bytes -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise FeatxError(f"--memory-budget {text!r} is not a size such as 512MB or 4GB.") from None


def default_budget() -> int:
    """A quarter of the physical memory (4 GB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def open_val(path: str | os.PathLike, tap: str, provenance: dict) -> FeatureStore:
    """Open a validation feature file, refusing one made differently from the training features."""
    val = FeatureStore(path)
    try:
        if tap not in val.taps:
            raise FeatxError(f"--val {path} has no tap {tap!r}; it has: {', '.join(val.taps)}.")
        check_provenance(provenance, val.provenance(tap), f"--val {path}")
    except BaseException:
        val.close()
        raise
    return val


def fit_store(store: FeatureStore, tap: str | None = None, clf: str = "logreg", val_path=None,
              val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
              seed: int = 0, memory_budget: int | None = None, log=None) -> FitResult:
    """``featx fit`` on an open feature file: in memory when the tap's features fit
    ``memory_budget`` (default :func:`default_budget`), out of core otherwise.

    Args:
        store: the training features.
        tap: the stored tap to fit on (default: the file's default tap).
        val_path: a validation feature file (checked against the training features).
        log: called with one sentence when the fit goes out of core.
    """
    tap = tap or store.default_tap
    budget = memory_budget if memory_budget is not None else default_budget()
    val = open_val(val_path, tap, store.provenance(tap)) if val_path else None
    try:
        if store.nbytes(tap) > budget:
            if log:
                log(f"{store.nbytes(tap) >> 20} MB of features exceed the memory budget of {budget >> 20} MB: "
                    "fitting out of core (SGD over row chunks).")
            return fit_out_of_core(store, tap, clf, val=val, class_weight=class_weight, seed=seed)
        Xv, yv = (val.features(tap), val.labels) if val is not None else (None, None)
        return fit_arrays(store.features(tap), store.labels, clf, Xv, yv, val_fraction, search, class_weight, seed)
    finally:
        if val is not None:
            val.close()
