"""Put Fashion-MNIST where torchvision looks for it, and (re)make featx's embedded sample.

Debian's package ``dataset-fashion-mnist`` installs the four IDX files in
/usr/share/datasets/fashion-mnist/.  torchvision's FashionMNIST reads the uncompressed
files from ``<root>/FashionMNIST/raw/``; this script decompresses them there, so that
``featx extract torchvision:FashionMNIST --root data`` works offline.

    python scripts/prepare_fashion_mnist.py --root data
    python scripts/prepare_fashion_mnist.py --sample featx/data/fashion_mnist_sample.npz

The sample (stratified: 200 train + 100 test images per class, fixed seed) is what the
README's demo runs on.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def install(root: Path, src: Path = DEBIAN) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        gz = src / f"{name}.gz"
        if not gz.exists():
            raise SystemExit(f"{gz} is missing: apt-get install -y dataset-fashion-mnist")
        if not (raw / name).exists():
            with gzip.open(gz) as fin, open(raw / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return raw


def make_sample(raw: Path, out: Path, train_per_class: int = 200, test_per_class: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    parts = {}
    for split, prefix, k in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        x = read_idx(raw / f"{prefix}-images-idx3-ubyte")
        y = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in range(10)])
        idx.sort()
        parts[f"{split}_images"], parts[f"{split}_labels"] = x[idx], y[idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, classes=np.asarray(CLASSES), **parts)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data", help="torchvision data root")
    ap.add_argument("--sample", default=None, help="also write the demo sample to this .npz")
    a = ap.parse_args()
    raw = install(Path(a.root))
    print(f"Fashion-MNIST ready under {raw}")
    if a.sample:
        make_sample(raw, Path(a.sample))


if __name__ == "__main__":
    main()
