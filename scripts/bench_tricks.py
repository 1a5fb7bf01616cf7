"""What each cheap trick gives frozen features on Fashion-MNIST: combined taps, flip averaging, kNN.

Features: mobilenet_v2 with its ImageNet weights at 96 px, blocks features.11-16 pooled avg
and grid2, extracted by featx when missing (cache/probes/fm_*_multi.h5), once plain and once
with `--tta flip`. The sweep's own rules choose what to combine, on the sweep's subsample
(1,000 training images per class, a 20 % hold-out of them): the best tap, then the best tap
of the best two and three layers (`featx.sweep.combo_sets`). Each variant is then fitted
with `featx fit`'s protocol on all 60,000 training images and scored on the 10,000 test
images. The extraction cost is the forward time per image to the variant's deepest layer
(`featx.sweep.forward_seconds`: a batch of 32 random 96 px images, the fastest of 3), plain
or flip, measured in this run.

    python scripts/bench_tricks.py [--no-mlp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, fashion_features, machine, update_section  # noqa: E402

LAYERS = tuple(f"features.{i}" for i in range(11, 17))


def files(out: Path) -> dict[str, tuple[Path, Path]]:
    found = {}
    for tta, suffix in (("none", "_multi"), ("flip", "_multi_flip")):
        train, test = out / f"fm_train{suffix}.h5", out / f"fm_test{suffix}.h5"
        if not (train.exists() and test.exists()):
            t = time.perf_counter()
            train, test = fashion_features(out, layers=LAYERS, pools=("avg", "grid2"), extra=("--tta", tta),
                                           suffix=suffix)
            print(f"{tta}: extracted in {time.perf_counter() - t:.0f} s", flush=True)
        found[tta] = (train, test)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-mlp", action="store_true", help="leave out the MLP (minutes per variant)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    paths = files(ROOT / "cache" / "probes")
    from featx import sweep as sw
    from featx.extractor import ExtractConfig
    from featx.fit import fit_store
    from featx.metrics import evaluate
    from featx.store import FeatureStore, tap_label

    t0 = time.perf_counter()
    with FeatureStore(paths["none"][0]) as tr:
        sub = sw.per_class_subset(tr.labels, 1000)
        rows = sw.probe(tr, None, rows=sub)
        sets = sw.combo_sets(rows)
        combos = sw.combine(tr, None, rows, sets, sub)
    choose_s = time.perf_counter() - t0
    best = max(rows, key=lambda r: (r.val_accuracy, -r.depth))
    top = max(combos, key=lambda c: c.val_accuracy)
    print(f"best tap {best.tap} ({best.val_accuracy:.4f}); " +
          "; ".join(f"{c.taps} {c.val_accuracy:.4f}" for c in combos) + f" ({choose_s:.0f} s)", flush=True)
    layer = {r.tap: r.layer for r in rows}
    depth = {r.tap: r.depth for r in rows}
    cfg = ExtractConfig(backbone="mobilenet_v2", weights="IMAGENET1K_V1", image_size=96, batch_size=32)
    from dataclasses import replace

    speed = {tta: sw.forward_seconds(replace(cfg, tta=tta), list(LAYERS)) for tta in ("none", "flip")}

    variants = []
    for taps in [(best.tap,)] + sets:
        for tta in ("none", "flip"):
            variants.append((taps, tta))
    table = []
    for taps, tta in variants:
        tap = taps[0] if len(taps) == 1 else taps
        deepest = layer[max(taps, key=depth.__getitem__)]
        ms = 1000 * speed[tta][deepest]
        clfs = ["knn", "logreg"] + (["mlp"] if not a.no_mlp and tta == "none" and
                                    (len(taps) == 1 or "+".join(taps) == top.taps) else [])
        results = {}
        with FeatureStore(paths[tta][0]) as fs, FeatureStore(paths[tta][1]) as ft:
            Xt, yt = ft.features(tap), ft.labels
            dim = fs.dim(tap)
            for clf in clfs:
                t = time.perf_counter()
                r = fit_store(fs, tap, clf)
                fit = time.perf_counter() - t
                acc = evaluate(r.pipeline, Xt, yt)["accuracy"]
                results[clf] = (acc, fit)
                print(f"{tap_label(tap)} {tta} {clf}: test {acc:.4f}, fit {fit:.1f} s {r.params}", flush=True)
        table.append((taps, tta, dim, ms, results))
    if a.no_write:
        return

    def cell(results, clf):
        return f"{results[clf][0]:.4f} ({results[clf][1]:.0f} s)" if clf in results else "—"

    lines = []
    base = table[0][4]["logreg"][0]
    for taps, tta, dim, ms, results in table:
        name = " + ".join(f"`{t}`" for t in taps) + (" + flip" if tta == "flip" else "")
        lines.append(f"| {name} | {dim} | {ms:.2f} ms | {cell(results, 'knn')} | {cell(results, 'logreg')} | "
                     f"{cell(results, 'mlp')} | {results['logreg'][0] - base:+.4f} |")
    best_acc = max(max(v[0] for v in r[4].values()) for r in table)
    update_section("bench_tricks", f"""
## Combined taps, flip averaging, kNN: one table (scripts/bench_tricks.py)

Machine: {machine()}. Fashion-MNIST, mobilenet_v2 (ImageNet weights) at 96 px, blocks
features.11-16 pooled avg and grid2, plain and `--tta flip`. Chosen by the sweep's rules on
its subsample (8,000 rows, 20 % held out; {choose_s:.0f} s): best tap `{best.tap}`
({best.val_accuracy:.4f}), then {"; ".join(f"`{c.taps}` ({c.val_accuracy:.4f})" for c in combos)}.
Each cell: test accuracy on the 10,000 test images after `featx fit`'s protocol on all
60,000 training images (default grid, 20 % hold-out, refit), and the fit's time. Forward
time: per image to the deepest layer used (`featx.sweep.forward_seconds`, batch 32, fastest
of 3); flip averaging sends twice the images. MLP only where the sweep would suggest it
(best tap, best combination, no flip). One run.

| features | dims | forward / image | knn | logreg | mlp | logreg vs the best tap |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

Best test accuracy of any row: {best_acc:.4f}.
""")


if __name__ == "__main__":
    main()
