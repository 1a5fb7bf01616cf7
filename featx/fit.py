"""Train, select hyper-parameters, evaluate: classifiers on stored features.

Selection follows the linear-probe protocol of Kornblith, Shlens & Le (CVPR 2019): fit on
the training split for each value of the grid, score on a held-out split (``--val`` file
or a stratified fraction of the training rows), then refit the best setting on
train + validation.  For logistic regression the grid is walked from strong to weak
regularisation with warm starts, so each further value costs a few L-BFGS iterations
instead of a fit from scratch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn import metrics as skm
from sklearn.base import clone
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featx.classifiers import DEFAULT_GRIDS, make_classifier, make_online_classifier
from featx.errors import FeatxError


SEARCH_TOL = 3e-4  # L-BFGS gradient tolerance while walking the regularisation path


@dataclass
class FitResult:
    pipeline: Pipeline
    params: dict  # the selected hyper-parameters
    search: list[dict] = field(default_factory=list)  # one row per grid point: params, val accuracy, seconds
    val_metrics: dict | None = None  # metrics of the selected model fitted on train only
    fit_seconds: float = 0.0
    out_of_core: bool = False


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
               seed: int = 0, refit: bool = True) -> FitResult:
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
                                       class_weight, seed)
    else:
        rows, best_pipe = [], None
        for p in points:
            t = time.perf_counter()
            pipe = make_classifier(clf, n_samples=len(X_tr), class_weight=class_weight, seed=seed, **p)
            pipe.fit(X_tr, y_tr)
            acc = float(skm.accuracy_score(y_val, pipe.predict(X_val)))
            rows.append({"params": p, "val_accuracy": acc, "seconds": time.perf_counter() - t})
            if best_pipe is None or acc > max(r["val_accuracy"] for r in rows[:-1]):
                best_pipe = pipe
    best = max(rows, key=lambda r: r["val_accuracy"])  # first (strongest regularisation) wins ties
    val_metrics = evaluate(best_pipe, X_val, y_val)
    pipe = best_pipe
    if refit:
        X_all, y_all = np.concatenate([X_tr, X_val]), np.concatenate([y_tr, y_val])
        pipe = make_classifier(clf, n_samples=len(X_all), class_weight=class_weight, seed=seed, **best["params"])
        if clf == "logreg":  # start from the selected solution: a few iterations suffice
            _warm_from(pipe, best_pipe)
        pipe.fit(X_all, y_all)
    return FitResult(pipe, best["params"], rows, val_metrics, time.perf_counter() - t0)


def _warm_from(pipe: Pipeline, fitted: Pipeline) -> None:
    lr = pipe.named_steps["clf"]
    old = fitted.named_steps["clf"]
    lr.set_params(warm_start=True)
    lr.coef_, lr.intercept_, lr.classes_ = old.coef_.copy(), old.intercept_.copy(), old.classes_


def _logreg_path(X_tr, y_tr, X_val, y_val, Cs, class_weight, seed):
    """Fit along increasing C with warm starts; the scaler is fitted once on X_tr."""
    scaler = StandardScaler().fit(X_tr)
    Xs_tr, Xs_val = scaler.transform(X_tr), scaler.transform(X_val)
    lr = make_classifier("logreg", class_weight=class_weight, seed=seed).named_steps["clf"]
    # the search only has to rank the values of C: a looser tolerance than the final
    # refit's (1e-4) ranks them the same at a fraction of the iterations
    lr.set_params(warm_start=True, tol=SEARCH_TOL)
    rows, best, best_acc = [], None, -1.0
    for C in Cs:
        t = time.perf_counter()
        lr.set_params(C=C)
        lr.fit(Xs_tr, y_tr)
        acc = float(skm.accuracy_score(y_val, lr.predict(Xs_val)))
        rows.append({"params": {"C": C}, "val_accuracy": acc, "seconds": time.perf_counter() - t,
                     "iterations": int(np.max(lr.n_iter_))})
        if acc > best_acc:
            best_acc, best = acc, clone(lr).set_params(warm_start=False, tol=1e-4)
            best.coef_, best.intercept_, best.classes_ = lr.coef_.copy(), lr.intercept_.copy(), lr.classes_
            best.n_features_in_, best.n_iter_ = lr.n_features_in_, lr.n_iter_.copy()
    return rows, Pipeline([("scale", scaler), ("clf", best)])


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
    val_metrics = None
    if val is not None:
        val_metrics = evaluate_store(pipe, val, tap)
    return FitResult(pipe, {"epochs": epochs, "chunk_rows": chunk_rows, **params}, [], val_metrics,
                     time.perf_counter() - t0, out_of_core=True)


# ----------------------------------------------------------------------------- evaluation


def predict_in_chunks(pipe: Pipeline, X: np.ndarray, chunk: int = 8192):
    """Predicted labels and (when available) class probabilities."""
    has_proba = hasattr(pipe, "predict_proba")
    preds, probas = [], []
    for s in range(0, len(X), chunk):
        Xc = X[s:s + chunk]
        if has_proba:
            p = pipe.predict_proba(Xc)
            probas.append(p)
            preds.append(pipe.classes_[p.argmax(1)])
        else:
            preds.append(pipe.predict(Xc))
    return np.concatenate(preds), (np.concatenate(probas) if has_proba else None)


def evaluate(pipe: Pipeline, X: np.ndarray, y: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1, top-5 (with probabilities and > 5 classes),
    per-class precision/recall/F1, and the confusion matrix."""
    pred, proba = predict_in_chunks(pipe, np.asarray(X, dtype=np.float32))
    labels = np.asarray(pipe.classes_)
    out = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "macro_f1": float(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
    }
    if proba is not None and len(labels) > 5:
        out["top5_accuracy"] = float(skm.top_k_accuracy_score(y, proba, k=5, labels=labels))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    names = class_names or [str(c) for c in labels]
    out["per_class"] = {
        (names[int(c)] if int(c) < len(names) else str(c)): {"precision": float(p[i]), "recall": float(r[i]),
                                                            "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(labels)
    }
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    return out


def evaluate_store(pipe: Pipeline, store, tap: str | None, chunk_rows: int = 16384) -> dict:
    """Evaluate on a feature file chunk by chunk (for stores larger than memory)."""
    y = store.labels
    preds = []
    for s in range(0, len(store), chunk_rows):
        preds.append(pipe.predict(store.features(tap, slice(s, s + chunk_rows))))
    pred = np.concatenate(preds)
    return {"n": int(len(y)), "accuracy": float(skm.accuracy_score(y, pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
            "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
            "confusion_matrix": skm.confusion_matrix(y, pred, labels=pipe.classes_).tolist()}


def format_table(m: dict) -> str:
    keys = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy") if k in m]
    lines = [f"  {k:18s} {m[k]:.4f}" for k in keys]
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, report: dict, class_names: list[str]) -> Path:
    """Write ``metrics.json`` and ``confusion_matrix.png`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(report, indent=1))
    cm = report.get("metrics", report).get("confusion_matrix")
    if cm is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay

        n = len(cm)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 2)))
        labels = class_names if len(class_names) == n else None
        ConfusionMatrixDisplay(np.asarray(cm), display_labels=labels).plot(ax=ax, xticks_rotation=45,
                                                                           colorbar=False, values_format="d")
        acc = report.get("metrics", report).get("accuracy")
        ax.set_title(f"accuracy {acc:.3f}" if acc is not None else "confusion matrix")
        fig.tight_layout()
        fig.savefig(d / "confusion_matrix.png", dpi=100)
        plt.close(fig)
    return d
