import csv

import numpy as np

from featx import sweep as sw
from featx.store import StoreWriter

from conftest import small_config


def store_with_taps(path, taps: dict, y, classes):
    header = {"backbone": "mobilenet_v2", "weights": "w", "weights_sha256": "", "weights_path": "",
              "preprocessing": "{}", "pooling": "{}", "taps": "{}", "fingerprint": str(path), "source": "{}"}
    specs = {t: {"layer": t.split("@")[0], "pool": t.split("@")[1], "dim": v.shape[1]} for t, v in taps.items()}
    w = StoreWriter(path, header, len(y), specs, unit_items=len(y)).prepare(overwrite=True)
    w.add(0, len(y), taps, y, [f"i{k}" for k in range(len(y))], [], [])
    w.finalize(classes, next(iter(taps)))
    return path


def test_best_tap_known_by_construction(tmp_path, run_cli):
    """The label is visible in an early tap only; deeper taps see a fading copy, the last none."""
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 3, n)
    signal = np.eye(3)[y] * 2.0

    def tap(strength):
        return (strength * signal @ rng.normal(size=(3, 16)) + rng.normal(size=(n, 16))).astype(np.float32)

    taps = {"features.2@avg": tap(1.0), "features.10@avg": tap(0.3), "features.18@avg": tap(0.0)}
    path = store_with_taps(tmp_path / "t.h5", taps, y, ["a", "b", "c"])
    r = run_cli("sweep", "--train", path, "--out", tmp_path / "sw")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    acc = {row["tap"]: float(row["val_accuracy"]) for row in rows}
    assert acc["features.2@avg"] > acc["features.10@avg"] > acc["features.18@avg"]
    assert [int(row["depth"]) for row in rows] == [0, 1, 2]
    assert "Best: tap features.2 with avg pooling" in r.stdout
    assert "featx fit FEATURES.h5 --tap features.2@avg" in r.stdout
    assert "--unfreeze 16" in r.stdout  # mobilenet_v2 has blocks features.0..18
    assert "small for fine-tuning" in r.stdout  # 480 training images
    assert (tmp_path / "sw" / "accuracy_by_depth.png").stat().st_size > 5000
    assert (tmp_path / "sw" / "recommendation.txt").read_text().startswith("Best: tap features.2")


def test_sweep_combines_taps_that_each_see_half_of_the_label(tmp_path, run_cli):
    """Four classes: one tap tells {0,1} from {2,3}, another {0,2} from {1,3}, a third is
    noise. Alone each is right about half the time; the best two combined, nearly always."""
    rng = np.random.default_rng(2)
    n = 800
    y = rng.integers(0, 4, n)

    def tap(bit):
        sign = (2.0 * bit - 1)[:, None] if bit is not None else 0.0
        return (2.0 * sign * np.ones((1, 6)) + rng.normal(size=(n, 6))).astype(np.float32)

    taps = {"features.2@avg": tap(y // 2), "features.5@avg": tap(y % 2), "features.9@avg": tap(None)}
    path = store_with_taps(tmp_path / "t.h5", taps, y, ["a", "b", "c", "d"])
    r = run_cli("sweep", "--train", path, "--out", tmp_path / "sw")
    assert r.exit_code == 0, r.output
    single = {row["tap"]: row for row in csv.DictReader(open(tmp_path / "sw" / "sweep.csv"))}
    assert max(float(row["val_accuracy"]) for row in single.values()) < 0.6
    assert all(0.0 < float(row["knn_accuracy"]) < 0.6 for row in single.values())
    combos = {row["taps"]: row for row in csv.DictReader(open(tmp_path / "sw" / "combined.csv"))}
    pair = next(row for name, row in combos.items() if name.count("+") == 1)
    assert set(pair["taps"].split("+")) == {"features.2@avg", "features.5@avg"}
    assert float(pair["val_accuracy"]) > 0.9 and float(pair["knn_accuracy"]) > 0.85 and pair["extra_dim"] == "6"
    assert any(name.count("+") == 2 for name in combos) and all(row["tta"] == "none" for row in combos.values())
    assert "2 taps combined" in r.stdout and "worth its cost." in r.stdout
    first, second = pair["taps"].split("+")
    assert f"Best trick: featx fit FEATURES.h5 --tap {first} --tap {second}" in r.stdout


def test_sweep_refuses_a_val_file_with_other_classes_or_taps(tmp_path, run_cli):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    taps = {"features.2@avg": rng.normal(size=(90, 4)).astype(np.float32)}
    train = store_with_taps(tmp_path / "train.h5", taps, y, ["a", "b", "c"])
    reordered = store_with_taps(tmp_path / "val.h5", taps, y, ["b", "a", "c"])
    r = run_cli("sweep", "--train", train, "--val", reordered, "--out", tmp_path / "sw")
    assert r.exit_code == 1 and "label numbers mean different classes" in r.stderr and "Traceback" not in r.output
    other = store_with_taps(tmp_path / "other.h5", {"features.5@avg": taps["features.2@avg"]}, y, ["a", "b", "c"])
    r = run_cli("sweep", "--train", train, "--val", other, "--out", tmp_path / "sw")
    assert r.exit_code == 1 and "has no tap 'features.2@avg'" in r.stderr
    assert not (tmp_path / "sw" / "sweep.csv").exists()


def test_last_tap_best_says_features_transfer():
    rows = [sw.ProbeRow("a", "a", 0, "avg", 8, 0.70, 1.0, 0.1), sw.ProbeRow("b", "b", 1, "avg", 8, 0.90, 1.0, 0.1)]
    advice = sw.recommend(rows, 50_000, 10)
    assert "transfer well" in advice[2] and "large enough" in advice[3] and "5000 per class" in advice[3]


def test_max_per_class_subsample_keeps_order():
    labels = np.array([0] * 10 + [1] * 3 + [0] * 5)
    idx = sw.per_class_subset(labels, 4)
    assert (np.diff(idx) > 0).all()
    assert np.bincount(labels[idx]).tolist() == [4, 3]


def test_sweep_decodes_and_forwards_each_image_once(image_tree, tmp_path, monkeypatch):
    from featx.decode import Decoded
    from featx.taps import TapRecorder

    decoded, forwards = [], []
    real_load, real_run = Decoded.load, TapRecorder.run
    monkeypatch.setattr(Decoded, "load", lambda self, i, *a: decoded.append(self.source.ids[i]) or real_load(self, i, *a))
    monkeypatch.setattr(TapRecorder, "run", lambda self, x: forwards.append(len(x)) or real_run(self, x))
    cfg = small_config()
    rows, advice = sw.sweep_images(str(image_tree), str(tmp_path / "sw"), "mobilenet_v2", "none", ["blocks"],
                                   ["avg", "grid2"], image_size=32,
                                   extract_kw={"batch_size": cfg.batch_size, "workers": 0}, flip=False)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 18  # 12 train + 6 val, once each
    # per file, a one-image blank measures the tap widths; then one forward per batch
    # serves every tap: train (12 images) in 4+4+4, val (6) in 4 and 2 padded to 4
    # (then the forward time to a few layers is measured on random images: no decoding)
    assert forwards[:7] == [1, 4, 4, 4, 1, 4, 4]
    assert len(rows) == 38 - 5 and {r.pool for r in rows} == {"avg", "grid2"}  # no grid2 on the five 1x1 maps
    from featx.store import FeatureStore

    with FeatureStore(tmp_path / "sw" / "features_train.h5") as fs:  # kept for `featx fit --tap`
        assert len(fs.taps) == 33 and len(fs) == 12
