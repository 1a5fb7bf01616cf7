"""Out-of-core fitting: the streamed classifier, the row stream, and the protocol of `featx fit`."""

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.fit import fit_store
from featx.online import StreamingClassifier
from featx.store import FeatureStore
from featx.stream import Part, RowStream

from conftest import write_store


@parametrize_with_checks([StreamingClassifier(max_epochs=40), StreamingClassifier(loss="squared_hinge", max_epochs=40),
                          StreamingClassifier(hidden=16)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def toy(n=4000, classes=5, seed=0):
    X, y = make_classification(n_samples=n, n_features=24, n_informative=12, n_redundant=4, n_classes=classes,
                               n_clusters_per_class=1, class_sep=1.2, flip_y=0.02, random_state=seed)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def sorted_files(tmp_path_factory):
    """Training rows sorted by class, as `featx extract` writes a class-folder tree; a test file."""
    tmp = tmp_path_factory.mktemp("ooc")
    X, y = toy()
    order = np.argsort(y[:3000], kind="stable")
    names = [f"c{k}" for k in range(5)]
    return (write_store(tmp / "train.h5", X[:3000][order], y[:3000][order], names),
            write_store(tmp / "test.h5", X[3000:], y[3000:], names))


def _test_accuracy(result, test_path):
    with FeatureStore(test_path) as ft:
        return float((result.pipeline.predict(ft.features()) == ft.labels).mean())


@pytest.mark.parametrize("clf", ["logreg", "svm", "mlp"])
def test_out_of_core_on_a_class_sorted_file_is_as_accurate_as_in_memory(sorted_files, clf):
    """Contiguous chunks of a class-sorted file hold one class each; the stream must still
    give representative mini-batches (the old chunked partial_fit fell to ~0.57 on
    Fashion-MNIST).  Seeded: the same numbers every run."""
    train, test = sorted_files
    with FeatureStore(train) as fs:
        mem = fit_store(fs, clf=clf)
        ooc = fit_store(fs, clf=clf, memory_budget=64 << 10)  # 64 KB: the 288 KB of features go out of core
    assert not mem.out_of_core and ooc.out_of_core
    a_mem, a_ooc = _test_accuracy(mem, test), _test_accuracy(ooc, test)
    assert a_mem > 0.8, a_mem
    assert abs(a_ooc - a_mem) <= 0.03, (a_mem, a_ooc)
    assert len(ooc.search) == len(mem.search) and ooc.params.keys() == mem.params.keys()  # the same grid
    # 20 % of every class held out (rounded per class), the same rows as in memory
    assert ooc.convergence["epochs"] >= 1 and ooc.val_metrics["n"] == mem.val_metrics["n"] == 599


def test_row_stream_is_representative_and_complete(sorted_files):
    train, _ = sorted_files
    with FeatureStore(train) as fs:
        y = fs.labels
        mask = np.zeros(len(y), bool)
        mask[::3] = True  # a held-out style subset
        stream = RowStream([Part(fs, fs.default_tap, mask)], buffer_rows=400, batch_size=128, seed=0)
        assert all(e - s <= 32 for _, s, e in stream.blocks)
        chunk = fs.dataset().chunks[0]
        assert all(s // chunk == (e - 1) // chunk for _, s, e in stream.blocks)  # one HDF5 chunk per read
        seen = []
        for epoch in (0, 1):
            batches = list(stream(epoch))
            ys = np.concatenate([b[1] for b in batches])
            assert np.array_equal(np.sort(ys), np.sort(y[mask]))  # every selected row, once
            full = [b for b in batches if len(b[1]) == 128]
            assert np.mean([len(np.unique(b[1])) for b in full]) >= 4  # 5 classes, sorted file
            seen.append(np.concatenate([b[0][:, 0] for b in batches]))
        assert not np.array_equal(seen[0], seen[1])  # a new order each epoch
        assert max(len(X) for X, _ in stream.buffers(0)) <= 400 + 32


def test_cli_out_of_core_honours_grid_val_fraction_and_val(sorted_files, tmp_path, run_cli):
    train, test = sorted_files
    r = run_cli("fit", train, "--memory-budget", "64KB", "--grid", "C=0.01,1", "--val-fraction", "0.3",
                "--out", tmp_path / "m.skops")
    assert r.exit_code == 0, r.output
    assert "fitting out of core" in r.stdout and '{"C": 0.01}: val accuracy' in r.stdout and '{"C": 1}' in r.stdout
    assert "final fit: " in r.stdout and "epochs, converged" in r.stdout
    import json

    report = json.loads((tmp_path / "m-report" / "metrics.json").read_text())
    assert report["metrics"]["n"] == 901 and len(report["search"]) == 2  # 30 % of every class, rounded per class
    r = run_cli("fit", train, "--memory-budget", "64KB", "--clf", "mlp", "--class-weight", "balanced",
                "--val", test, "--out", tmp_path / "mlp.skops")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "mlp-report" / "metrics.json").read_text())["metrics"]["n"] == 1000
    r = run_cli("evaluate", tmp_path / "mlp.skops", test)
    assert r.exit_code == 0 and "accuracy" in r.stdout
