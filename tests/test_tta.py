"""`featx extract --tta flip`: each vector the mean of an image's and its mirror image's."""

from __future__ import annotations

import numpy as np
from PIL import Image

from featx.extract import extract
from featx.predict import predict_images
from featx.sources import folder_source
from featx.store import FeatureStore

from conftest import small_config


def photos(root, n=4, symmetric=False):
    """root/{a,b}/*.png of random pixels (symmetric: each row a palindrome); PNG, so the
    pixels are exactly these."""
    for c, (cls, base) in enumerate({"a": 60, "b": 180}.items()):
        for i in range(n):
            rng = np.random.default_rng(10 * c + i)
            half = rng.integers(base - 50, base + 50, (32, 16, 3)).astype(np.uint8)
            right = half[:, ::-1] if symmetric else rng.integers(base - 50, base + 50, (32, 16, 3)).astype(np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([half, right], 1)).save(root / cls / f"{i}.png")
    return root


def mirror(src, dst):
    for p in src.rglob("*.png"):
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(p))[:, ::-1]).save(dst / p.parent.name / p.name)
    return dst


def same(a, b) -> bool:
    """Equal up to float rounding, relative to the vectors' scale (random weights make tiny ones)."""
    return np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def differ(a, b) -> bool:
    return np.abs(a - b).max() > 1e-2 * np.abs(b).max()


def features(root, out, weights_file, **kw):
    r = extract(folder_source(root), out, small_config(weights_file, **kw))
    with FeatureStore(r.out) as fs:
        return fs.features(), fs.attrs, r


def test_flip_is_the_identity_on_symmetric_images_and_blind_to_mirroring(tmp_path, weights_file):
    sym = photos(tmp_path / "sym", symmetric=True)
    plain, _, _ = features(sym, tmp_path / "p.h5", weights_file)
    flip, attrs, _ = features(sym, tmp_path / "f.h5", weights_file, tta="flip")
    assert attrs["tta"] == "flip"
    assert same(flip, plain)
    asym = photos(tmp_path / "asym")
    x, _, _ = features(asym, tmp_path / "x.h5", weights_file, tta="flip")
    xm, _, _ = features(mirror(asym, tmp_path / "mirrored"), tmp_path / "xm.h5", weights_file, tta="flip")
    assert same(x, xm)  # an image and its mirror: one vector
    none, _, _ = features(asym, tmp_path / "n.h5", weights_file)
    assert differ(x, none)  # and not the vector of the image alone


def test_a_cached_plain_vector_is_never_served_to_a_flip_run(tmp_path, weights_file):
    root = photos(tmp_path / "asym")
    cache = str(tmp_path / "cache")
    none, _, r = features(root, tmp_path / "n.h5", weights_file, cache=cache)
    again, _, r2 = features(root, tmp_path / "n2.h5", weights_file, cache=cache)
    assert r2.cache_hits == len(none)  # the cache is in use
    flip, _, r3 = features(root, tmp_path / "f.h5", weights_file, cache=cache, tta="flip")
    assert r3.cache_hits == 0 and differ(flip, none)
    flip2, _, r4 = features(root, tmp_path / "f2.h5", weights_file, cache=cache, tta="flip")
    assert r4.cache_hits == len(flip)
    np.testing.assert_array_equal(flip2, flip)


def test_a_model_fitted_on_flip_features_predicts_with_flip(tmp_path, run_cli, weights_file):
    import csv

    from featx import bundle

    root = photos(tmp_path / "asym", n=6)
    args = ["--backbone", "mobilenet_v2", "--weights", str(weights_file), "--image-size", "32", "--batch-size", "4",
            "--workers", "0"]
    for tta in ("flip", "none"):
        r = run_cli("extract", root, *args, "--tta", tta, "--out", tmp_path / f"{tta}.h5")
        assert r.exit_code == 0, r.output
    r = run_cli("fit", tmp_path / "flip.h5", "--clf", "logreg", "--search", "none", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    b = bundle.load(tmp_path / "m.skops")
    assert b.meta["tta"] == "flip"
    r = run_cli("predict", tmp_path / "m.skops", root, "--out", tmp_path / "p.csv", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 12

    def logit(p):
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    res = predict_images(str(tmp_path / "m.skops"), [str(root)], workers=0)
    with FeatureStore(tmp_path / "flip.h5") as fs:
        want = dict(zip(fs.ids, logit(b.pipeline.predict_proba(fs.features())[:, 0])))
    got = {row["id"]: logit(row["probabilities"]["a"]) for row in res.rows}
    assert got.keys() == want.keys()
    # the probabilities of the stored flip features, image by image (plain features: ~1 apart)
    assert max(abs(got[k] - want[k]) for k in want) < 0.05
    r = run_cli("evaluate", tmp_path / "m.skops", tmp_path / "none.h5")
    assert r.exit_code == 1 and "tta is 'none' there but the model was trained on tta 'flip'" in r.stderr


def test_an_unknown_tta_is_one_sentence(tmp_path, run_cli):
    import pytest

    from featx.errors import FeatxError
    from featx.extractor import FeatureExtractor

    with pytest.raises(FeatxError, match="--tta 'mirror' is not one of none, flip"):
        FeatureExtractor(small_config(tta="mirror"))
    r = run_cli("extract", photos(tmp_path / "p", n=1), "--tta", "mirror", "--out", tmp_path / "f.h5")
    assert r.exit_code == 2 and "'mirror' is not one of 'none', 'flip'" in r.output and not (tmp_path / "f.h5").exists()
