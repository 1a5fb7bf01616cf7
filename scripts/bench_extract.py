"""Benchmark `featx extract`: against the forward pass alone, against the tutorial loop, and
`--compile auto` against `--compile off` over job sizes, cold and warm.

Every figure is the median of ``--repeats`` runs, each in a fresh process (so no run
inherits another's compiled code, allocator or caches), on the same JPEG files (640x480
photos made from scikit-learn's two sample photographs, randomly cropped, flipped and
re-encoded), 224 px input, random weights (speed does not depend on the values), no
vectors from the feature cache:

* eager bare    -- PyTorch's eager forward pass alone on decoded tensors (featx's batch
                   size and channels-last layout), 512 images (or all when fewer);
* compiled bare -- the same through featx's compiled tap-cut graph, compiled before the
                   clock starts (the compile is timed on its own, from an empty inductor cache);
* featx         -- `featx extract` as a command, end to end (Python and torch start-up,
                   model, compile, decoding in workers, shards, the HDF5 file);
* naive         -- what the tutorials write: ImageFolder + weights.transforms(), a DataLoader
                   without workers, float32, torch.no_grad, default layout;
* job sizes     -- mobilenet_v2, 300 / 1,200 / 5,000 images: `--compile off`, `--compile auto`
                   with an empty inductor cache (a first run) and with the graph compiled
                   before (a later run);
* decoding      -- decode + resize + centre crop to 224 px by each method, one process with
                   one thread (as a DataLoader worker), on 640x480 and on camera-size photos;
* cores         -- `featx extract` (mobilenet_v2, graph compiled before) by the split of the
                   cores between torch threads (the forward pass) and decoding workers.

    python scripts/bench_extract.py [--repeats 3] [--n 2000] [--n-resnet 1000] [--parts ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, machine, update_section  # noqa: E402

FEATX = [str(ROOT / ".venv" / "bin" / "featx")] if (ROOT / ".venv" / "bin" / "featx").exists() else ["featx"]


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
        folder = root / ("china" if i % 2 == 0 else "flower")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def listing(data: Path, n: int, path: Path) -> Path:
    """A CSV list of the first ``n`` photos (a job of that size)."""
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))[:n]
    path.write_text("\n".join(f"{data / f},{f.split('/')[0]}" for f in files) + "\n")
    return path


BARE = """
import json, sys, time, torch
from featx.decode import Decoded
from featx.extractor import ExtractConfig, FeatureExtractor
from featx.sources import folder_source
backbone, data, freeze, inductor = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
src = folder_source(data)
ex = FeatureExtractor(ExtractConfig(backbone=backbone, weights="none", compile="off", cache=None))
ds = Decoded(src, ex.pre)
x = torch.stack([ds[i][0] for i in range(min(512, len(ds)))])
b = ex.config.batch_size
def rate(fn):
    fn(x[:b])  # warm-up
    t = time.perf_counter()
    for s in range(0, len(x), b):
        fn(x[s:s + b])
    return len(x) / (time.perf_counter() - t)
eager = rate(ex)
from featx.graph import compile_taps
from pathlib import Path
t = time.perf_counter()
example = ex.normalize(torch.zeros(1, 3, ex.pre.crop, ex.pre.crop, dtype=torch.uint8))
with torch.inference_mode():
    ex.compiled = compile_taps(ex.model, ex.taps, ex.layout, b, example, freeze=freeze, cache_dir=Path(inductor))
compile_s = time.perf_counter() - t
print(json.dumps({"eager": eager, "compiled": rate(ex), "compile_s": compile_s}))
"""

NAIVE = """
import json, sys, time, torch, torchvision
backbone, data = sys.argv[1], sys.argv[2]
weights = torchvision.models.get_model_weights(backbone).DEFAULT
model = torchvision.models.get_model(backbone, weights=None).eval()
loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(data, transform=weights.transforms()),
                                     batch_size=32)
n, t = 0, time.perf_counter()
with torch.no_grad():
    for x, _ in loader:
        model(x)
        n += len(x)
print(json.dumps({"naive": n / (time.perf_counter() - t)}))
"""


def child(code: str, *args) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def command(args: list, cache: Path, env: dict | None = None) -> tuple[float, str]:
    """`featx extract ...` in a fresh process with the feature cache (and inductor's) in
    ``cache`` (and ``env`` added): its wall time and its summary line."""
    env = {**os.environ, "TQDM_DISABLE": "1", "FEATX_CACHE": str(cache), **(env or {})}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    t = time.perf_counter()
    p = subprocess.run(FEATX + ["extract", *map(str, args)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return wall, p.stdout.strip().splitlines()[-1]


def median(xs):
    return statistics.median(xs)


def bench_backbone(backbone: str, data: Path, n: int, tmp: Path, repeats: int) -> dict:
    from featx import adapters
    from featx.graph import should_freeze

    freeze = should_freeze(adapters.backbone(backbone).gflop(224), n)
    bare = [child(BARE, backbone, data, int(freeze), tmp / f"inductor-{backbone}-{k}") for k in range(repeats)]
    res = {"eager": median([b["eager"] for b in bare]), "compiled": median([b["compiled"] for b in bare]),
           "compile_s": median([b["compile_s"] for b in bare]), "frozen": freeze}
    warm = tmp / f"warm-{backbone}"  # a cache whose inductor part holds the job's graph, copied for each run
    command([data, "--backbone", backbone, "--weights", "none", "--compile", "on", "--out", tmp / "prime.h5",
             "--overwrite"], warm)
    for mode in ("auto", "off"):
        walls = []
        for k in range(repeats):
            cache = tmp / f"c-{backbone}-{mode}-{k}"
            shutil.copytree(warm / "inductor", cache / "inductor")  # a later run: the graph compiled before
            walls.append(command([data, "--backbone", backbone, "--weights", "none", "--compile", mode,
                                  "--out", tmp / "o.h5", "--overwrite"], cache)[0])
        res[f"featx_{mode}"] = n / median(walls)
    res["naive"] = median([child(NAIVE, backbone, data)["naive"] for _ in range(repeats)])
    return res


def job_sizes(data: Path, tmp: Path, repeats: int, sizes=(300, 1200, 5000)) -> list[dict]:
    warm = tmp / "warm-sizes"
    command([listing(data, 64, tmp / "prime.csv"), "--backbone", "mobilenet_v2", "--weights", "none",
             "--compile", "on", "--out", tmp / "prime.h5", "--overwrite"], warm)
    rows = []
    for n in sizes:
        job = listing(data, n, tmp / f"job{n}.csv")
        row = {"n": n}
        for how in ("off", "auto cold", "auto warm"):
            walls, compiled = [], []
            for k in range(repeats):
                cache = tmp / f"s-{n}-{how.replace(' ', '-')}-{k}"
                if how == "auto warm":
                    shutil.copytree(warm / "inductor", cache / "inductor")
                wall, summary = command([job, "--backbone", "mobilenet_v2", "--weights", "none", "--compile",
                                         how.split()[0], "--out", tmp / "o.h5", "--overwrite"], cache)
                walls.append(wall)
                compiled.append("compiled" in summary)
            row[how] = median(walls)
            row[how + " compiled"] = sum(compiled)
        rows.append(row)
        print(row, flush=True)
    return rows


DECODING = """
import json, sys, time, torch
from pathlib import Path
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF
from featx.decode import Decoded
from featx.preprocess import Preprocess
from featx.sources import folder_source
torch.set_num_threads(1)  # as in a DataLoader worker
data = Path(sys.argv[1])
src = folder_source(data)
files = [data / i for i in src.ids]
def pillow(f, tensor_resize):
    img = Image.open(f)
    img.draft("RGB", (256, 256))
    img = img.convert("RGB")
    if tensor_resize:
        return TF.center_crop(TF.resize(TF.pil_to_tensor(img), 256, antialias=True), 224)
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, 256, antialias=True), 224))
featx = Decoded(src, Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3))
methods = {
    "Pillow decode (draft), Pillow resize": lambda i: pillow(files[i], False),
    "Pillow decode (draft), resize on uint8 tensors": lambda i: pillow(files[i], True),
    "torchvision decode_jpeg, resize on uint8 tensors": lambda i: TF.center_crop(TF.resize(
        decode_jpeg(read_file(str(files[i])), mode=ImageReadMode.RGB), 256, antialias=True), 224),
    "featx (decode.Decoded)": featx.__getitem__,
}
out = {}
for name, fn in methods.items():
    fn(0)  # warm-up
    t = time.perf_counter()
    for i in range(len(files)):
        fn(i)
    out[name] = len(files) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def decoding(photos: Path, tmp: Path, repeats: int) -> dict:
    """Images/s of each decoding method on 300 of the 640x480 photos and on 60 camera-size
    (2400x1800) ones."""
    small = tmp / "decode-small"
    for f in sorted(photos.rglob("*.jpg"))[:300]:
        (small / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, small / f.parent.name / f.name)
    big = make_jpegs(tmp / "decode-big", 60, size=(2400, 1800))
    out = {}
    for label, data in (("640x480", small), ("2400x1800", big)):
        runs = [child(DECODING, data) for _ in range(repeats)]
        out[label] = {method: median([r[method] for r in runs]) for method in runs[0]}
    return out


def cores(data: Path, n: int, tmp: Path, repeats: int) -> list[dict]:
    """`featx extract` of ``n`` photos (mobilenet_v2, graph compiled before) by torch threads
    x decoding workers."""
    job = listing(data, n, tmp / f"cores{n}.csv")
    warm = tmp / "warm-cores"
    command([listing(data, 64, tmp / "prime.csv"), "--backbone", "mobilenet_v2", "--weights", "none",
             "--compile", "on", "--out", tmp / "prime.h5", "--overwrite"], warm)
    total = os.cpu_count() or 2
    rows = []
    for threads, workers in sorted({(total, total // 2 or 1), (total, total), (total // 2 or 1, total // 2 or 1),
                                    (total // 2 or 1, total)}, reverse=True):
        walls = []
        for k in range(repeats):
            cache = tmp / f"cores-{threads}-{workers}-{k}"
            shutil.copytree(warm / "inductor", cache / "inductor")
            walls.append(command([job, "--backbone", "mobilenet_v2", "--weights", "none", "--compile", "on",
                                  "--workers", workers, "--out", tmp / "o.h5", "--overwrite"], cache,
                                 {"OMP_NUM_THREADS": str(threads)})[0])
        rows.append({"threads": threads, "workers": workers, "n": n, "seconds": median(walls)})
        print(rows[-1], flush=True)
    return rows


RESULTS = ROOT / "cache" / "bench_extract.json"  # each part's last figures, for a run of the other parts
PARTS = ("backbones", "sizes", "decoding", "cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="photos for mobilenet_v2")
    ap.add_argument("--n-resnet", type=int, default=1000, help="photos for resnet50")
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1200, 5000])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="what to measure; the other part's figures come from its last run (%(prog)s keeps "
                         "them in cache/bench_extract.json)")
    a = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        tmp = Path(tmp)
        needed = {"backbones": [a.n, a.n_resnet], "sizes": a.sizes, "decoding": [300], "cores": [a.n]}
        photos = make_jpegs(tmp / "photos", max(n for part in a.parts for n in needed[part]))
        if "backbones" in a.parts:
            t0, rows = time.perf_counter(), []
            for backbone, n in (("mobilenet_v2", a.n), ("resnet50", a.n_resnet)):
                data = tmp / f"data-{backbone}"
                for f in sorted(photos.rglob("*.jpg"))[:n]:
                    (data / f.parent.name).mkdir(parents=True, exist_ok=True)
                    os.link(f, data / f.parent.name / f.name)
                r = bench_backbone(backbone, data, n, tmp, a.repeats)
                print(backbone, {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
                rows.append((backbone, n, r))
            results["backbones"] = {"rows": rows, "repeats": a.repeats, "seconds": time.perf_counter() - t0}
        if "sizes" in a.parts:
            t0 = time.perf_counter()
            rows = job_sizes(photos, tmp, a.repeats, tuple(a.sizes))
            results["sizes"] = {"rows": rows, "repeats": a.repeats, "seconds": time.perf_counter() - t0}
        if "decoding" in a.parts:
            t0 = time.perf_counter()
            rows = decoding(photos, tmp, a.repeats)
            print(rows, flush=True)
            results["decoding"] = {"rows": rows, "repeats": a.repeats, "seconds": time.perf_counter() - t0}
        if "cores" in a.parts:
            t0 = time.perf_counter()
            rows = cores(photos, a.n, tmp, a.repeats)
            results["cores"] = {"rows": rows, "repeats": a.repeats, "seconds": time.perf_counter() - t0}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    missing = [part for part in PARTS if part not in results]
    if missing:
        print(f"{RESULTS} lacks {', '.join(missing)}; measure it (--parts) to write BENCHMARKS.md")
    else:
        render(results)


def took(part: dict) -> str:
    runs = "one run" if part["repeats"] == 1 else f"median of {part['repeats']} runs, each in a fresh process"
    return f"{runs}; this part took {part['seconds'] / 60:.0f} min" if part.get("seconds") else runs


def render(results: dict) -> None:
    """Write the BENCHMARKS.md section from the measured figures only."""
    backbones, sizes_part = results["backbones"], results["sizes"]
    rows, sizes, repeats = backbones["rows"], sizes_part["rows"], sizes_part["repeats"]
    lines = ["| backbone | photos | eager bare | compiled bare | first compile | featx `--compile auto` | "
             "featx `--compile off` | naive loop | auto / eager bare | auto / off | auto / naive |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bk, n, r in rows:
        frozen = " (frozen)" if r["frozen"] else ""
        lines.append(f"| {bk} | {n:,} | {r['eager']:.1f} | {r['compiled']:.1f}{frozen} | {r['compile_s']:.0f} s | "
                     f"{r['featx_auto']:.1f} | {r['featx_off']:.1f} | {r['naive']:.1f} | "
                     f"{r['featx_auto'] / r['eager']:.2f} | {r['featx_auto'] / r['featx_off']:.2f} | "
                     f"{r['featx_auto'] / r['naive']:.2f} |")
    size_lines = ["| photos | `--compile off` | `auto`, first run | / off | compiled | `auto`, later run | / off | "
                  "compiled |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        size_lines.append(
            f"| {s['n']:,} | {s['off']:.1f} s | {s['auto cold']:.1f} s | {s['auto cold'] / s['off']:.2f} | "
            f"{s['auto cold compiled']} of {repeats} | {s['auto warm']:.1f} s | {s['auto warm'] / s['off']:.2f} | "
            f"{s['auto warm compiled']} of {repeats} |")
    worst = max(max(s["auto cold"], s["auto warm"]) / s["off"] for s in sizes)
    dec = results["decoding"]["rows"]
    base = {label: dec[label]["Pillow decode (draft), Pillow resize"] for label in dec}
    dec_lines = ["| method | 640x480 | / Pillow | 2400x1800 | / Pillow |", "|---|---:|---:|---:|---:|"]
    for method in dec["640x480"]:
        small, big = dec["640x480"][method], dec["2400x1800"][method]
        dec_lines.append(f"| {method} | {small:.0f} | {small / base['640x480']:.2f} | {big:.0f} | "
                         f"{big / base['2400x1800']:.2f} |")
    core_rows = results["cores"]["rows"]
    core_lines = ["| torch threads | decoding workers | seconds | images/s |", "|---:|---:|---:|---:|"]
    core_lines += [f"| {r['threads']} | {r['workers']} | {r['seconds']:.1f} | {r['n'] / r['seconds']:.1f} |"
                   for r in core_rows]
    update_section("bench_extract", f"""
## `featx extract` throughput (scripts/bench_extract.py)

JPEG photos of 640x480, 224 px input, random weights, no vectors from the feature cache.
Machine: {machine()}.

Images/s ({took(backbones)}):

{chr(10).join(lines)}

*eager bare*, *compiled bare*: the forward pass alone on 512 decoded tensors (all of them when fewer), eager and
through featx's compiled tap-cut graph (frozen where featx freezes a job of that size);
*first compile*: compiling that graph with an empty inductor cache. *featx*: `featx extract
DIR --backbone B --weights none --compile MODE` as a command, Python and torch start-up
included, with the graph compiled before (inductor's cache and featx's record of it copied
in: a later run). *naive*: ImageFolder + `weights.transforms()`, a DataLoader without
workers, float32, `torch.no_grad`, default layout.

`--compile auto` over job sizes (mobilenet_v2, whole command, seconds; "compiled": in how
many of the runs auto chose to compile). A first run has an empty inductor cache; a later
run finds the graph compiled before (by a run of 64 other photos); {took(sizes_part)}:

{chr(10).join(size_lines)}

The slowest `auto` median against `off`'s here: {worst:.2f}x (the goal: at most 1.05x at any size).

Decoding + resizing + centre crop to 224 px, one process with one thread (as in a
DataLoader worker), images/s, on 300 of the 640x480 photos and on 60 camera-size photos
(2400x1800); {took(results["decoding"])}. featx (`decode.Decoded`) decodes ordinary JPEGs
with torchvision's libjpeg-turbo and resizes uint8 tensors, and decodes large JPEGs at
reduced scale with Pillow:

{chr(10).join(dec_lines)}

`featx extract` of {core_rows[0]['n']:,} photos, mobilenet_v2, the graph compiled before, whole command, by the
split of the cores between the forward pass (torch threads, `OMP_NUM_THREADS`) and decoding
(`--workers`); featx's default: a thread and a worker per core; {took(results["cores"])}:

{chr(10).join(core_lines)}
""")


if __name__ == "__main__":
    main()
