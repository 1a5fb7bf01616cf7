"""Extraction by several processes: torchrun ranks on the CPU (gloo), exactly once, resumable.

Every run here goes through the real entry points (`python -m torch.distributed.run ...
-m featx extract`), each process with one thread (OMP_NUM_THREADS=1, as torchrun sets it),
so the ranks share the 2 cores of a CI machine fairly and compute exactly what one process
with one thread computes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.store import FeatureStore, StoreWriter, parts_dir

from conftest import make_image

SMALL = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--batch-size", "2",
         "--workers", "0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """23 images (a count no world size or batch divides), two of them broken; with units of
    4 items the broken ones (items 5 and 15) fall in rank 1's units of a 2-process run."""
    root = tmp_path_factory.mktemp("dist") / "photos"
    for k, (name, rgb) in enumerate({"blue": (40, 40, 200), "red": (200, 40, 40)}.items()):
        for i in range(12 if name == "blue" else 11):
            make_image(root / name / f"{i:02d}.jpg", rgb, seed=100 * k + i)
    (root / "blue" / "05.jpg").write_bytes(b"")
    (root / "red" / "03.jpg").write_text("not an image")
    return root


def env() -> dict:
    """This test's environment (its own FEATX_CACHE), one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def featx(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout)


def torchrun(n: int, *args, script: str | None = None, timeout=240):
    target = [script] if script else ["-m", "featx"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *target,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """What one process writes."""
    out = tmp_path_factory.mktemp("ref") / "one.h5"
    r = featx("extract", photos, *SMALL, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "21 rows from 23 images, 2 failed" in r.stdout
    return out


def assert_same_file(a, b):
    with FeatureStore(a) as fa, FeatureStore(b) as fb:
        assert fa.ids == fb.ids and fa.labels.tolist() == fb.labels.tolist()
        assert sorted(fa.failed) == sorted(fb.failed) and len(fb.failed) == 2
        np.testing.assert_allclose(fa.features(), fb.features(), rtol=1e-5, atol=1e-6)
        assert fa.attrs["n_items"] == fb.attrs["n_items"] == 23


@pytest.mark.parametrize("n, unit", [(2, 4), (3, 16)])
def test_ranks_write_the_file_one_process_writes(photos, reference, tmp_path, n, unit):
    """2 ranks x 6 units (bad images in rank 1's share); 3 ranks x 2 units (rank 2 has no work)."""
    out = tmp_path / "f.h5"
    r = torchrun(n, "extract", photos, *SMALL, "--unit-size", unit, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1 and "21 rows from 23 images, 2 failed" in r.stdout  # rank 0 reports
    assert_same_file(reference, out)
    assert not parts_dir(out).exists()


KILL_RANK_1 = textwrap.dedent("""
    import os, signal
    from featx.store import StoreWriter
    real = StoreWriter._publish
    def publish_then_die(self):
        real(self)
        if os.environ["RANK"] == "1":  # rank 1 dies after its first unit: no cleanup at all
            os.kill(os.getpid(), signal.SIGKILL)
    StoreWriter._publish = publish_then_die
    from featx.cli import main
    main()
""")


def test_a_killed_rank_resumes_with_another_world_size(photos, reference, tmp_path):
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "f.h5"
    r = torchrun(2, "extract", photos, *SMALL, "--unit-size", 4, "--out", out, script=str(script))
    assert r.returncode != 0 and not out.exists()
    info = featx("info", out)
    assert info.returncode == 2 and "units done" in info.stdout and "missing units" in info.stdout
    done_before = len(list(parts_dir(out).glob("shard-*.npz")))
    assert 1 <= done_before < 6
    r = torchrun(3, "extract", photos, *SMALL, "--unit-size", 4, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after" in r.stdout  # only the missing units were computed
    assert_same_file(reference, out)


FAIL_ON_RANK_1 = textwrap.dedent("""
    import os
    from featx.errors import FeatxError
    from featx.store import StoreWriter
    def not_shared(self, complete=False):
        if os.environ["RANK"] == "1":
            raise FeatxError("the parts folder is not visible here (simulated)")
        return self
    StoreWriter.join = not_shared
    from featx.cli import main
    main()
""")


def test_a_rank_that_cannot_start_stops_every_rank(photos, tmp_path):
    """No rank hangs: every rank learns at start-up why one of them cannot run."""
    r = torchrun(2, "extract", photos, *SMALL, "--device", "cuda", "--out", tmp_path / "gpu.h5", timeout=120)
    assert r.returncode != 0
    assert r.stderr.startswith("Error: rank 0 of 2 cannot run: --device cuda asked for a GPU but torch sees none")
    assert 'featx/' not in r.stderr  # one sentence from featx; torchrun then reports the failed workers
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    r = torchrun(2, "extract", photos, *SMALL, "--out", tmp_path / "f.h5", script=str(script), timeout=120)
    assert r.returncode != 0
    assert r.stderr.startswith("Error: rank 1 of 2 cannot run: the parts folder is not visible here (simulated)")
    assert r.stderr.count("cannot run") == 1  # said once, by rank 0


def test_an_output_that_cannot_be_written_stops_every_rank_with_one_sentence(photos, tmp_path):
    """Rank 0 checks --out before any work (issue 18: a read-only --out gave rank 0 a traceback)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    r = torchrun(2, "extract", photos, *SMALL, "--out", a_file / "f.h5", timeout=120)
    assert r.returncode != 0 and "featx/" not in r.stderr  # featx's sentence; torchrun then reports the failed workers
    assert r.stderr.count("cannot run") == 1 and r.stderr.startswith(f"Error: rank 0 of 2 cannot run: cannot write --out {a_file}/f.h5: {a_file} is a file, "
                               "not a folder.")


# -- assembly -----------------------------------------------------------------------------


def parts_of(photos, tmp_path, name="f.h5", *extra):
    """An unfinished job: every unit published by a run that does not assemble."""
    from featx.extract import extract
    from featx.sources import folder_source

    from conftest import small_config

    out = tmp_path / name
    cfg = small_config(batch_size=2, **dict(extra))
    r = extract(folder_source(photos), out, cfg, unit_items=4, finalize=False)
    assert r.n_rows == -1 and not out.exists() and len(list(parts_dir(out).glob("shard-*"))) == 6
    return out


def writer_of(out) -> StoreWriter:
    import json

    meta = json.loads((parts_dir(out) / "header.json").read_text())
    header = {k: v for k, v in meta.items() if k not in ("n_items", "unit_items", "job", "tap_specs", "dtype")}
    return StoreWriter(out, header, meta["n_items"], meta["tap_specs"], meta["unit_items"], meta["dtype"]).join()


def test_assembly_refuses_truncated_and_foreign_shards_by_name(photos, tmp_path):
    out = parts_of(photos, tmp_path)
    shard = sorted(parts_dir(out).glob("shard-*"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatxError, match=f"shard {shard} is unreadable.*delete it and rerun"):
        writer_of(out).finalize(["blue", "red"], "features")
    assert not out.exists()
    shard.write_bytes(data)
    other = parts_of(photos, tmp_path, "other.h5", ("pools", ("max",)))
    foreign = sorted(parts_dir(other).glob("shard-*"))[2]
    shutil.copy(foreign, shard)  # the same items, from a job with other settings
    with pytest.raises(FeatxError, match=f"shard {shard} belongs to another job"):
        writer_of(out).finalize(["blue", "red"], "features")
    shutil.copy(foreign, parts_dir(out) / "shard-000000000001-000000000005.npz")
    with pytest.raises(FeatxError, match="which is not a work unit of this job"):
        writer_of(out).finalize(["blue", "red"], "features")


def test_two_processes_assembling_at_once_make_one_good_file(photos, reference, tmp_path):
    out = parts_of(photos, tmp_path)
    errors, writers = [], [writer_of(out), writer_of(out)]

    def assemble(writer):
        try:
            writer.finalize(["blue", "red"], "features")
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=assemble, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_same_file(reference, out)
    assert not parts_dir(out).exists() and not list(tmp_path.glob("f.h5.*.tmp"))


def test_a_timm_backbone_under_torchrun_killed_and_resumed(photos, tmp_path):
    """A backbone of another source goes through the same engine: 2 ranks (rank 1 killed
    after its first unit), then one process finishes; the file equals one process's."""
    pytest.importorskip("timm")
    timm_args = ["--backbone", "timm:resnet18", *SMALL[2:], "--no-cache"]  # every row through the network
    one = tmp_path / "one.h5"
    r = featx("extract", photos, *timm_args, "--out", one)
    assert r.returncode == 0 and "21 rows from 23 images, 2 failed" in r.stdout, r.stderr[-3000:]
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    out = tmp_path / "f.h5"
    r = torchrun(2, "extract", photos, *timm_args, "--unit-size", 4, "--out", out, script=str(script))
    assert r.returncode != 0 and not out.exists()
    r = featx("extract", photos, *timm_args, "--unit-size", 4, "--out", out)
    assert r.returncode == 0 and "resumed after" in r.stdout, r.stderr[-3000:]
    assert_same_file(one, out)
    with FeatureStore(out) as fs:
        assert fs.attrs["backbone"] == "timm:resnet18"
