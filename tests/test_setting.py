"""One record of what decides a vector (issue 19, item 1): the resume fingerprint, the cache
digest and the provenance all come from featx.setting.FeatureSetting."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from featx.extract import extract
from featx.extractor import ExtractConfig, FeatureExtractor
from featx.setting import FROM_CONFIG, NOT_DECIDING, FeatureSetting
from featx.sources import folder_source
from featx.store import FeatureStore, parts_dir

from conftest import small_config

BASE = FeatureSetting(backbone="mobilenet_v2", weights_sha256="ab" * 32, taps=(("features", "features", "avg"),),
                      preprocessing='{"crop": 32}', precision="float32", dtype="float32", channels_last=True,
                      device="cpu", torch_version="2.14.1", max_pixels=1000)
OTHER = {"backbone": "resnet50", "weights_sha256": "cd" * 32, "taps": (("features", "features", "max"),),
         "preprocessing": '{"crop": 64}', "precision": "bfloat16", "dtype": "float16", "channels_last": False,
         "device": "cuda", "torch_version": "2.15.0", "max_pixels": 2000, "code_version": 99, "tta": "flip"}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(FeatureSetting)])
def test_every_field_changes_the_fingerprint_and_the_cache_digest(field):
    changed = dataclasses.replace(BASE, **{field: OTHER[field]})
    source = {"items_sha256": "x"}
    assert changed.fingerprint(source) != BASE.fingerprint(source)
    name = changed.taps[0][0]
    assert changed.tap_digest(name) != BASE.tap_digest(name)
    assert FeatureSetting.from_json(changed.to_json()) == changed


def test_settings_without_flip_keep_the_digests_they_had():
    """Flip averaging came later: a setting without it must keep its cache digest and resume
    fingerprint, or every cached vector and unfinished run would be lost."""
    assert BASE.tap_digest("features") == "5562bd5d970ca00b36a5cd78ec762b8d"  # computed before the tta field
    assert "tta" not in BASE.to_json() and "tta" not in BASE.fingerprint({})["setting"]
    assert FeatureSetting.from_json(BASE.to_json()) == BASE


def test_every_option_either_decides_a_field_or_is_listed_with_its_reason():
    options = {f.name for f in dataclasses.fields(ExtractConfig)}
    setting_fields = {f.name for f in dataclasses.fields(FeatureSetting)}
    assert options == set(FROM_CONFIG) | set(NOT_DECIDING) and not set(FROM_CONFIG) & set(NOT_DECIDING)
    assert set(FROM_CONFIG.values()) <= setting_fields
    assert all(len(reason) > 10 for reason in NOT_DECIDING.values())  # a reason, not a placeholder


# an option changed -> the field of the setting FROM_CONFIG names changes (device: no GPU here)
CHANGES = {
    "backbone": {"backbone": "resnet18"},
    "weights": {"weights": "FILE"},
    "seed": {"seed": 1},
    "layers": {"layers": ("features.3",)},
    "pools": {"pools": ("max",)},
    "small_maps": {"layers": ("features.3", "features"), "pools": ("avg", "grid2"), "small_maps": "skip"},
    "image_size": {"image_size": 40},
    "grayscale": {"grayscale": True},
    "jpeg_draft": {"jpeg_draft": False},
    "preprocessing": {"preprocessing": json.dumps({"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                   "interpolation": "bilinear"})},
    "precision": {"precision": "bf16"},
    "dtype": {"dtype": "float16"},
    "channels_last": {"channels_last": False},
    "max_pixels": {"max_pixels": 1000},
    "tta": {"tta": "flip"},
}


@pytest.mark.parametrize("option", sorted(set(FROM_CONFIG) - {"device"}))
def test_each_deciding_option_changes_its_field_of_the_setting(option, weights_file):
    base = dict(layers=("features.3", "features"), pools=("avg", "grid2"), image_size=64) if option == "small_maps" \
        else {}
    kw = {k: (str(weights_file) if v == "FILE" else v) for k, v in CHANGES[option].items()}
    if option == "small_maps":  # at 32 px the last map is 1x1: refused, or left out
        kw["image_size"] = 32
        base_setting = FeatureExtractor(small_config(**base)).setting
    else:
        base_setting = FeatureExtractor(small_config()).setting
    changed = FeatureExtractor(small_config(**kw)).setting
    field = FROM_CONFIG[option]
    assert getattr(changed, field) != getattr(base_setting, field)


def test_precision_is_written_one_way(image_tree, tmp_path):
    r = extract(folder_source(image_tree, "val"), tmp_path / "f.h5", small_config())
    with FeatureStore(r.out) as fs:
        a = fs.attrs
    setting = FeatureSetting.from_json(a["setting"])
    assert a["precision"] == setting.precision == "float32"
    assert json.loads(a["fingerprint"])["setting"]["precision"] == "float32"


def test_an_unfinished_run_resumes_only_with_the_same_setting(image_tree, tmp_path):
    """--no-channels-last (or another device, another torch) used to resume a half-done run,
    mixing rows of two settings in one file."""
    src, out = folder_source(image_tree, "train"), tmp_path / "f.h5"
    extract(src, out, small_config(), unit_items=4, finalize=False)
    from featx.errors import FeatxError

    with pytest.raises(FeatxError, match="unfinished run with other settings"):
        extract(src, out, small_config(channels_last=False), unit_items=4)
    r = extract(src, out, small_config(), unit_items=4)
    assert r.units_done == 0 and r.n_rows == 12


def test_a_complete_file_stays_complete(image_tree, tmp_path):
    """Options that do not decide vectors (the batch size) and files of an older featx,
    whose fingerprint held other things, do not make a complete file 'other settings'."""
    src, out = folder_source(image_tree, "train"), tmp_path / "f.h5"
    extract(src, out, small_config())
    assert extract(src, out, small_config(batch_size=3)).already_complete
    with h5py.File(out, "a") as f:  # as featx 0.1 wrote it (issue 18's release)
        fp = json.loads(f.attrs["fingerprint"])
        s = fp["setting"]
        f.attrs["fingerprint"] = json.dumps({
            "backbone": s["backbone"], "weights": "none", "weights_sha256": s["weights_sha256"], "weights_seed": 0,
            "taps": {name: [layer, pool] for name, layer, pool in s["taps"]},
            "preprocessing": json.loads(s["preprocessing"]), "dtype": s["dtype"], "precision": "None",
            "batch_size": 4, "source": fp["source"]}, sort_keys=True)
        del f.attrs["setting"]
    assert extract(src, out, small_config()).already_complete
    assert not extract(src, out, small_config(pools=("max",)), overwrite=True).already_complete
    assert not parts_dir(out).exists()


def test_cache_digest_and_file_come_from_the_same_record(image_tree, tmp_path):
    ex = FeatureExtractor(small_config(layers=("features.3", "features")))
    assert [t[0] for t in ex.setting.taps] == list(ex.taps)
    for name in ex.taps:
        d = ex.setting.tap(name)
        assert d["layer"] == ex.taps[name][0] and d["weights_sha256"] == ex.weights.sha256
    assert np.isfinite(list(ex.dims.values())).all()
