"""Which layer, which pooling: a linear probe per tap, from one forward pass.

``featx sweep`` extracts every block of a backbone (or the listed taps) with every
requested pooling in a single pass over the images (the features are kept as ordinary
featx files, ready for ``featx fit --tap``), fits the same logistic regression with the
same regularisation search as ``featx fit`` on each tap, and kNN beside it, scores both on
a validation split, and turns the table into advice: which tap and pooling, whether the
best tap lies well before the last one (the data differ from ImageNet) and what that
suggests.  Then it tries the cheap tricks on the best: the best two and three taps of
different layers combined (``fit --tap A --tap B``), and, from images, flip averaging
(``extract --tta flip``) of the best tap and of the best combination, each with its cost:
extra features and the forward time per image, measured.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from featx import adapters, plots
from featx.errors import FeatxError
from featx.extract import ExtractConfig, extract
from featx.extractor import FeatureExtractor
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
    knn_accuracy: float | None = None  # `fit --clf knn` on the same split, its k and vote chosen the same way


@dataclass
class ComboRow:
    """A trick tried on the best single taps: several combined, flip averaging, or both."""

    taps: str  # the stored taps joined by + (what `fit --tap A --tap B` names)
    tta: str  # none or flip
    dim: int
    val_accuracy: float
    knn_accuracy: float
    C: float
    fit_seconds: float
    extra_dim: int  # features beyond the best single tap's
    seconds_per_image: float | None = None  # the forward pass to its deepest tap (None: not measured)


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
    layers = list(dict.fromkeys(train.tap_info(t)["layer"] for t in taps))
    split = Split(train, val, rows, val_fraction, seed)
    out = []
    for t in taps:
        lr, knn, seconds = split.probe(t)
        info = train.tap_info(t)
        row = ProbeRow(t, info["layer"], layers.index(info["layer"]), info["pool"], train.dim(t),
                       lr.val_accuracy, float(lr.params["C"]), seconds, knn.val_accuracy)
        out.append(row)
        if progress:
            progress(row)
    return out


class Split:
    """The training and validation rows every probe of a sweep uses: the ``val`` file, or
    the same stratified hold-out of (a subsample of) the training rows."""

    def __init__(self, train, val, rows: np.ndarray | None = None, val_fraction: float = 0.2, seed: int = 0):
        self.train, self.val, self.rows, self.seed = train, val, rows, seed
        self.y = train.labels if rows is None else train.labels[rows]
        if val is None:
            self.tr, self.va = holdout(self.y, val_fraction, seed)

    def arrays(self, tap: str | tuple[str, ...]):
        """(X_train, y_train, X_val, y_val) of a tap or of taps side by side; nan or inf refused."""
        X = self.train.features(tap, rows=self.rows)
        if len(bad := nonfinite(X)):
            raise self.train.nonfinite_error(tap, bad if self.rows is None else np.sort(self.rows[bad]),
                                             "and sweep again")
        if self.val is None:
            return X[self.tr], self.y[self.tr], X[self.va], self.y[self.va]
        Xva = self.val.features(tap)
        if len(bad := nonfinite(Xva)):
            raise self.val.nonfinite_error(tap, bad, "and sweep again")
        return X, self.y, Xva, self.val.labels

    def probe(self, tap: str | tuple[str, ...]):
        """`featx fit`'s logistic regression (its C search) and kNN (its k and vote search) on
        the split: their results and the logistic regression's seconds."""
        Xtr, ytr, Xva, yva = self.arrays(tap)
        t0 = time.perf_counter()
        lr = fit_arrays(Xtr, ytr, "logreg", Xva, yva, search="auto", seed=self.seed, refit=False, report=False)
        seconds = time.perf_counter() - t0
        knn = fit_arrays(Xtr, ytr, "knn", Xva, yva, search="auto", seed=self.seed, refit=False, report=False,
                         blocks=self.train.blocks(tap))
        return lr, knn, seconds


def best_of_layers(rows: list[ProbeRow], most: int = 3) -> list[ProbeRow]:
    """The best probe of each layer, best first, at most ``most`` (combining two poolings of
    one layer mostly repeats it: its avg is the mean of its grid's cells)."""
    out, seen = [], set()
    for r in sorted(rows, key=lambda r: (-r.val_accuracy, r.depth)):
        if r.layer not in seen:
            out.append(r)
            seen.add(r.layer)
    return out[:most]


def combo_sets(rows: list[ProbeRow]) -> list[tuple[str, ...]]:
    """The taps to combine: the best tap of the best two layers, and of the best three."""
    picks = best_of_layers(rows)
    return [tuple(r.tap for r in picks[:k]) for k in (2, 3) if len(picks) >= k]


def combine(train, val, rows: list[ProbeRow], sets: list[tuple[str, ...]], probe_rows: np.ndarray | None = None,
            val_fraction: float = 0.2, seed: int = 0, progress=None, tta: str = "none",
            seconds_per_image: dict[str, float] | None = None) -> list[ComboRow]:
    """Probe each set of taps side by side (a set of one: that tap alone), as :func:`probe`
    does one tap, on the same split.  ``rows`` (the single taps' probes) give the depth and
    the best tap's width; ``tta`` says how ``train``'s features were made;
    ``seconds_per_image``: the forward time per image to each layer (:func:`forward_seconds`)."""
    best = max(rows, key=lambda r: (r.val_accuracy, -r.depth))
    depth = {r.tap: r.depth for r in rows}
    layer = {r.tap: r.layer for r in rows}
    split = Split(train, val, probe_rows, val_fraction, seed)
    out = []
    for taps in sets:
        lr, knn, seconds = split.probe(taps if len(taps) > 1 else taps[0])
        dim = train.dim(taps)
        row = ComboRow("+".join(taps), tta, dim, lr.val_accuracy, knn.val_accuracy, float(lr.params["C"]), seconds,
                       dim - best.dim, (seconds_per_image or {}).get(layer[max(taps, key=depth.__getitem__)]))
        out.append(row)
        if progress:
            progress(row)
    return out


def forward_seconds(config: ExtractConfig, layers: list[str], repeats: int = 3) -> dict[str, float]:
    """Seconds per image of the forward pass to each of ``layers`` (it stops there), timed on
    a batch of random images of the crop size: the fastest of ``repeats``, after two passes
    through every layer to warm up (the fastest is the one other work on the machine
    disturbed least)."""
    ex = FeatureExtractor(replace(config, layers=tuple(layers), pools=("avg",), compile="off"))
    x = torch.randint(0, 256, (ex.config.batch_size, 3, ex.pre.crop, ex.pre.crop), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        ex(x)
    times: dict[str, list[float]] = {layer: [] for layer, _ in ex.taps.values()}
    for _ in range(repeats):  # the layers in turn, so that a disturbance spreads over all of them
        for name, (layer, _) in ex.taps.items():
            t = time.perf_counter()
            ex(x, [name])
            times[layer].append(time.perf_counter() - t)
    return {layer: min(ts) / len(x) for layer, ts in times.items()}


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


WORTH = 0.005  # a trick must gain this much validation accuracy to be worth its cost


def trick_advice(rows: list[ProbeRow], combos: list[ComboRow]) -> list[str]:
    """What kNN, combined taps and flip averaging gave over the best single tap, and their cost."""
    best = max(rows, key=lambda r: (r.val_accuracy, -r.depth))
    lines = []
    if best.knn_accuracy is not None:
        knn = max(rows, key=lambda r: (r.knn_accuracy or 0, -r.depth))
        lines.append(f"kNN (no training, `--clf knn`) on {best.tap}: {best.knn_accuracy:.4f}; its best tap is "
                     f"{knn.tap} ({knn.knn_accuracy:.4f}).")
    base = combos[0] if combos else None  # the best tap as the file holds it
    base_time = base.seconds_per_image if base else None
    for c in combos[1:]:
        taps = c.taps.split("+")
        what = (f"{len(taps)} taps combined ({' + '.join(taps)})" if len(taps) > 1 else f"{c.taps}") + \
            (" with flip averaging" if c.tta == "flip" else "")
        gain = c.val_accuracy - best.val_accuracy
        cost = [f"{c.dim} features ({c.extra_dim:+d})"]
        if c.seconds_per_image is not None:
            ratio = f", {c.seconds_per_image / base_time:.2f}x the best tap's" if base_time else ""
            cost.append(f"{1000 * c.seconds_per_image:.2f} ms per image in the forward pass{ratio}")
        verdict = "worth its cost" if gain >= WORTH else f"not worth its cost (under {WORTH} gained)"
        lines.append(f"{what}: {c.val_accuracy:.4f} ({gain:+.4f} over the best single tap; kNN {c.knn_accuracy:.4f}); "
                     f"cost: {', '.join(cost)}: {verdict}.")
    top = max(combos[1:], key=lambda c: c.val_accuracy, default=None)
    if top is not None and top.val_accuracy - best.val_accuracy >= WORTH:
        flags = " ".join(f"--tap {t}" for t in top.taps.split("+"))
        lines.append("Best trick: " + ("extract with --tta flip, then " if top.tta == "flip" else "") +
                     f"featx fit FEATURES.h5 {flags}")
    return lines


def write_outputs(out: str | os.PathLike, rows: list[ProbeRow], advice: list[str], meta: dict,
                  combos: list[ComboRow] = ()) -> Path:
    """sweep.csv, combined.csv (the tricks), sweep.json, accuracy_by_depth.png and
    recommendation.txt in ``out``."""
    d = Path(out)
    for name, table in (("sweep.csv", rows), ("combined.csv", combos)):
        if table:
            with atomic_open(d / name, newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(asdict(table[0])))
                w.writeheader()
                for r in table:
                    w.writerow(asdict(r))
    write_text(d / "sweep.json", json.dumps({**meta, "rows": [asdict(r) for r in rows],
                                             "combined": [asdict(c) for c in combos], "recommendation": advice},
                                            indent=1))
    write_text(d / "recommendation.txt", "\n".join(advice) + "\n")
    plots.accuracy_by_depth(d / "accuracy_by_depth.png", [(r.depth, r.layer, r.pool, r.val_accuracy) for r in rows],
                            f"linear probe per tap: {meta.get('backbone', '')}")
    return d


def sweep_features(train, val, out: str | os.PathLike, taps: list[str] | None = None, rows: np.ndarray | None = None,
                   val_fraction: float = 0.2, seed: int = 0, progress=None, n_train: int | None = None,
                   data: str | None = None, speed=None, flip=None) -> tuple[list[ProbeRow], list[str]]:
    """Probe the taps of open feature stores, then the tricks on the best (:func:`combine`),
    write the outputs to ``out``, return rows and advice.

    ``n_train`` is the data set's size when ``train`` holds a subsample of it (it decides
    "small or large" in the advice); ``data`` names the images in the suggested commands.
    ``speed(layers, tta)``: seconds per image of the forward pass to each layer (None: not
    measured). ``flip(taps)``: a context giving the (train, val) stores of those taps made
    with ``--tta flip`` (None: flip averaging is not tried; it needs the images).
    """
    a = train.attrs
    backbone = a.get("backbone")
    try:
        blocks = block_taps(backbone)
    except FeatxError:  # a backbone featx cannot build here: no block numbering for --unfreeze
        blocks = None
    found = probe(train, val, taps, rows, val_fraction, seed, progress)
    combos = tricks(train, val, found, rows, val_fraction, seed, progress, speed, flip)
    n_train = n_train or len(train)
    advice = recommend(found, n_train, len(train.classes), backbone, data, blocks) + trick_advice(found, combos)
    write_outputs(out, found, advice, {"backbone": backbone, "weights": a.get("weights"),
                                       "features": {"train": str(train.path), "val": str(val.path) if val else None},
                                       "n_train": n_train, "classes": train.classes}, combos)
    return found, advice


def tricks(train, val, found: list[ProbeRow], rows: np.ndarray | None = None, val_fraction: float = 0.2, seed: int = 0,
           progress=None, speed=None, flip=None) -> list[ComboRow]:
    """The tricks on the probes' winners: first the best tap as it is (the baseline), then
    :func:`combo_sets` combined, then with ``flip`` the best tap and the best combination
    flip-averaged (``speed`` and ``flip`` as :func:`sweep_features` takes them)."""
    best = max(found, key=lambda r: (r.val_accuracy, -r.depth))
    sets = combo_sets(found)
    layer = {r.tap: r.layer for r in found}
    reach = list(dict.fromkeys([best.layer] + [layer[t] for taps in sets for t in taps]))
    per_image = speed(reach, "none") if speed else {}
    made = train.attrs.get("tta", "none")  # how the file's features were made (a --train file may be flipped)
    combos = [ComboRow(best.tap, made, best.dim, best.val_accuracy, best.knn_accuracy, best.C, best.fit_seconds, 0,
                       per_image.get(best.layer))]
    combos += combine(train, val, found, sets, rows, val_fraction, seed, progress, made, per_image)
    if flip is not None:
        top = max(combos[1:], key=lambda c: c.val_accuracy, default=None)
        flip_sets = [(best.tap,)] + ([tuple(top.taps.split("+"))] if top else [])
        per_image = speed(reach, "flip") if speed else {}
        with flip(list(dict.fromkeys(t for taps in flip_sets for t in taps))) as (ftrain, fval):
            combos += combine(ftrain, fval, found, flip_sets, rows, val_fraction, seed, progress, "flip", per_image)
    return combos


def block_taps(backbone: str) -> list[str]:
    bk = adapters.backbone(backbone)
    return [b.tap for b in bk.blocks(bk.bare())]


def sweep_images(data: str, out: str, backbone: str, weights: str, taps: list[str] | None, pools: list[str],
                 train_split: str | None = None, val_split: str | None = None, max_per_class: int | None = None,
                 image_size: int | None = None, root: str = "data", seed: int = 0, extract_kw: dict | None = None,
                 progress=None, val_fraction: float = 0.2, log=None, flip: bool = True):
    """Extract all taps in one pass per split, then probe them (:func:`sweep_features`),
    measuring the forward time to the layers the advice weighs, and with ``flip`` extracting
    the best tap and combination again with ``--tta flip`` (``features_{split}_flip.h5``).

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
    files, sources = {}, {}
    n_full = len(splits.train)  # the data set's size decides "small or large", not the subsample
    for name, src in (("train", splits.train), ("val", splits.val)):
        if src is None:
            continue
        keep = per_class_subset(src.labels, max_per_class, seed)
        if len(keep) < len(src):
            src = Subset(src, keep)
        files[name], sources[name] = out_dir / f"features_{name}.h5", src
        extract(src, files[name], cfg)

    @contextlib.contextmanager
    def flipped(wanted: list[str]):
        """The images again, with --tta flip, to the layers of the ``wanted`` taps (every
        pooling, so that the taps have the same names)."""
        with FeatureStore(files["train"]) as tr:
            layers = list(dict.fromkeys(tr.tap_info(t)["layer"] for t in wanted))
        flip_cfg = replace(cfg, layers=tuple(layers), tta="flip")
        paths = {name: out_dir / f"features_{name}_flip.h5" for name in sources}
        for name, src in sources.items():
            extract(src, paths[name], flip_cfg)
        with contextlib.ExitStack() as stack:
            stores = {name: stack.enter_context(FeatureStore(path)) for name, path in paths.items()}
            yield stores["train"], stores.get("val")

    def speed(layers: list[str], tta: str) -> dict[str, float]:
        return forward_seconds(replace(cfg, tta=tta), layers)
    with FeatureStore(files["train"]) as tr:
        if log and len(tr.taps) < len(layers) * len(pools):
            stored = {(tr.tap_info(t)["layer"], tr.tap_info(t)["pool"]) for t in tr.taps}
            left = [f"{p} on {layer}" for layer in layers for p in pools if (layer, p) not in stored]
            log(f"left out, their maps being smaller than the grid: {', '.join(left[:6])}"
                + (f" and {len(left) - 6} more" if len(left) > 6 else "") + ".")
        val = FeatureStore(files["val"]) if "val" in files else None
        try:
            return sweep_features(tr, val, out_dir, seed=seed, progress=progress, n_train=n_full, data=data,
                                  val_fraction=val_fraction, speed=speed, flip=flipped if flip else None)
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
