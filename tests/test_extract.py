import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from featx import registry, weights
from featx.errors import FeatxError
from featx.distributed import World
from featx.extract import extract
from featx.extractor import FeatureExtractor
from featx.taps import TapRecorder, pool
from featx.sources import folder_source
from featx.store import FeatureStore, parts_dir

from conftest import make_image, small_config


@pytest.mark.parametrize("name,size,dim", [
    ("alexnet", 64, 256), ("vgg16", 32, 512), ("resnet50", 32, 2048), ("inception_v3", 80, 2048),
    ("mobilenet_v2", 32, 1280),
])
def test_course_backbones_default_tap(image_tree, tmp_path, name, size, dim):
    src = folder_source(image_tree, "val")
    r = extract(src, tmp_path / "f.h5", small_config(backbone=name, image_size=size))
    with FeatureStore(r.out) as fs:
        assert fs.features().shape == (6, dim)
        assert np.isfinite(fs.features()).all()


def test_classifier_hidden_layer_alias_fc7():
    model = registry.build("vgg16")
    assert registry.resolve_tap("vgg16", model, "fc7") == "classifier.4"
    with TapRecorder(model.eval(), {"classifier.4": "avg"}) as rec:
        assert rec.run(torch.zeros(1, 3, 32, 32))["classifier.4"].shape == (1, 4096)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(FeatxError, match="no layer 'features.99'"):
        FeatureExtractor(small_config(layers=("features.99",)))


def test_several_layers_one_forward_pass(image_tree, tmp_path):
    ex = FeatureExtractor(small_config(layers=("features.3", "features"), pools=("avg", "grid2"), image_size=64))
    calls = []
    ex.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    x = torch.randint(0, 255, (5, 3, 64, 64), dtype=torch.uint8)
    out = ex(x)
    assert len(calls) == 1  # one forward for four stored taps
    assert set(out) == {"features.3@avg", "features.3@grid2", "features@avg", "features@grid2"}
    assert out["features.3@grid2"].shape == (5, 24 * 4)
    # the same numbers as a dedicated extraction of one tap
    alone = FeatureExtractor(small_config(layers=("features",), image_size=64))
    alone.model.load_state_dict(ex.model.state_dict())
    np.testing.assert_allclose(alone(x)["features"], out["features@avg"], rtol=1e-5, atol=1e-6)


def test_early_taps_stop_the_forward_pass():
    ex = FeatureExtractor(small_config(layers=("features.2",)))
    reached = []
    ex.model.features[10].register_forward_hook(lambda *a: reached.append(1))
    ex(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert reached == []


def test_pooling_values():
    t = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert pool(t, "avg").item() == 7.5
    assert pool(t, "max").item() == 15
    assert pool(t, "grid2").tolist() == [[2.5, 4.5, 10.5, 12.5]]
    gem = pool(t, "gem").item()
    assert 7.5 < gem < 15  # between the mean and the max
    nhwc = t.permute(0, 2, 3, 1)
    assert pool(nhwc, "grid2", nhwc=True).tolist() == [[2.5, 4.5, 10.5, 12.5]]


def test_bad_images_are_recorded_and_rows_stay_aligned(image_tree, tmp_path):
    (image_tree / "train" / "red" / "zero.jpg").write_bytes(b"")
    (image_tree / "train" / "blue" / "fake.jpg").write_text("not a jpeg")
    src = folder_source(image_tree, "train")
    r = extract(src, tmp_path / "f.h5", small_config())
    assert r.n_rows == 12 and len(r.failed) == 2
    with FeatureStore(r.out) as fs:
        assert {i for i, _ in fs.failed} == {"train/red/zero.jpg", "train/blue/fake.jpg"}
        ids, labels = fs.ids, fs.labels
        assert ids == [i for i in src.ids if i not in ("train/red/zero.jpg", "train/blue/fake.jpg")]
        assert all(("red" in i) == (labels[k] == 1) for k, i in enumerate(ids))
        # each row is the features of its own image, not a neighbour's
        single = extract(folder_source(image_tree / "train" / "red"), tmp_path / "one.h5", small_config())
        with FeatureStore(single.out) as one:
            k = ids.index("train/red/3.jpg")
            np.testing.assert_allclose(fs.features()[k], one.features()[one.ids.index("3.jpg")], rtol=1e-4, atol=1e-5)


def test_on_error_fail_stops(image_tree, tmp_path):
    (image_tree / "train" / "red" / "zero.jpg").write_bytes(b"")
    with pytest.raises(FeatxError, match="zero.jpg"):
        extract(folder_source(image_tree, "train"), tmp_path / "f.h5", small_config(on_error="fail"))
    assert not (tmp_path / "f.h5").exists()


def test_workers_give_identical_rows(image_tree, tmp_path, weights_file):
    src = folder_source(image_tree, "train")
    a = extract(src, tmp_path / "a.h5", small_config(weights_file, workers=0))
    b = extract(src, tmp_path / "b.h5", small_config(weights_file, workers=2))
    with FeatureStore(a.out) as fa, FeatureStore(b.out) as fb:
        assert fa.ids == fb.ids
        np.testing.assert_array_equal(fa.features(), fb.features())


def test_different_settings_refused_unless_overwrite(image_tree, tmp_path, weights_file):
    src = folder_source(image_tree, "val")
    out = tmp_path / "f.h5"
    extract(src, out, small_config(weights_file))
    again = extract(src, out, small_config(weights_file))
    assert again.already_complete
    with pytest.raises(FeatxError, match="other settings.*--overwrite"):
        extract(src, out, small_config(weights_file, pools=("max",)))
    r = extract(src, out, small_config(weights_file, pools=("max",)), overwrite=True)
    with FeatureStore(r.out) as fs:
        assert fs.tap_info(fs.default_tap)["pool"] == "max"


def test_overwrite_with_the_same_settings_recomputes_and_replaces_the_file(image_tree, tmp_path, weights_file):
    """--overwrite over a complete file of the same job used to leave the old file (and a
    parts folder that made the next run a no-op)."""
    src = folder_source(image_tree, "val")
    out = tmp_path / "f.h5"
    extract(src, out, small_config(weights_file, cache=None))
    make_image(image_tree / src.ids[0], (0, 255, 0), seed=99)  # same name, other pixels
    for _ in range(2):
        r = extract(src, out, small_config(weights_file, cache=None), overwrite=True)
        assert r.units_done > 0 and not r.already_complete
        assert not parts_dir(out).exists()
    fresh = extract(src, tmp_path / "fresh.h5", small_config(weights_file, cache=None))
    with FeatureStore(out) as a, FeatureStore(fresh.out) as b:
        np.testing.assert_array_equal(a.features(), b.features())


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import small_config
    from featx.extract import extract
    from featx.sources import folder_source
    from featx.store import StoreWriter
    real = StoreWriter._publish
    count = []
    def publish_then_die(self, *a, **k):
        real(self, *a, **k)
        count.append(1)
        if len(count) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush, no finally
    StoreWriter._publish = publish_then_die
    extract(folder_source({data!r}, "train"), {out!r}, small_config({weights!r}), unit_items=4)
""")


def test_killed_run_resumes_to_identical_file(image_tree, tmp_path, weights_file, run_cli):
    src = folder_source(image_tree, "train")
    clean = extract(src, tmp_path / "clean.h5", small_config(weights_file), unit_items=4)
    out = tmp_path / "killed.h5"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), data=str(image_tree), out=str(out),
                                weights=str(weights_file))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and parts_dir(out).exists()
    with pytest.raises(FeatxError, match="not complete"):
        FeatureStore(out)
    shown = run_cli("info", out)
    assert shown.exit_code == 2 and "INCOMPLETE (2 of 3 units done, 8 of 12 items; missing units 2)" in shown.output
    resumed = extract(src, out, small_config(weights_file), unit_items=4)
    assert resumed.resumed_from == 8
    with FeatureStore(clean.out) as a, FeatureStore(out) as b:
        assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist()
        np.testing.assert_array_equal(a.features(), b.features())
    assert not parts_dir(out).exists()


def test_processes_that_never_talk_share_the_units(image_tree, tmp_path, weights_file):
    """A hand-made world (a Slurm job array, say): each process takes unit % size == rank,
    and the one that finds every unit published assembles the file."""
    src = folder_source(image_tree, "train")
    whole = extract(src, tmp_path / "whole.h5", small_config(weights_file))
    out = tmp_path / "ranks.h5"
    first = extract(src, out, small_config(weights_file), unit_items=4, world=World(0, 2))
    assert first.n_rows == -1 and first.units_done == 2 and not out.exists()  # units 0 and 2 of 0, 1, 2
    last = extract(src, out, small_config(weights_file), unit_items=4, world=World(1, 2))
    assert last.units_done == 1 and last.n_rows == 12
    with FeatureStore(whole.out) as a, FeatureStore(out) as b:
        np.testing.assert_array_equal(a.features(), b.features())


def test_shards_bound_memory(image_tree, tmp_path, weights_file, monkeypatch):
    from featx.store import StoreWriter

    sizes = []
    real = StoreWriter._publish

    def spy(self):
        sizes.append(self._buffer[-1][1] - self._buffer[0][0])
        return real(self)

    monkeypatch.setattr(StoreWriter, "_publish", spy)
    extract(folder_source(image_tree, "train"), tmp_path / "f.h5", small_config(weights_file), unit_items=4)
    assert sizes == [4, 4, 4]  # rows leave memory every 4 items, however many images there are


def test_float16_storage_holds_half_values_that_every_reader_takes(image_tree, tmp_path, weights_file):
    """--dtype float16 rounds to half precision but stores float32, shuffled and deflated:
    netCDF-C crashes on a half-float dataset (tests/test_formats.py opens one)."""
    full = extract(folder_source(image_tree, "val"), tmp_path / "f32.h5", small_config(weights_file))
    half = extract(folder_source(image_tree, "val"), tmp_path / "f16.h5", small_config(weights_file, dtype="float16"))
    with h5py.File(half.out) as f:
        ds = f["features"]
        assert ds.dtype == np.float32 and ds.compression == "gzip" and ds.shuffle
        assert f.attrs["feature_dtype"] == "float16"
    with FeatureStore(full.out) as a, FeatureStore(half.out) as b:
        assert a.feature_dtype == np.float32 and b.feature_dtype == np.float16
        x = a.features()
        np.testing.assert_array_equal(b.features(), x.astype(np.float16).astype(np.float32))
        assert not np.array_equal(b.features(), x)  # rounded, not float32 relabelled


def test_provenance_attributes(image_tree, tmp_path, weights_file):
    r = extract(folder_source(image_tree, "val"), tmp_path / "f.h5", small_config(weights_file))
    with FeatureStore(r.out) as fs:
        a = fs.attrs
    assert a["backbone"] == "mobilenet_v2" and a["weights"] == "file:mnv2_random.pt"
    assert a["weights_sha256"] == weights.sha256_of(weights_file)
    assert json.loads(a["preprocessing"])["crop"] == 32
    assert json.loads(a["source"])["split"] == "val"
    for key in ("featx_version", "torch_version", "torchvision_version", "command", "pooling"):
        assert a[key]


def test_random_weights_are_seeded_recorded_and_part_of_the_fingerprint(image_tree, tmp_path):
    """`--weights none` makes the same network every run, so a resumed run never mixes two."""
    src = folder_source(image_tree, "val")
    cfg = dict(backbone="resnet18", weights="none")
    a = extract(src, tmp_path / "a.h5", small_config(**cfg))
    b = extract(src, tmp_path / "b.h5", small_config(**cfg))
    c = extract(src, tmp_path / "c.h5", small_config(**cfg, seed=1))
    with FeatureStore(a.out) as fa, FeatureStore(b.out) as fb, FeatureStore(c.out) as fc:
        np.testing.assert_array_equal(fa.features(), fb.features())
        assert np.abs(fa.features() - fc.features()).max() > 1e-3  # another seed, another network
        assert fa.attrs["weights_seed"] == 0 and fc.attrs["weights_seed"] == 1
        assert len(fa.attrs["weights_sha256"]) == 64 and fa.attrs["weights_sha256"] != fc.attrs["weights_sha256"]
    # an unfinished run with seed 0 is not continued by a run with seed 1
    extract(src, tmp_path / "d.h5", small_config(**cfg), unit_items=4, world=World(0, 2), finalize=False)
    with pytest.raises(FeatxError, match="unfinished run with other settings"):
        extract(src, tmp_path / "d.h5", small_config(**cfg, seed=1))


def test_the_unit_size_shapes_the_work_not_the_file(image_tree, tmp_path, weights_file):
    src = folder_source(image_tree, "train")
    out = tmp_path / "f.h5"
    extract(src, out, small_config(weights_file), unit_items=4)
    assert extract(src, out, small_config(weights_file), unit_items=8).already_complete  # the same file
    unfinished = tmp_path / "u.h5"
    extract(src, unfinished, small_config(weights_file), unit_items=4, world=World(0, 2))
    with pytest.raises(FeatxError, match="unfinished run with other settings"):  # shards cut otherwise
        extract(src, unfinished, small_config(weights_file), unit_items=8)
