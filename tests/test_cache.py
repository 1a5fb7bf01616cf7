"""The content-addressed feature cache: hits are invisible in the result, misses are exact."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from featx.cache import FeatureCache
from featx.extract import extract
from featx.sources import folder_source
from featx.store import FeatureStore

from conftest import make_image, small_config


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for k, (name, rgb) in enumerate({"blue": (40, 40, 200), "red": (200, 40, 40)}.items()):
        for i in range(7):
            make_image(root / name / f"{i}.jpg", rgb, seed=10 * k + i)
    return root


def run(photos, out, weights="none", **kw):
    kw.setdefault("layers", ("features.6",))
    kw.setdefault("pools", ("grid2",))
    return extract(folder_source(photos), out, small_config(weights, **kw), overwrite=True)


def rows(path) -> dict[str, np.ndarray]:
    with FeatureStore(path) as fs:
        return {i: np.concatenate([fs.features(t)[k] for t in fs.taps]) for k, i in enumerate(fs.ids)}


def assert_same(a, b):
    with FeatureStore(a) as fa, FeatureStore(b) as fb:
        assert fa.ids == fb.ids and fa.labels.tolist() == fb.labels.tolist() and fa.taps == fb.taps
        for t in fa.taps:
            np.testing.assert_array_equal(fa.features(t), fb.features(t))


def test_a_second_run_is_all_hits_and_the_same_file(photos, tmp_path):
    cold = run(photos, tmp_path / "cold.h5")
    assert cold.cache_hits == 0
    warm = run(photos, tmp_path / "warm.h5")
    assert warm.cache_hits == 14
    off = run(photos, tmp_path / "off.h5", cache=None)
    assert_same(warm.out, off.out)
    assert_same(cold.out, off.out)
    with FeatureStore(warm.out) as fs:
        assert fs.attrs["cache_hits"] == 14  # provenance; the features do not depend on it


def test_new_images_are_the_only_misses_and_renames_hit(photos, tmp_path):
    run(photos, tmp_path / "a.h5")
    for i in range(7, 10):  # three new images
        make_image(photos / "red" / f"{i}.jpg", (200, 40, 40), seed=100 + i)
    grown = run(photos, tmp_path / "b.h5")
    assert grown.n_rows == 17 and grown.cache_hits == 14  # exactly 3 misses
    assert_same(grown.out, run(photos, tmp_path / "b_off.h5", cache=None).out)
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved / "set")
    (moved / "set" / "blue").rename(moved / "set" / "navy")  # renamed folder, another root
    for p in (moved / "set" / "red").glob("*.jpg"):
        p.rename(p.with_name("img_" + p.name))
    renamed = run(moved / "set", tmp_path / "c.h5")
    assert renamed.cache_hits == 17  # nothing recomputed
    assert_same(renamed.out, run(moved / "set", tmp_path / "c_off.h5", cache=None).out)


@pytest.mark.parametrize("change", [{"weights": "seed"}, {"image_size": 40}, {"pools": ("avg",)},
                                    {"precision": "bf16"}, {"dtype": "float16"}])
def test_any_setting_that_decides_the_vector_recomputes(photos, tmp_path, change):
    run(photos, tmp_path / "a.h5")
    kw = dict(change)
    if kw.pop("weights", None):
        kw["seed"] = 1  # other random weights
    again = run(photos, tmp_path / "b.h5", **kw)
    assert again.cache_hits == 0
    assert_same(again.out, run(photos, tmp_path / "c.h5", cache=None, **kw).out)


def test_a_new_tap_computes_only_that_tap(photos, tmp_path, monkeypatch):
    from featx.extractor import FeatureExtractor

    run(photos, tmp_path / "a.h5", layers=("features.6",))
    asked = []
    real = FeatureExtractor.__call__
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractor, "__call__", lambda self, x, taps=None: asked.append(taps) or real(self, x, taps))
        both = run(photos, tmp_path / "b.h5", layers=("features.6", "features.3"))
    assert asked and all(t == ["features.3"] for t in asked[1:])  # [0]: the width probe, all taps
    assert both.cache_hits == 0  # no row came wholly from the cache ...
    assert_same(both.out, run(photos, tmp_path / "c.h5", layers=("features.6", "features.3"), cache=None).out)
    assert run(photos, tmp_path / "d.h5", layers=("features.6", "features.3")).cache_hits == 14  # ... now all


KILL_DURING_PUT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from conftest import small_config
    from featx.cache import FeatureCache
    from featx.extract import extract
    from featx.sources import folder_source
    real = FeatureCache.put
    def put_then_die(self, vectors, setting):
        if len(vectors) and os.path.exists({flag!r}):
            self._db.execute("BEGIN IMMEDIATE")
            for key in vectors:  # wrong vectors, half written, never committed
                self._db.execute("INSERT OR REPLACE INTO vectors VALUES (?, ?, 'float32', 1, ?, 0, 0)",
                                 (key, setting, np.float32(666).tobytes()))
            os.kill(os.getpid(), signal.SIGKILL)
        open({flag!r}, "w").close()
        return real(self, vectors, setting)
    FeatureCache.put = put_then_die
    extract(folder_source({data!r}), {out!r}, small_config(layers=("features.6",), pools=("grid2",)),
            unit_items=4)
""")


def test_sigkill_during_a_cache_write_leaves_no_wrong_entry(photos, tmp_path):
    script = KILL_DURING_PUT.format(tests=os.path.dirname(__file__), data=str(photos), out=str(tmp_path / "k.h5"),
                                    flag=str(tmp_path / "first-put-done"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == -9, proc.stderr
    again = extract(folder_source(photos), tmp_path / "k.h5", small_config(layers=("features.6",), pools=("grid2",)),
                    unit_items=4)
    assert again.resumed_from == 8  # two units were published before the kill
    reference = run(photos, tmp_path / "off.h5", cache=None).out
    assert_same(again.out, reference)
    # the cache holds the first unit's vectors (committed) and the resumed units', never the
    # half-written ones: every entry is the vector a fresh computation gives
    src, want = folder_source(photos), rows(reference)
    cache = FeatureCache(os.environ["FEATX_CACHE"])
    setting = cache.info()["settings"][0]["setting"]
    keys = {src.content_key(i): src.ids[i] for i in range(len(src))}
    found = cache.get(list(keys), setting)
    assert len(found) == 10  # 4 + the resumed 6; the killed unit's 4 were rolled back
    for key, vector in found.items():
        np.testing.assert_array_equal(vector, want[keys[key]])


CONCURRENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import small_config
    from featx.extract import extract
    from featx.sources import folder_source
    r = extract(folder_source(sys.argv[1]), sys.argv[2], small_config(layers=("features.6",), pools=("grid2",),
                batch_size=2), unit_items=2)
    print(r.cache_hits)
""")


def test_two_processes_share_the_cache_without_losing_or_doubling(photos, tmp_path):
    """Two extractions at once, of folders that share half their images."""
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    shutil.copytree(photos / "blue", tmp_path / "one" / "blue")
    shutil.copytree(photos / "red", tmp_path / "one" / "red")
    shutil.copytree(photos / "red", tmp_path / "two" / "red")
    for i in range(5):
        make_image(tmp_path / "two" / "green" / f"{i}.jpg", (40, 200, 40), seed=50 + i)
    script = CONCURRENT.format(tests=os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / n), str(tmp_path / f"{n}.h5")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
             for n in ("one", "two")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    info = FeatureCache(os.environ["FEATX_CACHE"]).info()
    assert info["entries"] == 19  # 7 blue + 7 red + 5 green, each once
    for n in ("one", "two"):
        assert_same(tmp_path / f"{n}.h5", run(tmp_path / n, tmp_path / f"{n}_off.h5", cache=None).out)


def test_a_damaged_cache_is_reported_and_never_gives_wrong_features(photos, tmp_path, recwarn):
    run(photos, tmp_path / "a.h5")
    db = sqlite3.connect(os.path.join(os.environ["FEATX_CACHE"], "index.sqlite"))
    db.execute("UPDATE vectors SET data = zeroblob(LENGTH(data)) WHERE image IN (SELECT image FROM vectors LIMIT 3)")
    db.commit()
    db.close()
    damaged = run(photos, tmp_path / "b.h5")
    assert damaged.cache_hits == 11  # the 3 damaged vectors fail their checksum: recomputed
    reference = run(photos, tmp_path / "ref.h5", cache=None).out
    assert_same(damaged.out, reference)
    cache = os.environ["FEATX_CACHE"]
    for f in os.listdir(cache):
        os.remove(os.path.join(cache, f))
    with open(os.path.join(cache, "index.sqlite"), "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="cannot be used .* computing every vector without it"):
        broken = run(photos, tmp_path / "c.h5")
    assert broken.cache_hits == 0
    assert_same(broken.out, reference)


def test_cli_summary_info_and_prune(photos, tmp_path, run_cli):
    args = ["extract", photos, "-b", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--workers", "0"]
    r = run_cli(*args, "--out", tmp_path / "a.h5")
    assert r.exit_code == 0 and "from the cache" not in r.stdout
    r = run_cli(*args, "--out", tmp_path / "b.h5")
    assert r.exit_code == 0 and "14 rows from 14 images, 0 failed, 14 from the cache" in r.stdout
    r = run_cli(*args, "--no-cache", "--out", tmp_path / "c.h5")
    assert r.exit_code == 0 and "from the cache" not in r.stdout
    info = run_cli("cache", "info")
    assert info.exit_code == 0 and "14 vectors" in info.stdout and "hits 14, misses 14 (50 %)" in info.stdout
    r = run_cli("cache", "prune", "--max-size", "1KB")
    assert r.exit_code == 0 and "removed 14 vectors" in r.stdout
    assert "0 vectors" in run_cli("cache", "info").stdout
    r = run_cli("cache", "prune", "--max-size", "lots")
    assert r.exit_code == 2 and "--max-size 'lots' is not a size" in r.stderr  # a usage error, as click says


def test_prune_evicts_the_least_recently_used(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    big = {f"img{i}": np.full(4096, i, np.float32) for i in range(20)}
    cache.put(dict(list(big.items())[:10]), "s")
    cache.put(dict(list(big.items())[10:]), "s")
    cache.get([f"img{i}" for i in range(5)], "s")  # used again: the newest
    cache.prune(cache.size() // 2)
    left = set(cache.get(list(big), "s"))
    assert {f"img{i}" for i in range(5)} <= left and len(left) < 20


def _open_cache(root: str) -> str:
    try:
        FeatureCache(root).close()
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return repr(e)


def test_processes_opening_a_new_cache_at_once_all_get_it(tmp_path):
    """Switching a new database to WAL is not covered by SQLite's busy wait: 4 processes
    opening one new cache at once used to get 'database is locked' (about 1 in 9)."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(4) as pool:
        results = [r for k in range(10) for r in pool.map(_open_cache, [str(tmp_path / str(k))] * 4)]
    assert results == ["ok"] * 40


@pytest.mark.parametrize("weights", ["none", "file"])
def test_a_rerun_whose_every_row_is_cached_builds_no_network(photos, tmp_path, monkeypatch, weights, weights_file):
    """Issue 19, item 7: the weights are known by their digest (a file's sha256; for random
    weights, the digest the cache recorded when it made them) and the tap widths by the
    meta-device skeleton, so answering from the cache needs no network and no forward pass."""
    from featx.adapters.torchvision import TorchvisionBackbone

    w = str(weights_file) if weights == "file" else "none"
    first = run(photos, tmp_path / "a.h5", weights=w)
    assert first.cache_hits == 0

    def no_network(*a, **k):
        raise AssertionError("built the network")

    monkeypatch.setattr(TorchvisionBackbone, "load", no_network)
    again = run(photos, tmp_path / "b.h5", weights=w)
    assert again.cache_hits == 14 and again.n_rows == 14
    assert_same(again.out, first.out)
    with FeatureStore(again.out) as fs:
        assert fs.attrs["weights_sha256"] == FeatureStore(first.out).attrs["weights_sha256"]
