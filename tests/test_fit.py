import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs, make_classification

from featx import bundle
from featx.classifiers import make_classifier, parse_grid
from featx.errors import FeatxError
from featx.fit import fit_arrays
from featx.metrics import evaluate

from conftest import write_store


def blobs(n=300, d=20, k=3, seed=0):
    X, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32), y


@pytest.mark.parametrize("clf", ["logreg", "svm", "mlp", "knn"])
def test_each_classifier_separates_blobs(clf):
    X, y = blobs()
    Xt, yt = blobs(seed=0)[0][:100] + 0.1, blobs()[1][:100]
    r = fit_arrays(X, y, clf, search="none")
    assert evaluate(r.pipeline, Xt, yt)["accuracy"] > 0.95
    assert r.pipeline.steps[0][0] == "scale"  # scaling lives inside the pipeline


def test_svm_switches_to_kernel_approximation_for_many_samples():
    assert type(make_classifier("svm", n_samples=100).named_steps["clf"].estimator).__name__ == "SVC"
    big = make_classifier("svm", n_samples=50_000)
    assert "rbf" in big.named_steps and type(big.named_steps["rbf"]).__name__ == "Nystroem"


def test_kernel_approximation_path_fits_and_gives_probabilities(monkeypatch):
    import featx.classifiers as c

    monkeypatch.setattr(c, "SVC_MAX_SAMPLES", 100)
    X, y = blobs(n=400)
    r = fit_arrays(X, y, "svm", search="none")
    assert "rbf" in r.pipeline.named_steps
    assert evaluate(r.pipeline, X, y)["accuracy"] > 0.95
    np.testing.assert_allclose(r.pipeline.predict_proba(X[:5]).sum(1), 1, atol=1e-6)


def test_warm_started_path_selects_like_independent_fits():
    """The warm-start speed-up must not change which C wins, nor its validation accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification(n_samples=900, n_features=30, n_informative=6, flip_y=0.2, random_state=1)
    X = X.astype(np.float32)
    Cs = [1e-4, 1e-3, 1e-2, 1e-1, 1, 10]
    r = fit_arrays(X[:600], y[:600], "logreg", X[600:], y[600:], search={"C": Cs}, refit=False)
    s = StandardScaler().fit(X[:600])
    cold = [LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(s.transform(X[:600]), y[:600])
            .score(s.transform(X[600:]), y[600:]) for C in Cs]
    warm = [row["val_accuracy"] for row in r.search]
    np.testing.assert_allclose(warm, cold, atol=0.01)
    assert r.params["C"] == Cs[int(np.argmax(warm))]
    assert r.val_metrics["accuracy"] == max(warm)


def test_search_picks_weak_regularisation_on_clean_separable_data():
    X, y = make_classification(n_samples=2000, n_features=10, n_informative=10, n_redundant=0,
                               class_sep=1.0, flip_y=0, random_state=0)
    r = fit_arrays(X.astype(np.float32), y, "logreg", search={"C": [1e-4, 1e-3, 1e-2, 1, 10]})
    assert r.params["C"] >= 1e-2  # 1e-4 shrinks everything to chance
    assert r.val_metrics["accuracy"] > 0.7  # linear ceiling of this data is ~0.77
    assert len(r.search) == 5 and r.pipeline.named_steps["clf"].C == r.params["C"]


def test_default_grid_has_at_least_eight_values():
    X, y = blobs()
    assert len(fit_arrays(X, y, "logreg").search) >= 8


def test_grid_parsing():
    assert parse_grid("C=0.01,0.1,1") == {"C": [0.01, 0.1, 1]}
    assert parse_grid("alpha=1e-4;hidden=64,128") == {"alpha": [1e-4], "hidden": [64, 128]}
    with pytest.raises(FeatxError, match="expected NAME="):
        parse_grid("0.1,1")


def test_single_class_and_unlabeled_are_refused():
    X, _ = blobs()
    with pytest.raises(FeatxError, match="single class"):
        fit_arrays(X, np.zeros(len(X), int))
    with pytest.raises(FeatxError, match="unlabeled"):
        fit_arrays(X, -np.ones(len(X), int))


def test_metrics_include_top5_and_per_class():
    X, y = blobs(n=400, k=7)
    r = fit_arrays(X, y, "logreg", search="none")
    m = evaluate(r.pipeline, X, y, [f"c{i}" for i in range(7)])
    assert 0.9 < m["accuracy"] <= m["top5_accuracy"]
    assert set(m["per_class"]) == {f"c{i}" for i in range(7)}
    assert np.asarray(m["confusion_matrix"]).sum() == len(y)


# -- CLI ----------------------------------------------------------------------------------


def test_cli_fit_evaluate_and_reports(tmp_path, run_cli):
    X, y = blobs(n=600, k=3)
    tr = write_store(tmp_path / "train.h5", X[:400], y[:400], ["a", "b", "c"])
    te = write_store(tmp_path / "test.h5", X[400:], y[400:], ["a", "b", "c"])
    r = run_cli("fit", tr, "--clf", "logreg", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert "selected {\"C\":" in r.stdout and "validation:" in r.stdout and "accuracy" in r.stdout
    assert (tmp_path / "m-report" / "confusion_matrix.png").stat().st_size > 1000
    r = run_cli("evaluate", tmp_path / "m.skops", te, "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())["metrics"]
    assert m["accuracy"] > 0.95 and set(m) >= {"balanced_accuracy", "macro_f1", "per_class"}
    assert (tmp_path / "rep" / "confusion_matrix.png").exists()


def test_cli_evaluate_refuses_mismatched_features(tmp_path, run_cli):
    X, y = blobs()
    tr = write_store(tmp_path / "train.h5", X, y, ["a", "b", "c"])
    other = write_store(tmp_path / "other.h5", X, y, ["a", "b", "c"], backbone="resnet50")
    assert run_cli("fit", tr, "--search", "none", "--out", tmp_path / "m.skops").exit_code == 0
    r = run_cli("evaluate", tmp_path / "m.skops", other)
    assert r.exit_code == 1
    assert "'resnet50' there" in r.stderr and "'mobilenet_v2'" in r.stderr and "Traceback" not in r.output
    wrong_dim = write_store(tmp_path / "dim.h5", X[:, :5], y, ["a", "b", "c"])
    r = run_cli("evaluate", tmp_path / "m.skops", wrong_dim)
    assert r.exit_code == 1 and "dim is 5 there" in r.stderr


def test_cli_fit_with_a_val_file_checks_it_first(tmp_path, run_cli):
    X, y = blobs(n=600, k=3)
    tr = write_store(tmp_path / "train.h5", X[:400], y[:400], ["a", "b", "c"])
    ok = write_store(tmp_path / "val.h5", X[400:], y[400:], ["a", "b", "c"])
    r = run_cli("fit", tr, "--val", ok, "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m-report" / "metrics.json").read_text())["metrics"]["n"] == 200
    renamed = write_store(tmp_path / "renamed.h5", X[400:], y[400:], ["a", "c", "b"])
    r = run_cli("fit", tr, "--val", renamed, "--out", tmp_path / "m2.skops")
    assert r.exit_code == 1 and "label numbers mean different classes" in r.stderr
    other_tap = write_store(tmp_path / "tap.h5", X[400:], y[400:], ["a", "b", "c"], tap="features.3")
    r = run_cli("fit", tr, "--val", other_tap, "--out", tmp_path / "m3.skops")
    assert r.exit_code == 1 and "has no tap 'features', which the training file has; it has: features.3." in r.stderr
    assert not (tmp_path / "m2.skops").exists() and not (tmp_path / "m3.skops").exists()


def test_cli_out_of_core_with_tiny_budget(tmp_path, run_cli):
    X, y = blobs(n=2000, d=16, k=3)
    tr = write_store(tmp_path / "train.h5", X, y, ["a", "b", "c"])
    r = run_cli("fit", tr, "--memory-budget", "10KB", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert "fitting out of core" in r.stdout
    b = bundle.load(tmp_path / "m.skops")
    assert b.meta["out_of_core"] and (b.pipeline.predict(X) == y).mean() > 0.95


def test_cli_class_weight_balanced(tmp_path, run_cli):
    X, y = blobs(n=300, k=2)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:15]])  # 10:1 skew
    tr = write_store(tmp_path / "train.h5", X[keep], y[keep], ["a", "b"])
    r = run_cli("fit", tr, "--class-weight", "balanced", "--search", "none", "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert bundle.load(tmp_path / "m.skops").pipeline.named_steps["clf"].class_weight == "balanced"


def test_unknown_hyper_parameters_are_refused_on_every_path():
    """--grid gamma=... used to vanish silently above SVC_MAX_SAMPLES (Nystroem path)."""
    from featx.classifiers import make_online_classifier

    assert make_classifier("svm", n_samples=50_000, gamma=0.5).named_steps["rbf"].gamma == 0.5
    for kw in ({"n_samples": 100}, {"n_samples": 50_000}):
        with pytest.raises(FeatxError, match="unknown hyper-parameters for svm: depth"):
            make_classifier("svm", depth=3, **kw)
    with pytest.raises(FeatxError, match="unknown hyper-parameters for logreg: alpha"):
        make_online_classifier("logreg", 1000, alpha=1.0)
    with pytest.raises(FeatxError, match="unknown hyper-parameters for mlp: C"):
        make_online_classifier("mlp", 1000, C=1.0)
