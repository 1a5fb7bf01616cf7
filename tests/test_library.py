"""What a command guarantees, a Python caller gets too (issue 19, item 2): each command is one
library function, and a classifier is one entry of featx.classifiers.CLASSIFIERS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.sources import folder_source

from conftest import BACKBONE, write_store


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    X = (rng.normal(size=(60, 6)) + 2 * y[:, None]).astype(np.float32)
    train = write_store(tmp_path / "train.h5", X, y, ["a", "b"])
    other_tap = write_store(tmp_path / "other.h5", X, y, ["a", "b"], tap="pooled")
    swapped = write_store(tmp_path / "swapped.h5", X, y, ["b", "a"])
    return train, other_tap, swapped


def test_fit_file_saves_the_bundle_and_its_report(files, tmp_path):
    from featx.bundle import load
    from featx.fit import fit_file

    r = fit_file(files[0], tmp_path / "m.skops", clf="logreg")
    assert r.tap == "features" and r.report_dir == tmp_path / "m-report"
    report = json.loads((tmp_path / "m-report" / "metrics.json").read_text())
    assert report["clf"] == "logreg" and report["metrics"]["accuracy"] > 0.9
    meta = load(tmp_path / "m.skops").meta
    assert meta["tap"] == "features" and meta["classes"] == ["a", "b"] and meta["params"] == r.params


def test_evaluate_file_refuses_what_the_command_refuses(files, tmp_path):
    from featx.fit import evaluate_file, fit_file

    train, other_tap, swapped = files
    fit_file(train, tmp_path / "m.skops", search="none")
    _, m = evaluate_file(tmp_path / "m.skops", train, report_dir=tmp_path / "r")
    assert m["accuracy"] > 0.9 and (tmp_path / "r" / "metrics.json").exists()
    with pytest.raises(FeatxError, match="has no tap 'features', which the model was trained on"):
        evaluate_file(tmp_path / "m.skops", other_tap)
    with pytest.raises(FeatxError, match="label numbers mean different classes"):
        evaluate_file(tmp_path / "m.skops", swapped)


def test_sweep_files_picks_taps_in_the_library(files, tmp_path):
    from featx.sweep import sweep_files

    rows, advice = sweep_files(files[0], None, tmp_path / "sw", taps=["features"])
    assert [r.tap for r in rows] == ["features"] and advice[0].startswith("Best: tap")
    with pytest.raises(FeatxError, match="has none of the taps nothing"):
        sweep_files(files[0], None, tmp_path / "sw2", taps=["nothing"])


def test_finetune_refuses_validation_classes_that_differ(image_tree, tmp_path):
    from featx.finetune import FinetuneConfig, finetune

    train = folder_source(image_tree, "train")
    (image_tree / "val" / "red").rename(image_tree / "val" / "green")  # another class list
    with pytest.raises(FeatxError, match="label numbers mean different classes"):
        finetune(train, folder_source(image_tree, "val"), tmp_path / "run",
                 FinetuneConfig(backbone=BACKBONE, weights="none", image_size=32))
    assert not (tmp_path / "run").exists()


def test_a_new_classifier_is_one_entry(monkeypatch):
    """The in-memory protocol (grid, hold-out, refit) needs nothing but the spec."""
    from featx import classifiers
    from featx.classifiers import CLASSIFIERS, ClassifierSpec
    from featx.fit import fit_arrays

    def knn(n_samples, class_weight, seed, params):
        from sklearn.neighbors import KNeighborsClassifier

        return [], KNeighborsClassifier(n_neighbors=params.pop("k", 5))

    spec = ClassifierSpec("sk_knn", knn, None, {"k": [1, 3, 9]}, "k", ("k",))
    monkeypatch.setitem(CLASSIFIERS, "sk_knn", spec)
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 40)
    X = (rng.normal(size=(80, 4)) + 3 * y[:, None]).astype(np.float32)
    r = fit_arrays(X, y, "sk_knn")
    assert r.params["k"] in (1, 3, 9) and len(r.search) == 3 and r.val_accuracy > 0.9
    assert classifiers.make_classifier("sk_knn", k=2).named_steps["clf"].n_neighbors == 2
