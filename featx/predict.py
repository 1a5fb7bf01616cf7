"""Classify new images with a model bundle: extraction in memory, then the fitted pipeline.

The bundle's own backbone, weights, tap, pooling and preprocessing are used, so the new
images get exactly the kind of features the classifier was trained on; the weights'
sha256 is checked against the bundle.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.errors import FeatxError


@dataclass
class PredictResult:
    classes: list[str]
    rows: list[dict] = field(default_factory=list)  # id, predicted, probabilities, error
    source: object = None
    preprocessing: object = None


def _open_inputs(inputs: list[str]):
    """One folder or list file, or any number of image files; a path that does not exist is an error."""
    from featx.sources import files_source, open_source

    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FeatxError(f"{missing[0]}{more} does not exist; give image files, a folder or a CSV list.")
    if len(inputs) == 1:
        p = Path(inputs[0])
        if p.is_dir() or p.suffix.lower() in (".csv", ".tsv", ".txt", ".tab"):
            return open_source(inputs[0])
    return files_source(inputs)


def _weights_for(meta: dict, override: str | None) -> str:
    if override:
        return override
    w = meta.get("weights", "DEFAULT")
    if w == "none":
        if meta.get("weights_seed") is None or not meta.get("weights_sha256"):
            raise FeatxError("this model was trained on features of an unseeded random backbone, which cannot be "
                             "made again; extract again with this featx (random weights are now seeded) or with "
                             "real or saved weights (--weights PATH), and fit again.")
        return "none"  # made again from the recorded seed; the sha256 check below confirms it
    if w.startswith("file:"):
        path = meta.get("weights_path") or ""
        if not Path(path).is_file():
            raise FeatxError(f"the backbone weights file {path or w[5:]} is gone; pass its new location with --weights.")
        return path
    return w


def predict_images(model: str, inputs: list[str], weights: str | None = None, batch_size: int | None = None,
                   workers: int | None = None, device: str = "auto", allow_pickle: bool = False) -> PredictResult:
    """Extract features of ``inputs`` as the bundle says and classify them."""
    from featx import bundle as bundle_mod
    from featx.extract import ExtractConfig, FeatureExtractor

    if str(model).endswith((".pt", ".pth")):
        return predict_with_network(model, inputs, batch_size, workers, device)
    b = bundle_mod.load(model, allow_pickle=allow_pickle)
    m = b.meta
    config = ExtractConfig(backbone=m["backbone"], weights=_weights_for(m, weights), layers=(m["layer"],),
                           pools=(m["pool"],), preprocessing=m.get("preprocessing"), batch_size=batch_size,
                           workers=workers, device=device, seed=m.get("weights_seed") or 0)
    extractor = FeatureExtractor(config)
    if m.get("weights_sha256") and extractor.weights.sha256 != m["weights_sha256"]:
        raise FeatxError(f"weights {extractor.weights.id} (sha256 {extractor.weights.sha256[:12]}) are not the ones "
                         f"the model was trained with (sha256 {m['weights_sha256'][:12]}).")
    source = _open_inputs(inputs)
    tap = next(iter(extractor.taps))

    def classify(X):
        if X.shape[1] != m["dim"]:
            raise FeatxError(f"features have dimension {X.shape[1]} but the model expects {m['dim']}.")
        if hasattr(b.pipeline, "predict_proba"):
            proba = b.pipeline.predict_proba(X)
            return [b.classes[int(c)] for c in b.pipeline.classes_], proba
        return None, [b.classes[int(c)] for c in b.pipeline.predict(X)]

    return _classify_all(source, extractor, tap, b.classes, classify)


def _classify_all(source, extractor, tap: str, classes: list[str], classify) -> PredictResult:
    """Extract ``tap`` batch by batch and turn ``classify(X)`` into rows in source order.

    ``classify`` returns (column class names, probabilities) or (None, predicted names).
    """
    from featx.extract import iterate

    res = PredictResult(classes, source=source, preprocessing=extractor.pre)
    order: dict[int, dict] = {}
    for _, good, feats, bad in iterate(source, extractor, range(len(source))):
        if good:
            names, out = classify(feats[tap])
            for k, i in enumerate(good):
                if names is None:
                    pred, probs = out[k], None
                else:
                    probs = dict(zip(names, map(float, out[k])))
                    pred = names[int(np.argmax(out[k]))]
                order[i] = {"id": source.ids[i], "index": i, "predicted": pred, "probabilities": probs, "error": None}
        for i, err in bad:
            order[i] = {"id": source.ids[i], "index": i, "predicted": None, "probabilities": None, "error": err}
    res.rows = [order[i] for i in sorted(order)]
    return res


def predict_with_network(weights_file: str, inputs, batch_size=None, workers=None,
                         device: str = "auto") -> PredictResult:
    """Classify with a fine-tuned network's own head (``featx finetune``'s backbone.pt).

    ``inputs`` is a list of paths (as for the CLI) or a source.
    """
    from featx.extract import ExtractConfig, FeatureExtractor

    if not Path(weights_file).is_file():
        raise FeatxError(f"weights file {weights_file} does not exist.")
    import torch

    meta = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    meta = meta.get("featx") if isinstance(meta, dict) else None
    if not meta or meta.get("featx") != "finetune":
        raise FeatxError(f"{weights_file} is not a featx fine-tuned network; give a model bundle (.skops) instead.")
    head = meta["head_module"] + (".3" if meta["head"] == "mlp" else "")
    config = ExtractConfig(backbone=meta["backbone"], weights=weights_file, layers=(head,), pools=("avg",),
                           batch_size=batch_size, workers=workers, device=device)
    extractor = FeatureExtractor(config)
    source = _open_inputs(inputs) if isinstance(inputs, (list, tuple)) else inputs

    def classify(logits):
        p = np.exp(logits - logits.max(1, keepdims=True))
        return meta["classes"], p / p.sum(1, keepdims=True)

    return _classify_all(source, extractor, head, meta["classes"], classify)


def write_predictions(path: str | os.PathLike, res: PredictResult) -> None:
    """CSV: id, predicted, one probability column per class, error."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "predicted"] + [f"p_{c}" for c in res.classes] + ["error"])
        for r in res.rows:
            probs = [f"{r['probabilities'][c]:.6f}" if r["probabilities"] and c in r["probabilities"] else ""
                     for c in res.classes]
            w.writerow([r["id"], r["predicted"] or ""] + probs + [r["error"] or ""])


def write_sheet(path: str | os.PathLike, res: PredictResult, max_images: int = 48) -> None:
    """A contact sheet: each image titled with its top class and percentage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featx.sources import to_rgb

    rows = [r for r in res.rows if r["error"] is None][:max_images]
    if not rows:
        raise FeatxError("no image could be classified, so there is no contact sheet to draw.")
    cols = min(6, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        img = to_rgb(res.source.open(r["index"]))
        img.thumbnail((256, 256))
        ax.imshow(np.asarray(img))
        title = r["predicted"]
        if r["probabilities"]:
            title += f" {100 * r['probabilities'][r['predicted']]:.0f}%"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
