"""Faults and hostile input (issue 18): a full disk, read-only places, kills, races, damaged
state, NaN, absurd option values.  Each test names the item it covers; each failed on the
code before the fix.

A full disk is simulated by a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored, so that a
write past it fails with EFBIG as a write to a full disk fails with ENOSPC) in a subprocess
running the real command, or by an OSError raised at the write call.
"""

from __future__ import annotations

import csv
import errno
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.extract import extract
from featx.sources import folder_source
from featx.store import FeatureStore, parts_dir

from conftest import BACKBONE, make_image, small_config, write_store

SMALL = ["--backbone", BACKBONE, "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0"]


@pytest.fixture
def photos(tmp_path):
    """photos/{blue,red}/*.jpg, 8 each."""
    root = tmp_path / "photos"
    for k, (name, rgb) in enumerate({"blue": (40, 40, 200), "red": (200, 40, 40)}.items()):
        for i in range(8):
            make_image(root / name / f"{i}.jpg", rgb, seed=50 * k + i)
    return root


def featx(*args, fsize: int | None = None, timeout: float = 240, env: dict | None = None):
    """The real command in a subprocess; ``fsize``: no file may grow beyond that many bytes."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if fsize else None,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})})


def one_sentence(r, *phrases):
    """Exit status 1, featx's own sentence on stderr, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last.startswith("Error: "), r.stderr[-2000:]
    for p in phrases:
        assert p in r.stderr, r.stderr


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def model(photos, tmp_path, run_cli):
    """A fitted logreg bundle on features.6@grid2 of the photos."""
    r = run_cli("extract", photos, *SMALL, "--layer", "features.6", "--pool", "grid2", "--out", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    r = run_cli("fit", tmp_path / "f.h5", "--search", "none", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    return tmp_path / "m.skops"


# -- 1, 14: every file through temp + fsync + rename; a full disk keeps the previous file -------


def test_a_full_disk_keeps_the_previous_predictions_and_sheet(model, photos, tmp_path, run_cli):
    out, sheet = tmp_path / "p.csv", tmp_path / "s.png"
    r = run_cli("predict", model, photos, "--out", out, "--sheet", sheet, "--workers", 0)
    assert r.exit_code == 0, r.output
    before_csv, before_png = out.read_bytes(), sheet.read_bytes()
    assert len(before_csv) > 500 and len(before_png) > 6000
    r = featx("predict", model, photos, "--out", out, "--workers", 0, fsize=300)
    one_sentence(r, f"cannot write {out}: the file grew beyond the size this system allows.")
    r = featx("predict", model, photos, "--out", out, "--sheet", sheet, "--workers", 0, fsize=4000)
    one_sentence(r, f"cannot write {sheet}")
    assert out.read_bytes() == before_csv and sheet.read_bytes() == before_png  # whole, as they were
    assert temps(tmp_path) == []


def test_a_full_disk_keeps_the_previous_bundle_and_report(model, tmp_path, run_cli):
    before = model.read_bytes()
    r = featx("fit", tmp_path / "f.h5", "--out", model, fsize=1500)
    one_sentence(r, f"cannot write {model}")
    assert model.read_bytes() == before and temps(tmp_path) == []
    report = tmp_path / "report"
    r = run_cli("evaluate", model, tmp_path / "f.h5", "--report", report)
    assert r.exit_code == 0, r.output
    png = (report / "confusion_matrix.png").read_bytes()
    r = featx("evaluate", model, tmp_path / "f.h5", "--report", report, fsize=3000)
    one_sentence(r, f"cannot write {report / 'confusion_matrix.png'}")
    assert (report / "confusion_matrix.png").read_bytes() == png and temps(tmp_path) == []


@pytest.mark.parametrize("to", ["parquet", "npz", "csv"])
def test_export_on_a_full_disk_keeps_the_previous_export(tmp_path, run_cli, to):
    if to == "parquet":
        pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    features = write_store(tmp_path / "f.h5", rng.standard_normal((60, 64), dtype=np.float32),
                           rng.integers(0, 2, 60), ["a", "b"])
    out = tmp_path / f"x.{to}"
    r = run_cli("export", features, "--to", to, "--out", out)
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    assert len(before) > 4000
    r = featx("export", features, "--to", to, "--out", out, fsize=2000)
    one_sentence(r, f"cannot write the export {out}: the file grew beyond the size this system allows.")
    assert out.read_bytes() == before and temps(tmp_path) == []


def test_finetune_on_a_full_disk_is_one_sentence_and_leaves_no_partial_file(photos, tmp_path):
    run = tmp_path / "run"
    r = featx("finetune", photos, *SMALL, "--epochs", "1", "--out", run, fsize=200_000)  # mobilenet_v2: 9 MB
    assert "enforce fail" not in r.stderr
    one_sentence(r, f"cannot write {run / 'backbone.pt'}: the file grew beyond the size this system allows.")
    assert not (run / "backbone.pt").exists() and not (run / "checkpoint.pt").exists() and temps(tmp_path) == []


def test_stale_temporary_files_are_removed_by_the_next_run(model, photos, tmp_path, run_cli):
    """A process killed mid-write leaves its temporary file; the next write of that path removes
    it when its process is gone (a live process's is left alone).  Assembly's SIGKILL orphan
    (`<out>.<pid>.tmp`, as featx 0.1 named it) included."""
    host = socket.gethostname()
    gone, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f"p.csv.{gone}@{host}.tmp", tmp_path / f"g.h5.{gone}.tmp", tmp_path / f"g.h5.{gone}@{host}.tmp"]
    live = tmp_path / f"p.csv.{alive}@{host}.tmp"
    for p in stale + [live]:
        p.write_bytes(b"half")
    assert run_cli("predict", model, photos, "--out", tmp_path / "p.csv").exit_code == 0
    assert run_cli("extract", photos, *SMALL, "--out", tmp_path / "g.h5").exit_code == 0
    assert not any(p.exists() for p in stale) and live.exists()


def test_read_only_or_impossible_outputs_are_one_sentence_before_any_work(model, photos, tmp_path, run_cli,
                                                                          monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args in (["extract", photos, *SMALL, "--out", a_file / "f.h5"],
                 ["fit", tmp_path / "f.h5", "--out", a_file / "m.skops"],
                 ["predict", model, photos, "--out", a_file / "p.csv"],
                 ["evaluate", model, tmp_path / "f.h5", "--report", a_file / "r"],
                 ["sweep", "--train", tmp_path / "f.h5", "--out", a_file / "sw"],
                 ["finetune", photos, *SMALL, "--out", a_file / "run"]):
        r = run_cli(*args)
        assert r.exit_code == 1 and f"{a_file} is a file, not a folder" in r.stderr, (args, r.output)
    # fit checks --report too before fitting: no bundle without its report
    r = run_cli("fit", tmp_path / "f.h5", "--out", tmp_path / "new.skops", "--report", a_file / "r")
    assert r.exit_code == 1 and not (tmp_path / "new.skops").exists()
    # a read-only folder (simulated: root may write anywhere)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = open

    def read_only(path, mode="r", *a, **k):
        if str(path).startswith(str(ro)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    for args in (["extract", photos, *SMALL, "--out", ro / "f.h5"], ["fit", tmp_path / "f.h5", "--out", ro / "m.skops"],
                 ["predict", model, photos, "--out", ro / "p.csv"]):
        r = run_cli(*args)
        assert r.exit_code == 1 and "the file system is read-only" in r.stderr and str(ro) in r.stderr, r.output
    assert list(ro.iterdir()) == []


# -- 2: a split layout is not taken as classes ---------------------------------------------------


def test_every_command_reads_a_split_layout_the_same_way(image_tree, tmp_path, run_cli):
    r = run_cli("extract", image_tree, *SMALL, "--out", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    assert "holds split folders (train, val): reading train/" in r.stderr
    with FeatureStore(tmp_path / "f.h5") as fs:
        assert fs.classes == ["blue", "red"] and len(fs) == 12  # not classes train and val
        assert all(i.startswith("train/") for i in fs.ids)
    from featx.sources import open_splits

    assert open_splits(str(image_tree)).train.ids == FeatureStore(tmp_path / "f.h5").ids  # what sweep and finetune train on
    (image_tree / "train").rename(image_tree / "test")
    r = run_cli("extract", image_tree, *SMALL, "--out", tmp_path / "g.h5")
    assert r.exit_code == 1 and "holds split folders (test, val) and no train/; choose one with --split" in r.stderr


# -- 3, 4: the pixel limit decides rows with or without the cache, at any value ------------------


def test_cache_hits_do_not_skip_the_pixel_limit(photos, tmp_path, run_cli):
    args = ["extract", photos, *SMALL]
    assert run_cli(*args, "--out", tmp_path / "warm.h5").exit_code == 0
    r = run_cli(*args, "--max-pixels", "100", "--out", tmp_path / "cached.h5")
    assert r.exit_code == 0 and "0 rows from 16 images, 16 failed" in r.stdout, r.output
    r = run_cli(*args, "--max-pixels", "100", "--no-cache", "--out", tmp_path / "off.h5")
    assert "0 rows from 16 images, 16 failed" in r.stdout
    r = run_cli(*args, "--max-pixels", "100", "--on-error", "fail", "--out", tmp_path / "fail.h5")
    assert r.exit_code == 1 and "decompression bomb" in r.stderr and "--max-pixels" in r.stderr


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path, run_cli):
    from PIL import Image

    big = tmp_path / "big" / "x"
    big.mkdir(parents=True)
    Image.new("L", (9500, 9500), 128).save(big / "huge.jpg", quality=50)  # 90.25 M pixels > Pillow's 89.48 M
    r = run_cli("extract", big.parent, *SMALL, "--out", tmp_path / "a.h5")
    assert "0 rows from 1 images, 1 failed" in r.stdout and "the limit of 89478485" in r.stderr
    r = run_cli("extract", big.parent, *SMALL, "--max-pixels", "100000000", "--out", tmp_path / "b.h5")
    assert r.exit_code == 0 and "1 rows from 1 images, 0 failed" in r.stdout, r.output


# -- 5, 10, 11, 16: the cache under hostile conditions -------------------------------------------


def _cache_entries() -> int:
    db = sqlite3.connect(Path(os.environ["FEATX_CACHE"]) / "index.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("size", ["-1", "0", "0.5", "inf", "nan", "-2G"])
def test_prune_refuses_sizes_that_are_not_positive_byte_sizes(photos, tmp_path, run_cli, size):
    assert run_cli("extract", photos, *SMALL, "--out", tmp_path / "f.h5").exit_code == 0
    r = run_cli("cache", "prune", "--max-size", size)
    assert r.exit_code == 2 and "is not a size such as 512MB" in r.stderr and "positive" in r.stderr
    assert _cache_entries() == 16  # nothing evicted


class FullDisk:
    """A cache connection on a full disk: SQLite refuses to grow anything (VACUUM writes a copy
    of the live pages, so it is the first to fail)."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql.strip().upper().startswith("VACUUM"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)


@pytest.mark.parametrize("free", ["none", "plenty"])
def test_prune_works_on_a_full_disk(tmp_path, run_cli, monkeypatch, free):
    """Compaction (VACUUM) needs free space the size of the cache: prune deletes first, and
    compacts only when there is room (and if the disk fills meanwhile, leaves the space to be
    reused), so a full disk can always be pruned."""
    import shutil

    from featx import cache as cache_mod

    root = tmp_path / "cache"
    cache = cache_mod.FeatureCache(root)
    for k in range(6):
        cache.put({f"img{k}-{i}": np.full(2048, i, np.float32) for i in range(50)}, "s")
    cache.close()
    if free == "none":
        real = shutil.disk_usage
        monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    real_init = cache_mod.FeatureCache.__init__

    def on_a_full_disk(self, *a, **k):
        real_init(self, *a, **k)
        self._db = FullDisk(self._db)

    monkeypatch.setattr(cache_mod.FeatureCache, "__init__", on_a_full_disk)
    monkeypatch.setenv("FEATX_CACHE", str(root))
    r = run_cli("cache", "prune", "--max-size", "500KB")
    assert r.exit_code == 0 and "removed" in r.stdout and "the file was not compacted" in r.stdout, r.output
    monkeypatch.undo()
    cache = cache_mod.FeatureCache(root)
    assert 0 < cache._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] < 100
    assert cache.live_bytes() <= 500 << 10
    assert cache.prune(500 << 10)[1]  # with room, the freed pages go back to the disk
    cache.close()


def test_a_locked_cache_says_at_once_that_it_waits_and_gives_up_in_bounded_time(photos, tmp_path, monkeypatch):
    from featx import cache as cache_mod

    assert extract(folder_source(photos), tmp_path / "a.h5", small_config()).n_rows == 16
    holder = sqlite3.connect(Path(os.environ["FEATX_CACHE"]) / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock and does not let go
    monkeypatch.setattr(cache_mod, "LOCK_WAIT", 3.0)
    said = []
    real = cache_mod.FeatureCache.__init__
    monkeypatch.setattr(cache_mod.FeatureCache, "__init__",
                        lambda self, root, lock_wait=None, log=None, create=True:
                        real(self, root, cache_mod.LOCK_WAIT, lambda s: said.append((time.monotonic(), s)), create))
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="failed .*held its lock for more than 3 s.*going on without it"):
        r = extract(folder_source(photos), tmp_path / "b.h5", small_config(pools=("max",)))
    holder.execute("ROLLBACK")
    holder.close()
    assert r.n_rows == 16 and r.cache_hits == 0  # computed without the cache
    assert said and "is locked by another process; waiting up to 3 s" in said[0][1]
    assert said[0][0] - t0 < 8 and time.monotonic() - t0 < 30


def test_a_cache_that_cannot_be_used_is_explained_without_blaming_a_good_index(photos, tmp_path, monkeypatch):
    good = extract(folder_source(photos), tmp_path / "a.h5", small_config())
    index = Path(os.environ["FEATX_CACHE"]) / "index.sqlite"
    monkeypatch.setenv("FEATX_CACHE", str(index))  # the index file itself, not its folder
    with pytest.warns(UserWarning) as w:
        r = extract(folder_source(photos), tmp_path / "b.h5", small_config())
    text = " ".join(str(x.message) for x in w)
    assert "is a file, not a folder" in text and "remove" not in text
    assert r.n_rows == good.n_rows and index.stat().st_size > 0


def test_cache_info_on_a_missing_cache_creates_nothing(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "none"))
    for args in (["cache", "info"], ["cache", "prune", "--max-size", "1G"]):
        r = run_cli(*args)
        assert r.exit_code == 0 and "there is no feature cache at" in r.stdout
    assert not (tmp_path / "none").exists()


# -- 6: a non-finite loss stops fine-tuning; nothing exported, the last good epoch kept ----------


def test_finetune_refuses_nan_options(photos, tmp_path, run_cli):
    for opt, value in (("--lr", "nan"), ("--lr", "inf"), ("--backbone-lr-mult", "nan"), ("--label-smoothing", "nan"),
                       ("--val-fraction", "nan")):
        r = run_cli("finetune", photos, *SMALL, opt, value, "--out", tmp_path / "run")
        assert r.exit_code == 2 and "is not a finite number" in r.stderr, (opt, r.output)
    from featx.finetune import FinetuneConfig, finetune

    with pytest.raises(FeatxError, match="--lr nan is out of range"):
        finetune(folder_source(photos), None, tmp_path / "lib", FinetuneConfig(backbone=BACKBONE, lr=float("nan")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "lib").exists()


def test_a_diverging_run_stops_and_keeps_the_last_good_epoch(photos, tmp_path, run_cli, monkeypatch):
    from featx import finetune as ft

    run, kept, real = tmp_path / "run", {}, ft.Trainer._step

    def nan_from_epoch_2(self, x, y, size):  # 12 training images in batches of 4: epoch 2 starts at step 4
        logits, loss = real(self, x, y, size)
        nan_from_epoch_2.steps += 1
        if nan_from_epoch_2.steps > 3:
            if not kept:  # what epoch 1 left
                kept.update({n: (run / n).read_bytes() for n in ("backbone.pt", "checkpoint.pt", "metrics.csv")})
            loss = loss * float("nan")
        return logits, loss

    nan_from_epoch_2.steps = 0
    monkeypatch.setattr(ft.Trainer, "_step", nan_from_epoch_2)
    r = run_cli("finetune", photos, *SMALL, "--val-fraction", "0.25", "--epochs", "3", "--out", run)
    assert r.exit_code == 1
    assert "training diverged: the training loss became nan at epoch 2, step 4" in r.stderr
    assert "the files of epoch 1 in" in r.stderr and "kept as they were" in r.stderr
    assert kept and {name: (run / name).read_bytes() for name in kept} == kept
    monkeypatch.undo()
    (run / "checkpoint.pt").write_bytes(kept["checkpoint.pt"][:1000])  # cut short by something else
    r = run_cli("finetune", photos, *SMALL, "--val-fraction", "0.25", "--epochs", "3", "--resume", "--out", run)
    assert r.exit_code == 1 and f"--resume: {run / 'checkpoint.pt'} cannot be read" in r.stderr, r.output
    # a learning rate that makes the weights blow up: nothing is exported at all
    r = run_cli("finetune", photos, *SMALL, "--epochs", "1", "--lr", "1e30", "--out", tmp_path / "wild")
    assert r.exit_code == 1 and "training diverged" in r.stderr and "nothing was written" in r.stderr
    assert not (tmp_path / "wild" / "backbone.pt").exists()


# -- 7: NaN features are one sentence for every classifier, or dropped on request ---------------


@pytest.fixture
def nan_files(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    X = (rng.normal(size=(120, 16)) + y[:, None]).astype(np.float32)
    X[17, 3], X[50, 0] = np.nan, np.inf
    return write_store(tmp_path / "nan.h5", X, y, ["a", "b", "c"]), X, y


@pytest.mark.parametrize("clf", ["logreg", "svm", "mlp", "knn"])
@pytest.mark.parametrize("budget", [None, "4KB"])
def test_nan_features_name_file_tap_and_row(nan_files, tmp_path, run_cli, clf, budget):
    path, X, y = nan_files
    extra = ["--memory-budget", budget] if budget else []
    r = run_cli("fit", path, "--clf", clf, *extra, "--out", tmp_path / "m.skops")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{path}: 2 of 120 rows have non-finite features features (nan or inf), the first row 17 (i17)" in r.stderr
    assert "--drop-nonfinite" in r.stderr and not (tmp_path / "m.skops").exists()
    r = run_cli("fit", path, "--clf", clf, *extra, "--drop-nonfinite", "--search", "none", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert "leaving out 2 of 120 rows whose features features are not finite (the first: i17)" in r.stdout


def test_nan_features_are_refused_by_evaluate_and_sweep(nan_files, tmp_path, run_cli):
    path, X, y = nan_files
    clean = write_store(tmp_path / "clean.h5", np.nan_to_num(X, posinf=0), y, ["a", "b", "c"])
    assert run_cli("fit", clean, "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    r = run_cli("evaluate", tmp_path / "m.skops", path)
    assert r.exit_code == 1 and "the first row 17 (i17)" in r.stderr and "Traceback" not in r.output
    r = run_cli("sweep", "--train", path, "--out", tmp_path / "sw")
    assert r.exit_code == 1 and "the first row 17 (i17)" in r.stderr


def test_extraction_records_non_finite_features_as_failures(photos, tmp_path, run_cli, weights_file):
    """Damaged weights (or a float16 overflow) make nan rows that would break every tool
    downstream: each is a recorded failure, as a bad image is, and never enters the cache."""
    import torch

    state = torch.load(weights_file)
    state["features.0.0.weight"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    args = ["extract", photos, "--backbone", BACKBONE, "--weights", tmp_path / "nan.pt", *SMALL[4:]]
    r = run_cli(*args, "--out", tmp_path / "f.h5")
    assert r.exit_code == 0 and "0 rows from 16 images, 16 failed" in r.stdout, r.output
    assert "the network's output is not finite (nan or inf)" in r.stderr
    assert _cache_entries() == 0
    r = run_cli(*args, "--on-error", "fail", "--out", tmp_path / "g.h5")
    assert r.exit_code == 1 and "cannot extract blue/0.jpg: the network's output is not finite" in r.stderr


# -- 8: a disk that fills during assembly: no crash, the shards kept ----------------------------


def test_assembly_checks_free_space_first_and_keeps_the_shards(photos, tmp_path, monkeypatch):
    import shutil

    from featx import files

    out = tmp_path / "f.h5"
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(FeatxError, match=f"not enough free space to write {out}: it needs about"):
        extract(folder_source(photos), out, small_config(), unit_items=4)
    assert not out.exists() and len(list(parts_dir(out).glob("shard-*"))) == 4
    monkeypatch.setattr(files.shutil, "disk_usage", real)
    r = extract(folder_source(photos), out, small_config(), unit_items=4)
    assert r.units_done == 0 and r.n_rows == 16  # assembled from the kept shards


@pytest.mark.parametrize("dtype, fsize", [("float32", 40_000),  # each shard is ~21 KB, the file ~85 KB
                                          ("float16", 14_000)])  # ~11 KB; ~18 KB of chunks deflated in threads
def test_a_write_failure_during_assembly_is_a_sentence_not_a_segfault(photos, tmp_path, dtype, fsize):
    out = tmp_path / "f.h5"
    args = ["extract", photos, *SMALL, "--unit-size", "4", "--no-cache", "--dtype", dtype, "--out", out]
    r = featx(*args, fsize=fsize)
    one_sentence(r, f"cannot assemble {out}: the file grew beyond the size this system allows.")
    assert not out.exists() and len(list(parts_dir(out).glob("shard-*"))) == 4 and temps(tmp_path) == []
    r = featx(*args)
    assert r.returncode == 0 and "(assembled from work units extracted earlier)" in r.stdout, r.stderr


# -- 9: two identical commands at once ------------------------------------------------------------


HOLD_AFTER_FIRST_SHARD = """
import os, sys, time
from featx.store import StoreWriter
real, go = StoreWriter._publish, sys.argv.pop(1)
def publish(self):  # publish the first unit, then wait for the test's go
    real(self)
    while not os.path.exists(go):
        time.sleep(0.05)
StoreWriter._publish = publish
from featx.cli import main
main()
"""


def test_two_identical_commands_on_one_output_both_end_well(photos, tmp_path):
    """The second waits for the first (saying so), then finds the work done; no traceback.
    The first holds after its first unit until the second has said that it waits."""
    script, go, out = tmp_path / "hold.py", tmp_path / "go", tmp_path / "f.h5"
    script.write_text(HOLD_AFTER_FIRST_SHARD)
    args = ["extract", str(photos), *SMALL, "--unit-size", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    first = subprocess.Popen([sys.executable, str(script), str(go), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(parts_dir(out).glob("shard-*")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, "-m", "featx", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    said = second.stderr.readline()  # blocks until the second says something
    go.touch()
    a_out, a_err = first.communicate(timeout=240)
    b_out, b_err = second.communicate(timeout=240)
    b_err = said + b_err
    assert first.returncode == 0 and second.returncode == 0, (a_err, b_err)
    assert "Traceback" not in a_err + b_err
    assert "another featx process is extracting" in said and "waiting for it to finish them" in said
    assert "wrote" in a_out and "16 rows from 16 images" in a_out
    # it finds the file made, or every unit done and the file being made
    assert "already complete (16 rows)" in b_out or "16 rows from 16 images" in b_out, b_out
    with FeatureStore(out) as fs:
        assert len(fs) == 16
    assert not parts_dir(out).exists()


def test_a_shard_published_after_another_process_finished_the_job_is_dropped(photos, tmp_path):
    from featx.store import StoreWriter

    out = tmp_path / "f.h5"
    extract(folder_source(photos), out, small_config(), unit_items=4)
    with FeatureStore(out) as fs:
        header = {k: v for k, v in fs.attrs.items() if isinstance(v, str)}
    w = StoreWriter(out, header, 16, {"features": {"layer": "features", "pool": "avg", "dim": 1280}}, 4)
    w.add(0, 4, {"features": np.zeros((4, 1280), np.float32)}, [0] * 4, ["a", "b", "c", "d"], [], [])
    assert not parts_dir(out).exists()  # nothing raised, nothing left


# -- 12: a damaged or missing parts/header.json ----------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_damaged_parts_header_is_rebuilt_from_the_shards(photos, tmp_path, run_cli, damage):
    out = tmp_path / "f.h5"
    args = ["extract", photos, *SMALL, "--unit-size", "4", "--out", out]
    extract(folder_source(photos), out, small_config(), unit_items=4, finalize=False)
    header = parts_dir(out) / "header.json"
    if damage == "missing":
        header.unlink()
    else:
        header.write_text('{"job": ')
    r = run_cli("info", out)
    assert r.exit_code == 2 and "INCOMPLETE" in r.stdout and "header.json is missing or damaged" in r.stdout
    assert "Traceback" not in r.output
    r = run_cli(*args)
    assert r.exit_code == 0 and "(assembled from work units extracted earlier)" in r.stdout, r.output


def test_parts_of_another_job_with_a_damaged_header_say_how_to_start_over(photos, tmp_path, run_cli):
    out = tmp_path / "f.h5"
    extract(folder_source(photos), out, small_config(pools=("max",)), unit_items=4, finalize=False)
    (parts_dir(out) / "header.json").unlink()
    r = run_cli("extract", photos, *SMALL, "--unit-size", "4", "--out", out)
    assert r.exit_code == 1 and "cannot tell which command made it; use --overwrite to start over" in r.stderr
    assert run_cli("extract", photos, *SMALL, "--unit-size", "4", "--overwrite", "--out", out).exit_code == 0


# -- 13: tiny classes ---------------------------------------------------------------------------


def test_fit_with_tiny_classes(tmp_path, run_cli):
    rng = np.random.default_rng(1)
    y = np.array([0] * 8 + [1] * 8 + [2])  # class "c" has a single row
    X = (rng.normal(size=(len(y), 8)) + 3 * y[:, None]).astype(np.float32)
    one = write_store(tmp_path / "one.h5", X, y, ["a", "b", "c"])
    r = run_cli("fit", one, "--out", tmp_path / "m.skops")  # logreg: the single row stays in training
    assert r.exit_code == 0, r.output
    r = run_cli("fit", one, "--clf", "svm", "--out", tmp_path / "s.skops")
    assert r.exit_code == 1 and "class 'c' has 1 of the training rows" in r.stderr and "at least 5" in r.stderr
    y2 = np.repeat([0, 1, 2], 2)
    two = write_store(tmp_path / "two.h5", (rng.normal(size=(6, 8)) + 3 * y2[:, None]).astype(np.float32), y2,
                      ["a", "b", "c"])
    r = run_cli("fit", two, "--out", tmp_path / "m2.skops")
    assert r.exit_code == 0 and "validation:" in r.stdout, r.output  # one of each class held out
    r = run_cli("fit", two, "--clf", "mlp", "--out", tmp_path / "m3.skops")
    assert r.exit_code == 1 and "--clf mlp needs at least 11 of the training rows" in r.stderr and "Traceback" not in r.output
    lone = write_store(tmp_path / "lone.h5", X[[0, 8]], np.array([0, 1]), ["a", "b"])
    r = run_cli("fit", lone, "--out", tmp_path / "m4.skops")
    assert r.exit_code == 1 and "every class has a single row" in r.stderr


# -- 15: absurd option values ---------------------------------------------------------------------


def test_absurd_option_values_are_refused_where_they_are_parsed(photos, tmp_path, run_cli):
    f = write_store(tmp_path / "f.h5", np.ones((20, 4), np.float32), np.repeat([0, 1], 10), ["a", "b"])
    for args, says in (
            (["fit", f, "--memory-budget", "inf", "--out", tmp_path / "m"], "is not a size"),
            (["fit", f, "--val-fraction", "nan", "--out", tmp_path / "m"], "is not a finite number"),
            (["fit", f, "--seed", "-1", "--out", tmp_path / "m"], "--seed"),
            (["sweep", "--train", f, "--val-fraction", "nan", "--out", tmp_path / "sw"], "is not a finite number"),
            (["extract", photos, *SMALL, "--image-size", "100000", "--out", tmp_path / "x.h5"], "--image-size"),
            (["extract", photos, *SMALL, "--batch-size", "1000000000", "--out", tmp_path / "x.h5"], "--batch-size"),
            (["extract", photos, *SMALL, "--workers", "100000", "--out", tmp_path / "x.h5"], "--workers"),
            (["extract", photos, *SMALL, "--pool", "gridx", "--out", tmp_path / "x.h5"], "unknown pooling")):
        r = run_cli(*args)
        assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.output, (args, r.output)
    for grid in ("C=nan", "C=-1", "C=0", "alpha=inf", "hidden=0"):
        r = run_cli("fit", f, "--grid", grid, "--out", tmp_path / "m")
        assert r.exit_code == 1 and "is out of range; every value must be finite" in r.stderr, r.output
    # a grid finer than the tapped map: refused before any image is read (it used to allocate 65 GB)
    r = run_cli("extract", photos, *SMALL, "--pool", "grid999", "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "--pool grid999 asks for a 999x999 grid, but features's map is 1x1 at 32 px" in r.stderr
    assert not (tmp_path / "x.h5").exists()


# -- 16: messages that said something wrong ---------------------------------------------------------


def test_messages_that_used_to_mislead(photos, tmp_path, run_cli, model, weights_file):
    from featx.store import StoreWriter

    empty = tmp_path / "empty.h5"  # every image failed to decode
    header = {"backbone": BACKBONE, "weights": "w", "weights_sha256": "abc", "fingerprint": "{}"}
    w = StoreWriter(empty, header, 2, {"features": {"layer": "features", "pool": "avg", "dim": 4}}, 2).prepare()
    w.add(0, 2, None, np.zeros(0, np.int64), [], ["x.jpg", "y.jpg"], ["bad", "bad"])
    w.finalize(["a", "b"], "features")
    r = run_cli("fit", empty, "--out", tmp_path / "e.skops")
    assert r.exit_code == 1 and "has no rows" in r.stderr and "single class" not in r.stderr
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    r = run_cli("extract", photos, *SMALL, "--out", text)
    assert r.exit_code == 1 and "is not a featx feature file" in r.stderr and "other settings" not in r.stderr
    assert text.read_text() == "my notes"
    cut = tmp_path / "cut.skops"
    cut.write_bytes(model.read_bytes()[:300])
    r = run_cli("evaluate", cut, tmp_path / "f.h5")
    assert r.exit_code == 1 and "damaged skops bundle" in r.stderr and "pickle" not in r.stderr
    r = run_cli("extract", photos, "--backbone", "resnet18", "--weights", weights_file, "--image-size", "32",
                "--out", tmp_path / "r.h5")
    assert r.exit_code == 1 and "do not fit backbone resnet18" in r.stderr
    assert "tensors are not in the file (e.g. conv1.weight)" in r.stderr and r.stderr.strip().endswith(")."), r.stderr


def test_a_resumed_run_that_computed_nothing_reports_no_rate(photos, tmp_path, run_cli):
    out = tmp_path / "f.h5"
    extract(folder_source(photos), out, small_config(), unit_items=4, finalize=False)
    r = run_cli("extract", photos, *SMALL, "--unit-size", "4", "--out", out)
    assert r.exit_code == 0 and "img/s" not in r.stdout and "assembled from work units extracted earlier" in r.stdout


def test_the_compile_fallback_warning_names_the_cause(monkeypatch):
    import torch

    from featx.extractor import FeatureExtractor

    def broken(*a, **k):  # how dynamo wraps inductor's failure: the cause is a layer down
        try:
            raise RuntimeError("Failed to find a working C++ compiler (g++ not on PATH)")
        except RuntimeError as inner:
            raise RuntimeError("backend='inductor' raised:") from inner

    monkeypatch.setattr(torch, "compile", broken)
    ex = FeatureExtractor(small_config(compile="on"))
    with pytest.warns(UserWarning, match=r"compiling the network failed \(RuntimeError: Failed to find a working C\+\+ "
                                         r"compiler \(g\+\+ not on PATH\)\); running it eagerly"):
        ex.prepare(10_000)


# -- 17: CSV formula injection -------------------------------------------------------------------


def test_predictions_csv_neutralises_formulas(tmp_path, run_cli, weights_file):
    root = tmp_path / "data"
    for k, name in enumerate(["=cmd", "+plus"]):
        for i in range(3):
            make_image(root / name / f"@{i}.jpg", (200 * k + 20, 40, 40), seed=10 * k + i)
    (root / "=cmd" / "-bad.jpg").write_bytes(b"not an image")
    r = run_cli("extract", root, *SMALL[:2], "--weights", weights_file, *SMALL[4:], "--out", tmp_path / "f.h5")
    assert r.exit_code == 0, r.output
    assert run_cli("fit", tmp_path / "f.h5", "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    r = run_cli("predict", tmp_path / "m.skops", root, "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    cells = [c for row in csv.reader(open(tmp_path / "p.csv", newline="")) for c in row]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
    assert "'=cmd/@0.jpg" in cells and "'=cmd/-bad.jpg" in cells
    assert {"'=cmd", "'+plus"} & set(cells)


# -- 18: the command recorded under torchrun can be run again -------------------------------------


def test_the_recorded_command_under_torchrun_is_runnable(monkeypatch, tmp_path):
    from featx import store

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = [str(Path(store.__file__).parent / "__main__.py"), "extract", "my photos", "--out", "f.h5"]
    monkeypatch.setattr(sys, "argv", argv)
    header = store.make_header({}, {})
    assert header["command"] == "featx extract 'my photos' --out f.h5" and header["world_size"] == 2
    assert store.command_line(["/usr/bin/featx", "fit", "a.h5"]) == "featx fit a.h5"


def test_info_of_an_unfinished_torchrun_job_gives_a_runnable_hint(photos, tmp_path, run_cli, monkeypatch):
    from featx import store

    out = tmp_path / "f.h5"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", [str(Path(store.__file__).parent / "__main__.py"), "extract", "photos"])
    header = store.make_header({"backbone": BACKBONE}, {"x": 1})
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    w = store.StoreWriter(out, header, 8, {"features": {"layer": "features", "pool": "avg", "dim": 4}}, 4).prepare()
    w.add(0, 4, {"features": np.zeros((4, 4), np.float32)}, [0] * 4, list("abcd"), [], [])
    r = run_cli("info", out)
    assert r.exit_code == 2 and "rerun to finish: featx extract photos (it ran as 2 processes under torchrun" in r.stdout
    assert "__main__" not in r.stdout


# -- 19: a cached and a cache-free run give bit-identical files ---------------------------------


def test_a_few_cache_misses_give_the_same_bits_as_a_cache_free_run(photos, tmp_path):
    """Vectors depend, in their last bits, on the batch shape (oneDNN picks kernels by it):
    the few misses of a rerun used to be computed in a small batch.  Every batch is now padded
    to the batch size.  resnet18 shows the difference (MobileNetV2 at 32 px does not)."""
    cfg = dict(backbone="resnet18", image_size=64, batch_size=8)
    extract(folder_source(photos), tmp_path / "a.h5", small_config(**cfg))
    make_image(photos / "red" / "3b.jpg", (180, 60, 60), seed=900)  # a miss among the hits of its work unit
    cached = extract(folder_source(photos), tmp_path / "b.h5", small_config(**cfg))
    assert cached.cache_hits == 16
    fresh = extract(folder_source(photos), tmp_path / "c.h5", small_config(cache=None, **cfg))
    with FeatureStore(cached.out) as a, FeatureStore(fresh.out) as b:
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.features(), b.features())


def test_misses_scattered_over_units_go_through_the_network_in_full_batches(photos, tmp_path, monkeypatch):
    """Padding every batch would cost a whole batch per work unit with a miss: the misses of
    all units are batched together instead (one padded batch per job at most)."""
    from featx.extractor import FeatureExtractor

    extract(folder_source(photos), tmp_path / "a.h5", small_config(), unit_items=4)
    for k, name in enumerate(("blue/0b.jpg", "blue/4b.jpg", "red/0b.jpg", "red/4b.jpg")):  # in units 0, 1, 2, 4 of 5
        make_image(photos / name, (90, 90, 90), seed=700 + k)
    sizes, real = [], FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, x, taps=None: sizes.append(len(x)) or real(self, x, taps))
    r = extract(folder_source(photos), tmp_path / "b.h5", small_config(), unit_items=4)
    assert r.cache_hits == 16 and r.n_rows == 20 and sizes == [4]
    monkeypatch.undo()
    fresh = extract(folder_source(photos), tmp_path / "c.h5", small_config(cache=None), unit_items=4)
    with FeatureStore(r.out) as a, FeatureStore(fresh.out) as b:
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.features(), b.features())
