"""Save and load a fitted classifier with the provenance of its features.

A bundle is the fitted Pipeline plus what is needed to make matching features again:
backbone, weights (id and sha256), tap, pooling, preprocessing, feature dimension and
class names.  It is written with skops, whose loader rebuilds objects from an allow-list
of types instead of unpickling: a file that names any other type is refused before
anything in it runs.  joblib (pickle) is available only on explicit request, because
loading a pickle runs whatever code the file's author chose.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import sklearn
from sklearn.pipeline import Pipeline

from featx.errors import FeatxError
from featx.files import atomic_path, os_error
from featx.store import featx_version

BUNDLE_VERSION = 1
# Types beyond skops' own safe defaults (scikit-learn, numpy, builtins) that a featx bundle
# may contain: exactly what the models `featx fit` builds need (our logistic regression and
# out-of-core classifier, the svm's Platt-scaling calibrators, the MLP's Adam state).  Anything else in a file is refused
# before loading.  tests/test_bundle.py fits every kind of model fit can build and holds this
# set equal to the types they need, no more and no less.
ALLOWED_TYPES = frozenset({
    "featx.knn.CosineKNN",
    "featx.linear.FastLogisticRegression",
    "featx.online.StreamingClassifier",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
})


@dataclass
class Bundle:
    pipeline: Pipeline
    meta: dict  # provenance + classes + fit summary

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def save(path: str | os.PathLike, pipeline: Pipeline, meta: dict, use_pickle: bool = False) -> Path:
    """Write a bundle; ``use_pickle`` switches from skops to joblib (unsafe to load)."""
    path = Path(path)
    meta = {**meta, "bundle_version": BUNDLE_VERSION, "featx_version": featx_version(),
            "sklearn_version": sklearn.__version__}
    payload = {"featx_bundle": BUNDLE_VERSION, "meta": json.dumps(meta), "pipeline": pipeline}
    with atomic_path(path) as tmp:
        if use_pickle:
            import joblib

            joblib.dump(payload, tmp)
        else:
            import skops.io as sio

            sio.dump(payload, tmp)
    return path


def load(path: str | os.PathLike, allow_pickle: bool = False) -> Bundle:
    """Load a bundle.  skops files are checked against the allow-list of safe types first."""
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"model bundle {path} does not exist.")
    import zipfile

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise os_error(e, "read", path) from None
    if is_zip:
        import skops.io as sio

        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as e:
            raise FeatxError(f"{path} is not a readable skops bundle ({str(e).splitlines()[0]}).") from None
        refused = sorted(set(untrusted) - ALLOWED_TYPES)
        if refused:
            raise FeatxError(
                f"refusing to load {path}: it contains types outside featx's allow-list "
                f"({', '.join(refused[:5])}); nothing in it was run."
            )
        try:
            payload = sio.load(path, trusted=list(untrusted))
        except Exception as e:  # noqa: BLE001 - a damaged member inside a well-formed zip
            raise FeatxError(f"{path} is a damaged skops bundle ({type(e).__name__}); fit the model again.") from None
    elif magic.startswith(b"PK"):  # a zip file whose directory is gone: cut short
        raise FeatxError(f"{path} is a damaged skops bundle (cut short: a copy or a save that did not finish?); "
                         "fit the model again.")
    elif not magic.startswith(b"\x80"):  # every pickle protocol >= 2 starts with the PROTO opcode
        raise FeatxError(f"{path} is not a featx model bundle (a .skops file written by `featx fit`).")
    elif allow_pickle:
        import joblib

        warnings.warn(f"loading {path} with pickle: this runs any code the file contains; "
                      "only do it for files you made yourself.", stacklevel=2)
        try:
            payload = joblib.load(path)
        except (EOFError, ValueError) as e:
            raise FeatxError(f"{path} is a damaged pickle bundle ({type(e).__name__}); fit the model again.") from None
    else:
        raise FeatxError(
            f"{path} is not a skops bundle; if it is a joblib/pickle bundle you made yourself, "
            "pass --allow-pickle (loading a pickle can run arbitrary code)."
        )
    if not isinstance(payload, dict) or payload.get("featx_bundle") is None:
        raise FeatxError(f"{path} is not a featx model bundle.")
    return Bundle(payload["pipeline"], json.loads(payload["meta"]))
