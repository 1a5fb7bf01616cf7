"""Every figure featx draws (the only module that imports matplotlib).

Each function takes plain numbers (or images) and writes one PNG; none of them reads a
feature file, a model or a source.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featx.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        _pyplot().close(fig)
    return path


def confusion_matrix(path: str | os.PathLike, cm, class_names: list[str] | None, accuracy: float | None) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), titled with the accuracy."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    n = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 2)))
    labels = class_names if class_names is not None and len(class_names) == n else None
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=labels).plot(ax=ax, xticks_rotation=45, colorbar=False,
                                                                       values_format="d")
    ax.set_title(f"accuracy {accuracy:.3f}" if accuracy is not None else "confusion matrix")
    return _save(fig, path)


def accuracy_by_depth(path: str | os.PathLike, rows: list[tuple[int, str, str, float]], title: str) -> Path:
    """Validation accuracy per probed layer (x: depth), one line per pooling.

    Args:
        rows: ``(depth, layer name, pooling, accuracy)`` per probe.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for how in dict.fromkeys(r[2] for r in rows):
        pts = sorted((r[0], r[3]) for r in rows if r[2] == how)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=how)
    layers = {r[0]: r[1] for r in rows}
    ax.set_xticks(sorted(layers))
    ax.set_xticklabels([layers[k] for k in sorted(layers)], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="pooling")
    return _save(fig, path)


def training_curves(path: str | os.PathLike, history: list[dict]) -> Path:
    """Loss and accuracy per epoch, training and (when present) validation."""
    plt = _pyplot()
    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a2.plot(ep, [r["train_acc"] for r in history], "o-", label="train")
    if "val_loss" in history[0]:
        a1.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
        a2.plot(ep, [r["val_acc"] for r in history], "o-", label="validation")
    a1.set_title("loss")
    a2.set_title("accuracy")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend()
        a.grid(alpha=0.3)
    return _save(fig, path)


def contact_sheet(path: str | os.PathLike, images: list, titles: list[str], cols: int = 6) -> Path:
    """Thumbnails (PIL images) in a grid, each with its title."""
    plt = _pyplot()
    cols = min(cols, len(images))
    nrows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        img = img.copy()
        img.thumbnail((256, 256))
        ax.imshow(np.asarray(img))
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi=90)
