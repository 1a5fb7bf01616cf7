"""Benchmark `featx export`: time and peak memory of exporting a large feature file, and the
size on disk of the formats.

A feature file of ``--rows`` x ``--dim`` random float16 features (the size of
bench_distributed's assembly file: 1,000,000 x 512) is written with featx's own writer, then
each export runs as a command in a fresh process; its peak RSS is the child's ``ru_maxrss``.

    python scripts/bench_export.py [--rows 1000000] [--dim 512] [--to parquet npz]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, update_section  # noqa: E402


def make_file(path: Path, rows: int, dim: int, dtype: str) -> Path:
    """A complete featx file of random features, written through StoreWriter in units."""
    from featx.store import StoreWriter

    unit = 65536
    w = StoreWriter(path, {"backbone": "bench", "fingerprint": "{}"}, rows, {"features": {"dim": dim}},
                    unit_items=unit, dtype=dtype).prepare(overwrite=True)
    rng = np.random.default_rng(0)
    for s in range(0, rows, unit):
        e = min(rows, s + unit)
        x = rng.standard_normal((e - s, dim), dtype=np.float32).astype(dtype)
        w.add(s, e, {"features": x}, (np.arange(s, e) % 10).astype(np.int64), [f"img/{i:07d}.jpg" for i in range(s, e)],
              [], [])
    return w.finalize([f"c{k}" for k in range(10)], "features")


CHILD = """
import resource, sys
from featx.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def export(path: Path, to: str, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of `featx export` in a fresh process."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, "export", str(path), "--to", to, "--out", str(out)], check=True,
                       capture_output=True, text=True)
    return time.perf_counter() - t, int(p.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--to", nargs="+", default=["parquet", "npz"])
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src = make_file(tmp / "f.h5", a.rows, a.dim, "float16")
        print(f"made {src} ({src.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
        for to in a.to:
            out = tmp / f"out.{to}"
            wall, rss = export(src, to, out)
            size = out.stat().st_size / 1e6
            print(f"{to}: {wall:.1f} s, peak RSS {rss:.0f} MB, {size:.0f} MB", flush=True)
            lines.append(f"| {to} | {wall:.1f} s | {a.rows / wall:,.0f} | {rss:.0f} MB | {size:,.0f} MB |")
            out.unlink()
        h5 = src.stat().st_size / 1e6
    if not a.no_write:
        update_section("bench_export", f"""
Machine: {machine()}.  `python scripts/bench_export.py --rows {a.rows} --dim {a.dim}`: a featx file of
{a.rows:,} x {a.dim} random float16 features ({h5:,.0f} MB), each export a `featx export` command in a fresh
process (peak RSS: its maximum resident set, Python, numpy, h5py and pyarrow included).

| --to | time | rows/s | peak RSS | size on disk |
|---|---:|---:|---:|---:|
{chr(10).join(lines)}
""")


if __name__ == "__main__":
    main()
