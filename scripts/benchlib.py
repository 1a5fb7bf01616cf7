"""Helpers shared by the benchmark scripts (never imported by featx/)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}"


def update_section(name: str, markdown: str) -> None:
    """Replace the text between <!-- name --> and <!-- /name --> in BENCHMARKS.md."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
    print(f"updated section {name} of {BENCHMARKS}")


def fashion_features(out_dir: Path, layers=(), pools=("avg",), image_size: int = 96, extra=(),
                     suffix: str = "") -> tuple[Path, Path]:
    """Extract mobilenet_v2 (ImageNet) features of Fashion-MNIST train/test with featx
    (``extra``: more options of `featx extract`; files fm_{split}{suffix}.h5)."""
    featx = [str(ROOT / ".venv" / "bin" / "featx")] if (ROOT / ".venv" / "bin" / "featx").exists() else ["featx"]
    subprocess.run(["python3", str(ROOT / "scripts" / "prepare_fashion_mnist.py"), "--root", str(ROOT / "data")],
                   check=True)
    paths = []
    for split in ("train", "test"):
        out = out_dir / f"fm_{split}{suffix}.h5"
        cmd = featx + ["extract", "torchvision:FashionMNIST", "--root", str(ROOT / "data"), "--split", split,
                       "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--image-size", str(image_size),
                       "--out", str(out)]
        for layer in layers:
            cmd += ["--layer", layer]
        for p in pools:
            cmd += ["--pool", p]
        subprocess.run(cmd + list(extra), check=True)
        paths.append(out)
    return paths[0], paths[1]
