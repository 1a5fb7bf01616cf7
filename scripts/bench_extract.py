"""Benchmark `featx extract` against its limit and against the tutorial loop.

On the same JPEG files (640x480 photos made from scikit-learn's two sample photographs,
randomly cropped, flipped and re-encoded), for each backbone at 224 px, in one run:

* featx   -- `featx.extract.extract` end to end (decode in workers, batches, store);
* bare    -- the forward pass alone on already decoded and normalised tensors (the limit),
             with featx's batch size and memory layout;
* naive   -- what the tutorials write: ImageFolder + weights.transforms(), a DataLoader
             without workers, float32, torch.no_grad (no inference_mode), default layout;
* decode  -- decoding + resizing alone (one process), with and without JPEG draft mode.

Backbones use random weights (speed does not depend on the values).

    python scripts/bench_extract.py [--n 256] [--backbones resnet50 mobilenet_v2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (640, 480), start: int = 0, seed: int = 0) -> Path:
    """``n`` JPEG photos of ``size`` (width, height): random crops of scikit-learn's two sample
    photographs, half of them flipped, in two class folders; numbered from ``start``."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng([seed, start])
    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]  # 427 x 640
    for i in range(start, start + n):
        a = photos[i % 2]
        h = int(rng.integers(240, 400))  # crop height; the width follows the target's aspect ratio
        w = min(600, round(h * size[0] / size[1]))
        y, x = rng.integers(0, 427 - h), rng.integers(0, 640 - w)
        img = Image.fromarray(a[y:y + h, x:x + w]).resize(size)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def rate(n: int, seconds: float) -> float:
    return n / seconds


def bench(backbone: str, data: Path, out_dir: Path, n: int) -> dict:
    import torch
    import torchvision

    from featx.decode import Decoded
    from featx.extract import ExtractConfig, FeatureExtractor, extract
    from featx.sources import folder_source

    res = {}
    src = folder_source(data)
    cfg = ExtractConfig(backbone=backbone, weights="none")
    ex = FeatureExtractor(cfg)

    # decode + resize alone, one process
    for draft in (False, True):
        pre = type(ex.pre)(**{**ex.pre.__dict__, "jpeg_draft": draft})
        ds = Decoded(src, pre)
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        res[f"decode_draft={draft}"] = rate(len(ds), time.perf_counter() - t)

    # bare forward on decoded tensors, featx's batch size and layout; measured before and
    # after featx's run and averaged, because this machine's speed drifts
    ds = Decoded(src, ex.pre)
    x_all = torch.stack([ds[i][0] for i in range(len(ds))])
    b = ex.config.batch_size
    ex(x_all[:b])  # warm-up

    def bare() -> float:
        t = time.perf_counter()
        for s in range(0, len(x_all), b):
            ex(x_all[s:s + b])
        return time.perf_counter() - t

    bare_s = bare()
    # featx end to end (model load included)
    t = time.perf_counter()
    extract(src, out_dir / f"{backbone}.h5", ExtractConfig(backbone=backbone, weights="none"), overwrite=True)
    res["featx"] = rate(n, time.perf_counter() - t)
    res["bare"] = rate(len(x_all), (bare_s + bare()) / 2)

    # the tutorial loop
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    model = torchvision.models.get_model(backbone, weights=None).eval()
    loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(data), transform=weights.transforms()), batch_size=b)
    feats = []
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x))
    res["naive"] = rate(n, time.perf_counter() - t)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v2"])
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_jpegs(Path(tmp) / "jpegs", a.n)
        for bk in a.backbones:
            r = bench(bk, data, Path(tmp), a.n)
            print(bk, {k: round(v, 1) for k, v in r.items()}, flush=True)
            rows.append((bk, r))
    lines = ["| backbone | featx end to end | bare forward (limit) | featx / bare | naive loop | featx / naive "
             "| decode+resize (full decode) | decode+resize (draft) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for bk, r in rows:
        lines.append(f"| {bk} | {r['featx']:.1f} | {r['bare']:.1f} | {r['featx'] / r['bare']:.2f} | {r['naive']:.1f} "
                     f"| {r['featx'] / r['naive']:.2f} | {r['decode_draft=False']:.0f} | {r['decode_draft=True']:.0f} |")
    ceilings = ", ".join(f"{1 / (1 + r['bare'] / r['decode_draft=True']):.2f} ({bk})" for bk, r in rows)
    measured = ", ".join(f"{r['featx'] / r['bare']:.2f}" for _, r in rows)
    update_section("bench_extract", f"""
## `featx extract` throughput (scripts/bench_extract.py)

{a.n} JPEG photos of 640x480, 224 px input, random weights, images/s, one run. Machine: {machine()}.

{chr(10).join(lines)}

*featx*: `extract()` end to end, model loading and the HDF5 file included. *bare*: the
forward pass alone on decoded tensors (featx's batch size and channels-last layout), the
mean of one pass before and one after featx's run (this machine's speed drifts by ~10 %).
*naive*: ImageFolder + `weights.transforms()`, DataLoader without workers, float32,
`torch.no_grad`, default layout. *decode+resize*: one process, decoding and resizing only;
*draft* lets libjpeg decode at 1/2 scale when that still covers the 256 px resize.

How the time splits: per image, the forward pass costs 1 / bare and decoding + resizing
1 / decode. Done in line (as the naive loop does, with full decoding) decoding adds its
whole cost to every batch; featx halves it with draft mode and moves it into DataLoader
workers. On this 2-core machine the forward pass already keeps both cores busy, so the
workers' decoding cannot hide behind it for free: the ceiling is about
1 / (1 + bare / decode(draft)), {ceilings} here, against featx / bare of {measured} measured.
A machine with spare cores (or a GPU doing the forward pass) lifts that ceiling towards 1.
""")


if __name__ == "__main__":
    main()
