"""Frozen-feature probes on Fashion-MNIST: kNN against logistic regression and the MLP.

Features: mobilenet_v2 with its ImageNet weights at 96 px, tap `features.14@grid2` (the
sweep's best, BENCHMARKS.md), 60,000 train and 10,000 test images, extracted by featx when
missing (cache/probes/). Each classifier runs `featx fit`'s protocol (the default grid on a
20 % hold-out, then the refit) in this process; its fit time is that whole call, and its
test accuracy is scored on the 10,000 test images.

    python scripts/bench_probes.py [--clf knn logreg mlp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, fashion_features, machine, update_section  # noqa: E402

TAP = "features.14@grid2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clf", nargs="+", default=["knn", "logreg", "mlp"])
    ap.add_argument("--tta", choices=["none", "flip"], default="none",
                    help="flip: features extracted with --tta flip (their own section)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    out = ROOT / "cache" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if a.tta == "none" else f"_{a.tta}"
    train, test = out / f"fm_train{suffix}.h5", out / f"fm_test{suffix}.h5"
    if not (train.exists() and test.exists()):
        t = time.perf_counter()
        train, test = fashion_features(out, layers=("features.14",), pools=("grid2",), extra=("--tta", a.tta),
                                       suffix=suffix)
        print(f"extracted in {time.perf_counter() - t:.0f} s", flush=True)
    from featx.fit import fit_store
    from featx.metrics import evaluate
    from featx.store import FeatureStore

    rows = {}
    with FeatureStore(train) as fs, FeatureStore(test) as ft:
        tap = TAP if TAP in fs.taps else fs.default_tap
        Xt, yt = ft.features(tap), ft.labels
        for clf in a.clf:
            t = time.perf_counter()
            r = fit_store(fs, tap, clf)
            fit = time.perf_counter() - t
            t = time.perf_counter()
            acc = evaluate(r.pipeline, Xt, yt)["accuracy"]
            rows[clf] = (acc, fit, time.perf_counter() - t, r.params, r.val_accuracy)
            print(f"{clf}: test {acc:.4f}, fit {fit:.1f} s, predicting the test set {rows[clf][2]:.1f} s, "
                  f"selected {r.params}", flush=True)
        n, d = len(fs), fs.dim(tap)
    if a.no_write:
        return
    lines = [f"| {clf} | {acc:.4f} | {val:.4f} | {fit:.1f} s | {pred:.1f} s | {params} |"
             for clf, (acc, fit, pred, params, val) in rows.items()]
    ratio = ""
    if "knn" in rows and "logreg" in rows:
        ratio = (f"\nkNN against logreg: {rows['knn'][0] - rows['logreg'][0]:+.4f} test accuracy, "
                 f"{rows['knn'][1] / rows['logreg'][1]:.2f}x its fit time.\n")
    flip = " with `--tta flip`" if a.tta == "flip" else ""
    update_section(f"bench_probes{suffix}", f"""
## Frozen probes{flip}: {", ".join(a.clf)} (scripts/bench_probes.py{" --tta flip" if flip else ""})

Machine: {machine()}. Fashion-MNIST, mobilenet_v2 (ImageNet weights) at 96 px{flip}, tap `{tap}` ({n:,} x {d}
train, {len(yt):,} test), pooled `grid2`. Each row is `featx fit`'s protocol in one process (default grid on a 20 %
hold-out, refit on everything); "predict" scores the 10,000 test images. One run.

| --clf | test accuracy | hold-out accuracy | fit (search + refit) | predict | selected |
|---|---:|---:|---:|---:|---|
{chr(10).join(lines)}
{ratio}""")


if __name__ == "__main__":
    main()
