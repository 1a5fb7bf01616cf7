"""Scores of a fitted classifier: accuracy and friends, per class, the confusion matrix, reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from featx import plots
from featx.errors import FeatxError
from featx.files import write_text


def predict_in_chunks(pipe, X: np.ndarray, chunk: int = 8192):
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


def scores(y, pred, labels, proba=None, class_names: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1, top-5 (with probabilities and > 5 classes),
    per-class precision/recall/F1, and the confusion matrix."""
    labels = np.asarray(labels)
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


def evaluate(pipe, X: np.ndarray, y: np.ndarray, class_names: list[str] | None = None) -> dict:
    """:func:`scores` of ``pipe`` on features in memory."""
    pred, proba = predict_in_chunks(pipe, np.asarray(X, dtype=np.float32))
    return scores(y, pred, pipe.classes_, proba, class_names)


def evaluate_batches(pipe, batches, class_names: list[str] | None = None) -> dict:
    """:func:`scores` over ``(X, y)`` batches (for features larger than memory)."""
    preds, probas, ys = [], [], []
    for X, y in batches:
        pred, proba = predict_in_chunks(pipe, X)
        preds.append(pred)
        probas.append(proba)
        ys.append(y)
    proba = None if probas[0] is None else np.concatenate(probas)
    return scores(np.concatenate(ys), np.concatenate(preds), pipe.classes_, proba, class_names)


def evaluate_store(pipe, store, tap: str | None, class_names: list[str] | None = None,
                   chunk_rows: int = 16384) -> dict:
    """:func:`scores` on a feature file read chunk by chunk (refusing rows with nan or inf)."""
    if len(store) == 0:
        raise FeatxError(f"{store.path} has no rows to evaluate on (did every image fail to decode?).")
    labels = store.labels

    def batches():
        for s in range(0, len(store), chunk_rows):
            X = store.features(tap, slice(s, s + chunk_rows))
            if not np.isfinite(X).all():
                raise store.nonfinite_error(tap or store.default_tap, store.nonfinite_rows(tap),
                                            "and evaluate again")
            yield X, labels[s:s + chunk_rows]

    return evaluate_batches(pipe, batches(), class_names)


def format_table(m: dict) -> str:
    keys = [k for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy") if k in m]
    return "\n".join(f"  {k:18s} {m[k]:.4f}" for k in keys)


def write_report(directory: str | os.PathLike, report: dict, class_names: list[str]) -> Path:
    """Write ``metrics.json`` and ``confusion_matrix.png`` into ``directory``."""
    d = Path(directory)
    write_text(d / "metrics.json", json.dumps(report, indent=1))
    m = report.get("metrics", report)
    if m.get("confusion_matrix") is not None:
        plots.confusion_matrix(d / "confusion_matrix.png", m["confusion_matrix"], class_names, m.get("accuracy"))
    return d
