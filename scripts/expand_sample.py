"""Write featx's embedded Fashion-MNIST sample as PNG image folders (train/ and test/, one
subfolder per class), the layout `featx extract DATA --split train` reads.

    python scripts/expand_sample.py cache/demo/fashion
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parent.parent / "featx" / "data" / "fashion_mnist_sample.npz"


def expand(out: Path) -> None:
    z = np.load(SAMPLE)
    classes = [c.replace("/", "-") for c in z["classes"]]
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(z[f"{split}_images"], z[f"{split}_labels"])):
            d = out / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{i:05d}.png"
            if not p.exists():
                Image.fromarray(img).save(p)
    print(f"{out}: {len(z['train_images'])} train and {len(z['test_images'])} test images, {len(classes)} classes")


if __name__ == "__main__":
    expand(Path(sys.argv[1] if len(sys.argv) > 1 else "cache/demo/fashion"))
