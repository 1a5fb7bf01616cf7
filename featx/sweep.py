"""Which layer, which pooling: a linear probe per tap, from one forward pass.

``featx sweep`` extracts every block of a backbone (or the listed taps) with every
requested pooling in a single pass over the images (the features are kept as ordinary
featx files, ready for ``featx fit --tap``), fits the same logistic regression with the
same regularisation search as ``featx fit`` on each tap, scores it on a validation split,
and turns the table into advice: which tap and pooling, whether the best tap lies well
before the last one (the data differ from ImageNet) and what that suggests.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featx import adapters, plots
from featx.errors import FeatxError
from featx.extract import ExtractConfig, extract
from featx.files import atomic_open, check_output, write_text
from featx.fit import fit_arrays, holdout
from featx.sources import Subset, open_splits
from featx.store import FeatureStore, check_provenance, nonfinite

# a per-class training count below this is "small" for fine-tuning (transfer-learning
# guidance: with a few hundred images per class, train a head on frozen features)
SMALL_PER_CLASS = 1000
# the best tap must beat the last one by this much to call the data "unlike ImageNet"
MARGIN = 0.01


@dataclass
class ProbeRow:
    tap: str  # stored tap name
    layer: str  # module name
    depth: int  # position of the layer among the probed layers (0 = nearest the input)
    pool: str
    dim: int
    val_accuracy: float
    C: float
    fit_seconds: float


def per_class_subset(labels: np.ndarray, max_per_class: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_per_class`` items of each class, sorted (source order)."""
    if max_per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx if len(idx) <= max_per_class else rng.choice(idx, max_per_class, replace=False))
    return np.sort(np.concatenate(keep))


def probe(train, val, taps: list[str] | None = None, rows: np.ndarray | None = None,
          val_fraction: float = 0.2, seed: int = 0, progress=None) -> list[ProbeRow]:
    """Fit `featx fit`'s logistic regression (with its C search) on every tap.

    Args:
        train: a FeatureStore with the training features (all taps side by side).
        val: a FeatureStore for validation, or None to hold out ``val_fraction`` of train.
        taps: stored taps to probe (default: all, in the file's order).
        rows: training rows to use (a subsample); default all.
    """
    taps = _in_depth_order(train, taps or train.taps)
    for t in taps if val is not None else ():  # same features and class numbering, before any fit
        check_provenance(train.provenance(t), val.provenance(t), f"the validation features {val.path}")
    y = train.labels if rows is None else train.labels[rows]
    if val is None:
        tr_idx, va_idx = holdout(y, val_fraction, seed)
    layers = list(dict.fromkeys(train.tap_info(t)["layer"] for t in taps))
    out = []
    for t in taps:
        X = train.features(t, rows=rows)
        if len(bad := nonfinite(X)):
            raise train.nonfinite_error(t, bad if rows is None else np.sort(rows[bad]), "and sweep again")
        if val is None:
            Xtr, ytr, Xva, yva = X[tr_idx], y[tr_idx], X[va_idx], y[va_idx]
        else:
            Xtr, ytr, Xva, yva = X, y, val.features(t), val.labels
            if len(bad := nonfinite(Xva)):
                raise val.nonfinite_error(t, bad, "and sweep again")
        t0 = time.perf_counter()
        r = fit_arrays(Xtr, ytr, "logreg", Xva, yva, search="auto", seed=seed, refit=False, report=False)
        info = train.tap_info(t)
        row = ProbeRow(t, info["layer"], layers.index(info["layer"]), info["pool"], X.shape[1],
                       r.val_accuracy, float(r.params["C"]), time.perf_counter() - t0)
        out.append(row)
        if progress:
            progress(row)
    return out


def _in_depth_order(store, taps: list[str]) -> list[str]:
    """Order taps input side first: by the backbone's blocks when they are blocks, else as stored."""
    try:
        blocks = block_taps(store.attrs.get("backbone"))
    except FeatxError:  # a backbone featx cannot build here
        return list(taps)
    layer = {t: store.tap_info(t)["layer"] for t in taps}
    if not all(layer[t] in blocks for t in taps):
        return list(taps)
    return sorted(taps, key=lambda t: blocks.index(layer[t]))  # stable: poolings keep their order


def recommend(rows: list[ProbeRow], n_train: int, n_classes: int, backbone: str | None = None,
              data: str | None = None, blocks: list[str] | None = None) -> list[str]:
    """Advice derived from the probe table; every sentence states the numbers it rests on."""
    best = max(rows, key=lambda r: (r.val_accuracy, -r.depth))
    last_depth = max(r.depth for r in rows)
    last = max((r for r in rows if r.depth == last_depth), key=lambda r: r.val_accuracy)
    lines = [f"Best: tap {best.layer} with {best.pool} pooling ({best.dim} features), validation accuracy "
             f"{best.val_accuracy:.4f} (logistic regression, C={best.C:g}).",
             f"Last tap {last.layer} ({last.pool}): {last.val_accuracy:.4f}."]
    gap = best.val_accuracy - last.val_accuracy
    behind = last_depth - best.depth
    if behind > 0 and gap >= MARGIN:
        lines.append(f"The best tap lies {behind} probed layer(s) before the last and beats it by {gap:.4f}: "
                     "the late, ImageNet-specific features fit these data worse, so the data differ from "
                     "ImageNet. Use the earlier tap:")
        lines.append(f"    featx fit FEATURES.h5 --tap {best.tap}")
        if blocks and best.layer in blocks:
            n_after = len(blocks) - 1 - blocks.index(best.layer)
            lines.append(f"or fine-tune the {n_after} block(s) after it (they carry the ImageNet-specific features):")
            lines.append(f"    featx finetune {data or 'DATA'} --backbone {backbone or 'BACKBONE'} --unfreeze {n_after}")
    else:
        lines.append(f"The last tap is within {max(gap, 0):.4f} of the best: the final features transfer well "
                     "(the data resemble ImageNet's); the default tap is a good choice.")
    per_class = n_train / max(n_classes, 1)
    if per_class < SMALL_PER_CLASS:
        lines.append(f"Dataset: {n_train} training images, {per_class:.0f} per class: small for fine-tuning "
                     f"(< {SMALL_PER_CLASS} per class); frozen features with a linear head, or fine-tuning only "
                     "the last block(s) with augmentation, are the safer strategies.")
    else:
        lines.append(f"Dataset: {n_train} training images, {per_class:.0f} per class: large enough to fine-tune "
                     "several blocks (or all, with a small backbone learning rate) if frozen features fall short.")
    return lines


def write_outputs(out: str | os.PathLike, rows: list[ProbeRow], advice: list[str], meta: dict) -> Path:
    """sweep.csv, sweep.json, accuracy_by_depth.png and recommendation.txt in ``out``."""
    d = Path(out)
    with atomic_open(d / "sweep.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    write_text(d / "sweep.json", json.dumps({**meta, "rows": [asdict(r) for r in rows], "recommendation": advice},
                                            indent=1))
    write_text(d / "recommendation.txt", "\n".join(advice) + "\n")
    plots.accuracy_by_depth(d / "accuracy_by_depth.png", [(r.depth, r.layer, r.pool, r.val_accuracy) for r in rows],
                            f"linear probe per tap: {meta.get('backbone', '')}")
    return d


def sweep_features(train, val, out: str | os.PathLike, taps: list[str] | None = None, rows: np.ndarray | None = None,
                   val_fraction: float = 0.2, seed: int = 0, progress=None, n_train: int | None = None,
                   data: str | None = None) -> tuple[list[ProbeRow], list[str]]:
    """Probe the taps of open feature stores, write the outputs to ``out``, return rows and advice.

    ``n_train`` is the data set's size when ``train`` holds a subsample of it (it decides
    "small or large" in the advice); ``data`` names the images in the suggested commands.
    """
    a = train.attrs
    backbone = a.get("backbone")
    try:
        blocks = block_taps(backbone)
    except FeatxError:  # a backbone featx cannot build here: no block numbering for --unfreeze
        blocks = None
    found = probe(train, val, taps, rows, val_fraction, seed, progress)
    n_train = n_train or len(train)
    advice = recommend(found, n_train, len(train.classes), backbone, data, blocks)
    write_outputs(out, found, advice, {"backbone": backbone, "weights": a.get("weights"),
                                       "features": {"train": str(train.path), "val": str(val.path) if val else None},
                                       "n_train": n_train, "classes": train.classes})
    return found, advice


def block_taps(backbone: str) -> list[str]:
    bk = adapters.backbone(backbone)
    return [b.tap for b in bk.blocks(bk.bare())]


def sweep_images(data: str, out: str, backbone: str, weights: str, taps: list[str] | None, pools: list[str],
                 train_split: str | None = None, val_split: str | None = None, max_per_class: int | None = None,
                 image_size: int | None = None, root: str = "data", seed: int = 0, extract_kw: dict | None = None,
                 progress=None, val_fraction: float = 0.2, log=None):
    """Extract all taps in one pass per split, then probe them.

    Splits as :func:`featx.sources.open_splits` finds them: ``train``/``val`` folders when
    DATA has them, else all of DATA with a stratified, seeded hold-out for validation.
    """
    check_output(out, folder=True, what="--out")
    blocks = block_taps(backbone)
    layers = blocks if not taps or taps == ["blocks"] else taps
    # a gridK pooling is left out where a block's map is smaller than K x K (late blocks, small images)
    cfg = ExtractConfig(backbone=backbone, weights=weights, layers=tuple(layers), pools=tuple(pools),
                        image_size=image_size, seed=seed, small_maps="skip", **(extract_kw or {}))
    splits = open_splits(data, train_split, val_split, root, val_fraction, seed)
    if log:
        log(splits.note)
    out_dir = Path(out)
    files = {}
    n_full = len(splits.train)  # the data set's size decides "small or large", not the subsample
    for name, src in (("train", splits.train), ("val", splits.val)):
        if src is None:
            continue
        keep = per_class_subset(src.labels, max_per_class, seed)
        if len(keep) < len(src):
            src = Subset(src, keep)
        files[name] = out_dir / f"features_{name}.h5"
        extract(src, files[name], cfg)
    with FeatureStore(files["train"]) as tr:
        if log and len(tr.taps) < len(layers) * len(pools):
            stored = {(tr.tap_info(t)["layer"], tr.tap_info(t)["pool"]) for t in tr.taps}
            left = [f"{p} on {layer}" for layer in layers for p in pools if (layer, p) not in stored]
            log(f"left out, their maps being smaller than the grid: {', '.join(left[:6])}"
                + (f" and {len(left) - 6} more" if len(left) > 6 else "") + ".")
        val = FeatureStore(files["val"]) if "val" in files else None
        try:
            return sweep_features(tr, val, out_dir, seed=seed, progress=progress, n_train=n_full, data=data,
                                  val_fraction=val_fraction)
        finally:
            if val is not None:
                val.close()


def sweep_files(train_path, val_path, out: str | os.PathLike, taps: list[str] | None = None,
                max_per_class: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                progress=None) -> tuple[list[ProbeRow], list[str]]:
    """``featx sweep --train FILE [--val FILE]``: probe the taps of feature files.

    ``taps``: layer or stored tap names to probe (None or ``["blocks"]``: every tap).
    """
    check_output(out, folder=True, what="--out")
    with FeatureStore(train_path) as tr:
        val = FeatureStore(val_path) if val_path else None
        try:
            rows = per_class_subset(tr.labels, max_per_class, seed) if max_per_class else None
            wanted = None if not taps or list(taps) == ["blocks"] else \
                [t for t in tr.taps if tr.tap_info(t)["layer"] in taps or t in taps]
            if wanted == []:
                raise FeatxError(f"{train_path} has none of the taps {', '.join(taps)}; it has {', '.join(tr.taps)}.")
            return sweep_features(tr, val, out, wanted, rows, val_fraction, seed, progress=progress)
        finally:
            if val is not None:
                val.close()
