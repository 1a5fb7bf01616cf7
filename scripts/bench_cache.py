"""The feature cache: what a rerun costs once the cache is warm.

A generated folder of 10,000 JPEG photos (256x256 crops of scikit-learn's two sample
photographs, half of them flipped; scripts/bench_extract.py's make_jpegs), mobilenet_v2 at 224 px (random weights: speed does not
depend on the values), `featx extract` defaults, a fresh cache folder. In one run:

1. a full run (cold cache);
2. 1 % new images added, a rerun into a new file (hashing every image included);
3. an unchanged folder, a rerun into a new file;
4. cache lookups per second (10,000 keys at once, one tap) and hashing speed.

Each extraction is timed twice: the `extract()` call, and the whole command in a fresh
process (`featx extract ...`, Python and torch start-up included).

    python scripts/bench_cache.py [--n 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_jpegs  # noqa: E402
from benchlib import ROOT, machine, update_section  # noqa: E402

RUN = """
import json, sys, time
t0 = time.perf_counter()
from featx.extract import ExtractConfig, extract
from featx.sources import folder_source
t1 = time.perf_counter()
r = extract(folder_source(sys.argv[1]), sys.argv[2], ExtractConfig(backbone="mobilenet_v2", weights="none"))
print(json.dumps({"extract_s": time.perf_counter() - t1, "import_s": t1 - t0, "hits": r.cache_hits, "rows": r.n_rows}))
"""


def timed(data: Path, out: Path, cache: Path) -> dict:
    env = {**os.environ, "FEATX_CACHE": str(cache), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUN, str(data), str(out)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr)
    import json

    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    print(f"{out.name}: {r}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featx-bench-cache-", dir=ROOT / "cache"))
    try:
        data, cache = work / "photos", work / "features-cache"
        t = time.perf_counter()
        make_jpegs(data, a.n, size=(256, 256))
        print(f"made {a.n} photos in {time.perf_counter() - t:.0f} s", flush=True)
        full = timed(data, work / "full.h5", cache)
        new = a.n // 100
        make_jpegs(data, new, size=(256, 256), start=a.n)
        grown = timed(data, work / "grown.h5", cache)
        same = timed(data, work / "same.h5", cache)

        from featx.cache import FeatureCache
        from featx.sources import folder_source

        src = folder_source(data)
        t = time.perf_counter()
        keys = [src.content_key(i) for i in range(len(src))]
        hash_s = time.perf_counter() - t
        c = FeatureCache(cache)
        setting = c.info()["settings"][0]["setting"]
        t = time.perf_counter()
        found = c.get(keys, setting)
        lookup_s = time.perf_counter() - t
        size = c.size()
        c.close()
        assert len(found) == len(set(keys))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def pct(r, key):
        return 100 * r[key] / full[key]

    startup, startup_max = sorted(r["wall_s"] - r["extract_s"] for r in (grown, same))

    update_section("bench_cache", f"""
## The feature cache: reruns (scripts/bench_cache.py)

{a.n:,} JPEG photos of 256x256 (generated), mobilenet_v2 at 224 px with random weights, `featx
extract` defaults, a fresh cache. Machine: {machine()}. One run. "extract()" is the library
call; "command" is the whole process (Python and torch start-up included).

A few generated photos repeat another exactly ({full['hits']} here): the cache answers them
within the first run already, as it should.

| run | rows from the cache | extract() | % of full | command | % of full |
|---|---:|---:|---:|---:|---:|
| full run, cold cache | {full['hits']:,} of {full['rows']:,} | {full['extract_s']:.1f} s | 100 | {full['wall_s']:.1f} s | 100 |
| {new} new images added (1 %) | {grown['hits']:,} of {grown['rows']:,} | {grown['extract_s']:.1f} s | {pct(grown, 'extract_s'):.1f} | {grown['wall_s']:.1f} s | {pct(grown, 'wall_s'):.1f} |
| unchanged folder | {same['hits']:,} of {same['rows']:,} | {same['extract_s']:.1f} s | {pct(same, 'extract_s'):.1f} | {same['wall_s']:.1f} s | {pct(same, 'wall_s'):.1f} |

Targets: a rerun after adding 1 % new images at most 5 % of the full run, an unchanged rerun
at most 3 %, hashing included. Of a rerun's time, {startup:.0f}-{startup_max:.0f} s is starting Python and
importing torch ("command" minus "extract()"); the rest is building the model, hashing every
file, the lookups, computing the new images (the misses of all work units together, in full
batches), writing the shards and assembling the file in a child process. The full run compiles the network
(`--compile auto`: 10,000 images to compute), which halved it against the eager runs of
earlier versions; the reruns have too few images to compute to compile, so their fixed
costs now weigh twice as much in the ratios. Cache lookups: {len(keys):,} keys in {lookup_s:.2f} s
({len(keys) / lookup_s:,.0f} lookups/s, vectors read and their last use recorded);
hashing the files: {len(keys) / hash_s:,.0f} images/s on one thread. Cache size: {size / 2**20:.0f} MB
for {len(keys):,} vectors of 1,280 floats.
""")


if __name__ == "__main__":
    main()
