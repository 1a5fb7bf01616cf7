"""`featx fit --clf knn`: cosine kNN with DINO's vote (featx.knn), chosen on the hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.errors import FeatxError
from featx.fit import fit_arrays
from featx.knn import CosineKNN

from conftest import write_store


def sectors(n: int, seed: int):
    """Points around the origin, labelled by quadrant parity (an XOR of the signs): no line
    separates them, their direction does."""
    rng = np.random.default_rng(seed)
    a, r = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 2.0, n)
    X = np.c_[r * np.cos(a), r * np.sin(a)].astype(np.float32)
    return X, ((a // (np.pi / 2)) % 2).astype(np.int64)


def test_knn_is_right_where_no_linear_classifier_can_be():
    X, y = sectors(400, seed=0)
    Xt, yt = sectors(400, seed=1)
    knn = fit_arrays(X, y, "knn")
    logreg = fit_arrays(X, y, "logreg")
    assert (knn.pipeline.predict(Xt) == yt).mean() >= 0.97
    assert (logreg.pipeline.predict(Xt) == yt).mean() <= 0.65


def test_blocked_search_finds_the_exact_neighbours_in_any_block_size():
    rng = np.random.default_rng(0)
    X, q = rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((50, 16)).astype(np.float32)
    y = rng.integers(0, 4, 300)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1)[:, :7]
    for block in (7, 64, 4096):  # blocks smaller than k, uneven, and one block for everything
        knn = CosineKNN(k=7, block_rows=block).fit(X, y)
        sims, labels = knn.neighbours(q, 7)
        np.testing.assert_allclose(sims, np.take_along_axis(cos, order, 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(labels, y[order])


def test_votes_are_probabilities_and_majority_counts_neighbours():
    X = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1]], np.float32)
    y = np.array([0, 0, 0, 1, 1])
    q = np.array([[1, 0.05]], np.float32)
    p = CosineKNN(k=5, vote="majority").fit(X, y).predict_proba(q)
    np.testing.assert_allclose(p, [[0.6, 0.4]])
    t = CosineKNN(k=5, vote="temperature").fit(X, y).predict_proba(q)
    assert t[0, 0] > 0.999 and abs(t.sum() - 1) < 1e-9  # the near rows outvote the far ones by far
    assert CosineKNN(k=3).fit(X, y).predict(np.array([[0.05, 1]], np.float32)).tolist() == [1]


def test_k_is_chosen_on_the_hold_out():
    """With a fifth of the labels flipped, one neighbour copies the noise; many average it out."""
    rng = np.random.default_rng(0)
    X, y = sectors(1000, seed=2)
    flip = rng.random(len(y)) < 0.2
    noisy = np.where(flip, 1 - y, y)
    r = fit_arrays(X, noisy, "knn")
    by_k = {row["params"]["k"]: row["val_accuracy"] for row in r.search if row["params"]["vote"] == "majority"}
    assert len(r.search) == 12 and by_k[1] < max(by_k.values()) - 0.05
    assert r.params["k"] >= 10 and r.val_accuracy == max(row["val_accuracy"] for row in r.search)


def test_knn_refuses_class_weights_and_rows_beyond_the_budget_even_as_float16(tmp_path, run_cli):
    X, y = sectors(60, seed=0)
    with pytest.raises(FeatxError, match="--clf knn has no class weights"):
        fit_arrays(X, y, "knn", class_weight="balanced")
    path = write_store(tmp_path / "f.h5", X, y, ["even", "odd"])
    for budget in (None, "100B"):
        extra = ["--memory-budget", budget] if budget else []
        r = run_cli("fit", path, "--clf", "knn", "--class-weight", "balanced", *extra, "--out", tmp_path / "m.skops")
        assert r.exit_code == 1 and "--clf knn has no class weights" in r.stderr
    r = run_cli("fit", path, "--clf", "knn", "--memory-budget", "100B", "--out", tmp_path / "m.skops")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert ("--clf knn keeps every training row in the model: 240 bytes of them as float16 exceed the memory budget "
            "of 100 bytes") in r.stderr  # 60 rows x 2 features x 2 bytes
    assert not (tmp_path / "m.skops").exists()


@pytest.mark.parametrize("val_file", [False, True])
def test_out_of_core_knn_chooses_and_predicts_as_in_memory(tmp_path, run_cli, val_file):
    """Beyond the budget as float32 but within it as float16: the rows are read block by
    block (here 256 rows a block) and kept as float16; the same hold-out, the same choice."""
    from featx import bundle

    X, y = sectors(3000, seed=3)
    flip = np.random.default_rng(0).random(len(y)) < 0.15
    y = np.where(flip, 1 - y, y)
    path = write_store(tmp_path / "f.h5", X, y, ["even", "odd"])
    extra = []
    if val_file:
        Xv, yv = sectors(600, seed=4)
        extra = ["--val", write_store(tmp_path / "v.h5", Xv, yv, ["even", "odd"])]
    budget = str(len(X) * 2 * 3) + "B"  # 18,000 bytes: the float32 rows (24,000) do not fit, float16 (12,000) do
    r = run_cli("fit", path, "--clf", "knn", *extra, "--memory-budget", budget, "--out", tmp_path / "ooc.skops")
    assert r.exit_code == 0, r.output
    assert "fitting out of core" in r.stdout
    r2 = run_cli("fit", path, "--clf", "knn", *extra, "--out", tmp_path / "mem.skops")
    assert r2.exit_code == 0, r2.output
    ooc, mem = bundle.load(tmp_path / "ooc.skops"), bundle.load(tmp_path / "mem.skops")
    assert ooc.meta["out_of_core"] and not mem.meta["out_of_core"]
    assert ooc.meta["params"]["k"] >= 10 and mem.meta["params"]["k"] >= 10  # k = 1 copies the flipped labels
    knn = ooc.pipeline.named_steps["clf"]
    assert knn.train_.dtype == np.float16 and len(knn.train_) == len(X) + (600 if val_file else 0)
    Xq, _ = sectors(500, seed=5)
    assert (ooc.pipeline.predict(Xq) == mem.pipeline.predict(Xq)).mean() >= 0.97  # float16 rows: near ties move


def test_out_of_core_search_scores_every_point_as_in_memory():
    """The block-by-block scoring of the hold-out adds up to the in-memory scores (up to
    float16's rounding of the kept rows)."""
    from featx.fit import fit_store
    from featx.store import FeatureStore

    X, y = sectors(3000, seed=3)
    y = np.where(np.random.default_rng(0).random(len(y)) < 0.15, 1 - y, y)
    import tempfile, pathlib  # noqa: E401

    with tempfile.TemporaryDirectory() as tmp, FeatureStore(write_store(pathlib.Path(tmp) / "f.h5", X, y,
                                                                        ["a", "b"])) as fs:
        ooc, mem = fit_store(fs, None, "knn", memory_budget=18000), fit_store(fs, None, "knn")
    assert ooc.out_of_core and not mem.out_of_core and len(ooc.search) == len(mem.search) == 12
    for a, b in zip(ooc.search, mem.search):
        assert a["params"] == b["params"] and abs(a["val_accuracy"] - b["val_accuracy"]) <= 0.02


def test_knn_grid_from_the_command_line(tmp_path, run_cli):
    X, y = sectors(200, seed=0)
    path = write_store(tmp_path / "f.h5", X, y, ["even", "odd"])
    r = run_cli("fit", path, "--clf", "knn", "--grid", "k=3,7", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert '{"k": 3}' in r.stdout and '{"k": 7}' in r.stdout
    r = run_cli("fit", path, "--clf", "knn", "--grid", "k=0", "--out", tmp_path / "m.skops")
    assert r.exit_code == 1 and "k=0 is out of range" in r.stderr


@parametrize_with_checks([CosineKNN(k=3, block_rows=7)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_float16_keeps_half_the_rows_bytes_and_the_same_answers(tmp_path, run_cli):
    from featx import bundle

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 300)
    X = (rng.standard_normal((900, 64)) + 2 * np.eye(3, 64)[y]).astype(np.float32)
    path = write_store(tmp_path / "f.h5", X, y, ["a", "b", "c"])
    for dtype in ("float32", "float16"):
        r = run_cli("fit", path, "--clf", "knn", "--knn-dtype", dtype, "--out", tmp_path / f"{dtype}.skops")
        assert r.exit_code == 0, r.output
    full, half = (bundle.load(tmp_path / f"{d}.skops") for d in ("float32", "float16"))
    assert half.pipeline.named_steps["clf"].train_.dtype == np.float16
    assert (tmp_path / "float16.skops").stat().st_size < 0.6 * (tmp_path / "float32.skops").stat().st_size
    Xq = (rng.standard_normal((300, 64)) + 2 * np.eye(3, 64)[y[::3]]).astype(np.float32)
    assert (full.pipeline.predict(Xq) == half.pipeline.predict(Xq)).mean() >= 0.99
    r = run_cli("fit", path, "--clf", "logreg", "--knn-dtype", "float16", "--out", tmp_path / "m.skops")
    assert r.exit_code == 1 and "--knn-dtype is for --clf knn" in r.stderr and not (tmp_path / "m.skops").exists()


def test_the_validation_report_is_the_chosen_models_own(monkeypatch):
    """The search's neighbours give the report: the same numbers as scoring the chosen model
    on the hold-out again, without a second search."""
    from featx.fit import holdout
    from featx.metrics import evaluate

    X, y = sectors(600, seed=6)
    y = np.where(np.random.default_rng(1).random(len(y)) < 0.1, 1 - y, y)
    r = fit_arrays(X, y, "knn", refit=False)
    tr, va = holdout(y, 0.2, 0)
    again = evaluate(r.pipeline, X[va], y[va])
    assert r.val_metrics["accuracy"] == again["accuracy"] == r.val_accuracy
    assert r.val_metrics["confusion_matrix"] == again["confusion_matrix"]
    searches = []
    real = CosineKNN.neighbours
    monkeypatch.setattr(CosineKNN, "neighbours", lambda self, *a: searches.append(1) or real(self, *a))
    fit_arrays(X, y, "knn")
    assert len(searches) == 1  # one search for the grid and the report
