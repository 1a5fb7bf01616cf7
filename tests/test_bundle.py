"""Model bundles: every model `featx fit` can build round-trips; nothing else loads."""

import os

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from featx import bundle
from featx.errors import FeatxError
from featx.fit import fit_arrays
from featx.store import check_provenance

from conftest import write_store


def blobs(n=300, d=20, k=3, seed=0):
    X, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32), y


# Every kind of model `featx fit` can build: each --clf, in memory and out of core, with and
# without --class-weight, and the svm on both sides of SVC_MAX_SAMPLES (exact RBF SVC below,
# Nystroem + linear SVM above; the threshold is lowered here to keep the data tiny).
FIT_VARIANTS = [
    (clf, cw, path)
    for clf in ("logreg", "svm", "mlp", "knn")
    for cw in ("none", "balanced")
    for path in ("in-memory", "nystroem", "out-of-core")
    if not (path == "nystroem" and clf != "svm")
    and not (clf == "knn" and (cw == "balanced" or path == "out-of-core"))  # refused (tests/test_knn.py)
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Bundles written by the real `featx fit` command, one per variant."""
    from click.testing import CliRunner

    import featx.classifiers as classifiers
    from featx.cli import main

    tmp = tmp_path_factory.mktemp("bundles")
    X, y = blobs(n=240, d=8, k=3)
    store = write_store(tmp / "train.h5", X, y, ["a", "b", "c"])
    out = {}
    for clf, cw, path in FIT_VARIANTS:
        args = ["fit", str(store), "--clf", clf, "--class-weight", cw, "--search", "none",
                "--out", str(tmp / f"{clf}-{cw}-{path}.skops")]
        if path == "out-of-core":
            args += ["--memory-budget", "1KB"]
        saved = classifiers.SVC_MAX_SAMPLES
        classifiers.SVC_MAX_SAMPLES = 50 if path == "nystroem" else saved
        try:
            r = CliRunner().invoke(main, args, catch_exceptions=False)
        finally:
            classifiers.SVC_MAX_SAMPLES = saved
        assert r.exit_code == 0, (args, r.output)
        out[(clf, cw, path)] = tmp / f"{clf}-{cw}-{path}.skops"
    return X, y, out


def test_every_model_fit_builds_loads_and_predicts(bundles):
    X, y, paths = bundles
    for variant, path in paths.items():
        b = bundle.load(path)
        assert (b.pipeline.predict(X) == y).mean() > 0.9, variant
        np.testing.assert_allclose(b.pipeline.predict_proba(X[:5]).sum(1), 1, atol=1e-6, err_msg=str(variant))
    assert ("svm", "none", "nystroem") in paths
    assert "rbf" in bundle.load(paths[("svm", "none", "nystroem")]).pipeline.named_steps


def test_allow_list_is_exactly_what_fit_builds(bundles):
    """No more and no less: a type fit never builds must not be trusted, and every type it
    builds must load."""
    import skops.io as sio

    _, _, paths = bundles
    needed = set()
    for path in paths.values():
        needed |= set(sio.get_untrusted_types(file=path))
    assert needed == set(bundle.ALLOWED_TYPES)


def test_bundle_round_trip(tmp_path):
    X, y = blobs()
    pipe = fit_arrays(X, y, "logreg", search="none").pipeline
    bundle.save(tmp_path / "m.skops", pipe, {"classes": ["a", "b", "c"], "tap": "t"})
    b = bundle.load(tmp_path / "m.skops")
    np.testing.assert_array_equal(b.pipeline.predict_proba(X), pipe.predict_proba(X))
    assert b.meta["classes"] == ["a", "b", "c"] and b.meta["sklearn_version"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_bundle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    import joblib

    monkeypatch.chdir(tmp_path)
    joblib.dump({"featx_bundle": 1, "meta": "{}", "pipeline": Evil()}, tmp_path / "evil.skops")
    with pytest.raises(FeatxError, match="not a skops bundle.*--allow-pickle"):
        bundle.load(tmp_path / "evil.skops")
    assert not (tmp_path / "PWNED").exists()


class Gadget:
    """A type outside the allow-list whose construction has a visible side effect."""

    def __setstate__(self, state):
        open(state["path"], "w").close()


def test_malicious_skops_bundle_is_refused_and_runs_nothing(tmp_path):
    import skops.io as sio

    target = tmp_path / "created_by_payload"
    g = Gadget.__new__(Gadget)
    g.path = str(target)
    sio.dump({"featx_bundle": 1, "meta": "{}", "pipeline": g}, tmp_path / "evil.skops")
    with pytest.raises(FeatxError, match="outside featx's allow-list.*Gadget"):
        bundle.load(tmp_path / "evil.skops")
    assert not target.exists()


def test_pickle_bundle_only_on_opt_in(tmp_path):
    X, y = blobs()
    pipe = fit_arrays(X, y, "logreg", search="none").pipeline
    bundle.save(tmp_path / "m.joblib", pipe, {"classes": ["a", "b", "c"]}, use_pickle=True)
    with pytest.raises(FeatxError, match="--allow-pickle"):
        bundle.load(tmp_path / "m.joblib")
    with pytest.warns(UserWarning, match="runs any code"):
        assert bundle.load(tmp_path / "m.joblib", allow_pickle=True).meta["classes"] == ["a", "b", "c"]



def test_check_features_names_both_sides():
    with pytest.raises(FeatxError, match="backbone is 'resnet50' there but the model was trained on backbone 'vgg16'"):
        check_provenance({"backbone": "vgg16"}, {"backbone": "resnet50"}, "x.h5")
