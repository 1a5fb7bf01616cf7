"""`featx fit --tap A --tap B`: taps combined side by side, recorded in the bundle, made again
in one pass by predict, and required of every file the model meets."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from featx import bundle
from featx.fit import fit_arrays, fit_store
from featx.knn import CosineKNN, unit_rows
from featx.store import FeatureStore

from conftest import BACKBONE, make_image
from test_knn import sectors

COLORS = {"cherry": (200, 40, 40), "leaf": (40, 180, 40), "sky": (40, 40, 200)}
SMALL = ["--backbone", BACKBONE, "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0"]
TAPS = ["--tap", "features.4", "--tap", "features.6"]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """photos/ and test/ (class folders), their features at two taps, and a test file with one of them."""
    from click.testing import CliRunner

    from featx.cli import main

    root = tmp_path_factory.mktemp("combined")
    for k, (name, rgb) in enumerate(COLORS.items()):
        for i in range(8):
            make_image(root / "photos" / name / f"{i}.jpg", rgb, noise=90, seed=100 * k + i)
        for i in range(5):
            make_image(root / "test" / name / f"{i}.jpg", rgb, noise=90, seed=1000 + 100 * k + i)
    run = CliRunner().invoke
    two = ["--layer", "features.4", "--layer", "features.6", "--pool", "grid2"]
    ok(run(main, ["extract", str(root / "photos"), *SMALL, *two, "--out", str(root / "train.h5")]))
    ok(run(main, ["extract", str(root / "test"), *SMALL, *two, "--out", str(root / "test.h5")]))
    ok(run(main, ["extract", str(root / "test"), *SMALL, "--layer", "features.6", "--pool", "grid2",
                  "--out", str(root / "test6.h5")]))
    return root


@pytest.mark.parametrize("clf", ["logreg", "knn"])
def test_combined_taps_fit_evaluate_and_predict_alike(clf, files, tmp_path, run_cli):
    model = tmp_path / "m.skops"
    r = ok(run_cli("fit", files / "train.h5", "--clf", clf, *TAPS, "--out", model))
    assert f"({clf} on features.4+features.6" in r.stdout
    b = bundle.load(model)
    assert [t["tap"] for t in b.meta["taps"]] == ["features.4", "features.6"]
    with FeatureStore(files / "test.h5") as fs:
        X = fs.features(("features.4", "features.6"))
        assert b.meta["dim"] == X.shape[1] == fs.dim("features.4") + fs.dim("features.6")
        labels = [b.classes[int(c)] for c in b.pipeline.predict(X)]
        proba = b.pipeline.predict_proba(X)
        truth = [fs.classes[i] for i in fs.labels]
    r = ok(run_cli("evaluate", model, files / "test.h5"))
    assert "accuracy" in r.stdout
    ok(run_cli("predict", model, files / "test", "--out", tmp_path / "p.csv"))
    rows = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert [row["predicted"] for row in rows] == labels  # the images' features made again, both taps
    np.testing.assert_allclose([[float(row[f"p_{c}"]) for c in b.classes] for row in rows], proba, atol=1e-4)
    assert np.mean(np.array(labels) == np.array(truth)) >= 0.8


def test_a_file_without_one_of_the_taps_is_refused(files, tmp_path, run_cli):
    model = tmp_path / "m.skops"
    ok(run_cli("fit", files / "train.h5", *TAPS, "--out", model))
    r = run_cli("evaluate", model, files / "test6.h5")
    assert r.exit_code == 1 and "has no tap 'features.4', which the model was trained on" in r.stderr
    r = run_cli("fit", files / "train.h5", *TAPS, "--val", files / "test6.h5", "--out", tmp_path / "v.skops")
    assert r.exit_code == 1 and "has no tap 'features.4'" in r.stderr and not (tmp_path / "v.skops").exists()
    r = run_cli("fit", files / "train.h5", "--tap", "features.6", "--tap", "nope", "--out", tmp_path / "n.skops")
    assert r.exit_code == 1 and "has no tap 'nope'" in r.stderr


@pytest.mark.parametrize("budget", [[], ["--memory-budget", "16KB"]])
def test_knn_tap_widths_are_not_a_grid_parameter(files, tmp_path, run_cli, budget):
    """featx sets knn's tap widths from the taps; a --grid naming them is refused in one
    sentence, in memory and out of core, for one tap and for two."""
    for taps in (TAPS, ["--tap", "features.6"]):
        r = run_cli("fit", files / "train.h5", "--clf", "knn", *taps, "--grid", "k=3;blocks=1,2", *budget,
                    "--out", tmp_path / "k.skops")
        assert r.exit_code == 1 and "unknown hyper-parameters for knn: blocks" in r.stderr, r.output
        assert "Traceback" not in r.output and not (tmp_path / "k.skops").exists()


def test_one_tap_repeated_is_one_tap(files, tmp_path, run_cli):
    model = tmp_path / "m.skops"
    r = ok(run_cli("fit", files / "train.h5", "--tap", "features.6", "--tap", "features.6", "--out", model))
    assert "on features.6," in r.stdout and "taps" not in bundle.load(model).meta


@pytest.mark.parametrize("clf", ["logreg", "knn"])
def test_out_of_core_combined_taps_agree_with_in_memory(clf, files):
    with FeatureStore(files / "train.h5") as fs:
        taps = ("features.4", "features.6")
        grid = {"k": [3], "vote": ["temperature"]} if clf == "knn" else {"C": [0.1]}
        mem = fit_store(fs, taps, clf, search=grid)
        budget = fs.nbytes(taps) * 2 // 3  # above the float16 rows knn keeps, below the features as float32
        ooc = fit_store(fs, taps, clf, search=grid, memory_budget=budget)
        assert ooc.out_of_core and not mem.out_of_core
        with FeatureStore(files / "test.h5") as ts:
            X = ts.features(taps)
            agree = np.mean(mem.pipeline.predict(X) == ooc.pipeline.predict(X))
    assert agree >= (1.0 if clf == "knn" else 0.85), agree


def test_knn_weighs_each_combined_tap_alike():
    """A narrow tap that separates the classes, beside a wide tap of loud noise: rows scaled
    to unit length as a whole are the noise's; scaled tap by tap, the narrow tap votes half."""
    rng = np.random.default_rng(0)
    A, y = sectors(600, seed=0)
    At, yt = sectors(300, seed=1)
    noise = lambda n: 50 * rng.standard_normal((n, 256)).astype(np.float32)  # noqa: E731
    X, Xt = np.c_[A, noise(600)], np.c_[At, noise(300)]
    whole = fit_arrays(X, y, "knn").pipeline.predict(Xt)
    taps = fit_arrays(X, y, "knn", blocks=(2, 256)).pipeline.predict(Xt)
    assert np.mean(whole == yt) < 0.65 and np.mean(taps == yt) > 0.9


def test_unit_rows_by_tap_give_the_mean_cosine():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 40)).astype(np.float32)
    u = unit_rows(np.c_[a, b], (5, 40))
    cos = lambda m: float(m[0] @ m[1] / np.linalg.norm(m[0]) / np.linalg.norm(m[1]))  # noqa: E731
    assert u[0] @ u[1] == pytest.approx((cos(a) + cos(b)) / 2, abs=1e-6)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="do not add up"):
        CosineKNN(blocks=(5, 39)).fit(np.c_[a, b], [0, 1])


def test_a_nonfinite_row_in_any_combined_tap_is_refused_or_dropped(tmp_path, run_cli):
    from test_sweep import store_with_taps

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 40)
    a = (rng.normal(size=(80, 4)) + 3 * y[:, None]).astype(np.float32)
    b = rng.normal(size=(80, 6)).astype(np.float32)
    b[7, 2] = np.nan  # only the second tap is bad, in one row
    path = store_with_taps(tmp_path / "f.h5", {"l1@avg": a, "l2@avg": b}, y, ["x", "y"])
    both = ["--tap", "l1@avg", "--tap", "l2@avg"]
    r = run_cli("fit", path, *both, "--out", tmp_path / "m.skops")
    assert r.exit_code == 1 and "1 of 80 rows have non-finite l1@avg+l2@avg features" in r.stderr
    assert "the first row 7 (i7)" in r.stderr and not (tmp_path / "m.skops").exists()
    r = ok(run_cli("fit", path, *both, "--drop-nonfinite", "--out", tmp_path / "m.skops"))
    assert "leaving out 1 of 80 rows whose l1@avg+l2@avg features are not finite" in r.stdout
    r = run_cli("evaluate", tmp_path / "m.skops", path)
    assert r.exit_code == 1 and "non-finite l1@avg+l2@avg features" in r.stderr
    ok(run_cli("fit", path, "--tap", "l1@avg", "--out", tmp_path / "one.skops"))  # the good tap alone is fine
