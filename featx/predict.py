"""Classify new images with a model bundle or a fine-tuned network.

A bundle's own backbone, weights, tap, pooling and preprocessing are used, so the new
images get exactly the kind of features the classifier was trained on; the weights'
sha256 is checked against the bundle.  A fine-tuned network classifies with its own head.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from featx import bundle as bundle_io
from featx import plots
from featx.decode import open_rgb
from featx.errors import FeatxError
from featx.extract import compute
from featx.extractor import ExtractConfig, FeatureExtractor
from featx.files import atomic_open, check_output
from featx.sources import files_source, open_source
from featx.weights import finetuned_meta


@dataclass
class PredictResult:
    classes: list[str]
    rows: list[dict] = field(default_factory=list)  # id, predicted, probabilities, error
    source: object = None
    preprocessing: object = None


def _open_inputs(inputs: list[str]):
    """One folder or list file, or any number of image files; a path that does not exist is an error."""
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
        return "none"  # made again from the recorded seed; the sha256 check confirms it
    if w.startswith("file:"):
        path = meta.get("weights_path") or ""
        if not path or not Path(path).exists():  # a file, or a folder save_pretrained wrote
            raise FeatxError(f"the backbone weights {path or w[5:]} are gone; pass their new location with --weights.")
        return path
    return w


def predict_images(model: str, inputs: list[str], weights: str | None = None, batch_size: int | None = None,
                   workers: int | None = None, device: str = "auto", allow_pickle: bool = False,
                   compile: str = "auto") -> PredictResult:
    """Extract features of ``inputs`` as the bundle says and classify them."""
    if str(model).endswith((".pt", ".pth")):
        return predict_with_network(model, inputs, batch_size, workers, device, compile)
    b = bundle_io.load(model, allow_pickle=allow_pickle)
    m = b.meta
    wanted = [(t["layer"], t["pool"]) for t in (m.get("taps") or [m])]  # combined taps: all in one pass
    config = ExtractConfig(backbone=m["backbone"], weights=_weights_for(m, weights),
                           layers=tuple(dict.fromkeys(layer for layer, _ in wanted)),
                           pools=tuple(dict.fromkeys(pool for _, pool in wanted)),
                           preprocessing=m.get("preprocessing"), batch_size=batch_size,
                           workers=workers, device=device, seed=m.get("weights_seed") or 0, compile=compile,
                           tta=m.get("tta", "none"))
    source = _open_inputs(inputs)
    extractor = FeatureExtractor(config)  # the weights are identified, not loaded or compiled yet
    if m.get("weights_sha256") and extractor.weights.sha256 != m["weights_sha256"]:
        raise FeatxError(f"weights {extractor.weights.id} (sha256 {extractor.weights.sha256[:12]}) are not the ones "
                         f"the model was trained with (sha256 {m['weights_sha256'][:12]}).")
    made = {how: name for name, how in extractor.taps.items()}
    if any(how not in made for how in wanted):
        layer, pool = next(how for how in wanted if how not in made)
        raise FeatxError(f"this featx cannot make the model's tap {layer} with pooling {pool} on these images' "
                         "preprocessing; extract and fit again.")
    taps = [made[how] for how in wanted]

    def classify(X):
        if X.shape[1] != m["dim"]:
            raise FeatxError(f"features have dimension {X.shape[1]} but the model expects {m['dim']}.")
        if hasattr(b.pipeline, "predict_proba"):
            proba = b.pipeline.predict_proba(X)
            return [b.classes[int(c)] for c in b.pipeline.classes_], proba
        return None, [b.classes[int(c)] for c in b.pipeline.predict(X)]

    return _classify_all(source, extractor, taps, b.classes, classify)


def _classify_all(source, extractor, taps: list[str], classes: list[str], classify) -> PredictResult:
    """Extract ``taps`` with the runner's loop (no writer, no cache), side by side, and turn
    ``classify(X)`` into rows in source order.

    ``classify`` returns (column class names, probabilities) or (None, predicted names).
    """
    res = PredictResult(classes, source=source, preprocessing=extractor.pre)
    n, step = len(source), extractor.config.batch_size * 8  # rows classified a few batches at a time
    bar = tqdm(total=n, unit="img", desc=f"predict {extractor.config.backbone}", leave=False)
    try:
        for r in compute(source, extractor, [range(s, min(s + step, n)) for s in range(0, n, step)]):
            good = sorted(r.rows)
            if good:
                names, out = classify(np.stack([np.concatenate([r.rows[i][t] for t in taps]) for i in good]))
                for k, i in enumerate(good):
                    if names is None:
                        pred, probs = out[k], None
                    else:
                        probs = dict(zip(names, map(float, out[k])))
                        pred = names[int(np.argmax(out[k]))]
                    res.rows.append({"id": source.ids[i], "index": i, "predicted": pred, "probabilities": probs,
                                     "error": None})
            res.rows += [{"id": source.ids[i], "index": i, "predicted": None, "probabilities": None, "error": err}
                         for i, err in r.failed.items()]
            bar.update(len(r.unit))
    finally:
        bar.close()
    res.rows.sort(key=lambda row: row["index"])
    return res


def predict_with_network(weights_file: str, inputs, batch_size=None, workers=None,
                         device: str = "auto", compile: str = "auto") -> PredictResult:
    """Classify with a fine-tuned network's own head (``featx finetune``'s backbone.pt).

    ``inputs`` is a list of paths (as for the CLI) or a source.
    """
    meta = finetuned_meta(weights_file)
    logits = meta["logits_module"]
    source = _open_inputs(inputs) if isinstance(inputs, (list, tuple)) else inputs
    config = ExtractConfig(backbone=meta["backbone"], weights=weights_file, layers=(logits,), pools=("avg",),
                           batch_size=batch_size, workers=workers, device=device, compile=compile,
                           tta=meta.get("tta", "none"))  # a network validated on flip-averaged logits
    extractor = FeatureExtractor(config)

    def classify(scores):
        p = np.exp(scores - scores.max(1, keepdims=True))
        return meta["classes"], p / p.sum(1, keepdims=True)

    return _classify_all(source, extractor, [logits], meta["classes"], classify)


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV
# injection"); ids and class names come from file and folder names anyone can choose.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """``value`` safe for a spreadsheet: a leading ``'`` where it would start a formula."""
    return "'" + value if value.startswith(FORMULA_START) else value


def write_predictions(path: str | os.PathLike, res: PredictResult) -> None:
    """CSV: id, predicted, one probability column per class, error.

    Text cells that a spreadsheet would run as a formula (starting with = + - @, a tab
    or a carriage return) are written with a leading ``'``.
    """
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "predicted"] + [f"p_{c}" for c in res.classes] + ["error"])
        for r in res.rows:
            probs = [f"{r['probabilities'][c]:.6f}" if r["probabilities"] and c in r["probabilities"] else ""
                     for c in res.classes]
            w.writerow([csv_text(r["id"]), csv_text(r["predicted"] or "")] + probs + [csv_text(r["error"] or "")])


def write_sheet(path: str | os.PathLike, res: PredictResult, max_images: int = 48) -> None:
    """A contact sheet: each image titled with its top class and percentage."""
    rows = [r for r in res.rows if r["error"] is None][:max_images]
    if not rows:
        raise FeatxError("no image could be classified, so there is no contact sheet to draw.")
    images = [open_rgb(res.source, r["index"], res.preprocessing) for r in rows]
    titles = [r["predicted"] + (f" {100 * r['probabilities'][r['predicted']]:.0f}%" if r["probabilities"] else "")
              for r in rows]
    plots.contact_sheet(path, images, titles)


def predict_files(model: str, inputs: list[str], out: str | os.PathLike, sheet: str | os.PathLike | None = None,
                  log=None, **options) -> PredictResult:
    """``featx predict``: check the output locations first, classify ``inputs``
    (:func:`predict_images`, ``options`` are its keywords), write the CSV and, if asked, the
    contact sheet.  A note about how a folder was read goes to ``log``."""
    check_output(out, what="--out")  # before the images are read
    if sheet:
        check_output(sheet, what="--sheet")
    res = predict_images(model, inputs, **options)
    if log and getattr(res.source, "note", ""):
        log(res.source.note)
    write_predictions(out, res)
    if sheet:
        write_sheet(sheet, res)
    return res
