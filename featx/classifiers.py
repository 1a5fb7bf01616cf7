"""Classifier factories: ``"svm" | "logreg" | "mlp"`` -> a scikit-learn Pipeline.

Every classifier is a Pipeline whose first step standardises the features, so scaling is
learned inside any cross-validation or hold-out split and never sees validation rows.
"""

from __future__ import annotations

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.kernel_approximation import Nystroem
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_sample_weight

from featx.errors import FeatxError
from featx.linear import FastLogisticRegression
from featx.online import StreamingClassifier

CLASSIFIERS = ("logreg", "svm", "mlp")

# An RBF SVC's fit time grows faster than quadratically with the number of samples (libsvm
# caches and solves over the kernel matrix); beyond this many training rows featx fits a
# Nystroem kernel approximation followed by a linear SVM instead.
SVC_MAX_SAMPLES = 10_000

# Kornblith, Shlens & Le (2019) choose the L2 strength of a multinomial logistic regression
# from log-spaced values on a held-out split.  They use 96 values over 1e-6..1e5; with
# standardised features the optimum lies well inside this range, and warm starts along the
# path make each extra value cheap.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "logreg": {"C": [float(c) for c in np.logspace(-4, 0, 9)]},
    "svm": {"C": [0.1, 1.0, 10.0]},
    "mlp": {"alpha": [1e-4, 1e-3, 1e-2]},
}


def make_classifier(name: str, n_samples: int | None = None, class_weight: str | None = None,
                    seed: int = 0, **params) -> Pipeline:
    """Build an unfitted Pipeline (scaler -> classifier).

    Args:
        name: ``logreg``, ``svm`` or ``mlp``.
        n_samples: training rows; decides exact RBF SVC vs. kernel approximation.
        class_weight: ``None`` or ``"balanced"`` (skewed classes).
        seed: random state for the stochastic parts.
        **params: hyper-parameters of the classifier step (``C``, ``alpha``...).
    """
    steps = [("scale", StandardScaler())]
    if name == "logreg":
        # scikit-learn's objective and C, solved by L-BFGS over float32 arithmetic (featx.linear)
        clf = FastLogisticRegression(C=params.pop("C", 1.0), max_iter=params.pop("max_iter", 1000),
                                      class_weight=class_weight, tol=params.pop("tol", 1e-4))
    elif name == "svm":
        C = params.pop("C", 1.0)
        if n_samples is not None and n_samples > SVC_MAX_SAMPLES:
            k = min(params.pop("n_components", 1024), n_samples)
            steps.append(("rbf", Nystroem(n_components=k, gamma=params.pop("gamma", None), random_state=seed)))
            clf = CalibratedClassifierCV(LinearSVC(C=C, class_weight=class_weight, dual="auto", random_state=seed),
                                         cv=3, method="sigmoid")
        else:
            # probabilities by Platt scaling on internal folds (scikit-learn's replacement
            # for the deprecated SVC(probability=True))
            svc = SVC(C=C, kernel="rbf", gamma=params.pop("gamma", "scale"), class_weight=class_weight,
                      random_state=seed)
            clf = CalibratedClassifierCV(svc, ensemble=False, method="sigmoid")
    elif name == "mlp":
        # one hidden layer of 512 units (the course's head is a Dense layer with dropout);
        # scikit-learn's MLP has no dropout, so the L2 penalty alpha and early stopping
        # regularise it; class_weight reaches it as sample weights when it is fitted (fit_params)
        clf = MLPClassifier(hidden_layer_sizes=(params.pop("hidden", 512),), alpha=params.pop("alpha", 1e-3),
                            early_stopping=True, validation_fraction=0.1, n_iter_no_change=5,
                            max_iter=params.pop("max_iter", 200), random_state=seed)
    else:
        raise FeatxError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}.")
    _check_no_params_left(name, params)
    return Pipeline(steps + [("clf", clf)])


# Hyper-parameters of the out-of-core models (the streamed counterparts of the in-memory
# ones).  C (logreg, svm) and alpha (mlp) may be lists: a regularisation path trained at once.
ONLINE_PARAMS = {"logreg": ("C",), "svm": ("C", "gamma", "n_components"), "mlp": ("alpha", "hidden")}


def make_online_classifier(name: str, n_samples: int, class_weight: str | None = None, seed: int = 0,
                           **params) -> tuple[list[tuple[str, object]], StreamingClassifier]:
    """The out-of-core counterpart of :func:`make_classifier`: the transformer steps of the
    Pipeline (each fitted by the caller on a pass or a sample of the stream) and a
    :class:`featx.online.StreamingClassifier` (fitted on the stream).

    logreg: softmax regression; svm: Nystroem RBF map (as above SVC_MAX_SAMPLES in memory)
    + a squared-hinge linear SVM; mlp: one hidden ReLU layer (512 units by default).  ``C``
    or ``alpha`` may be a list of values, trained together as a regularisation path.
    """
    if name not in ONLINE_PARAMS:
        raise FeatxError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}.")
    steps: list[tuple[str, object]] = [("scale", StandardScaler())]
    common = dict(class_weight=class_weight, random_state=seed)
    if name == "mlp":
        alpha = params.pop("alpha", 1e-3)
        clf = StreamingClassifier(hidden=params.pop("hidden", 512), alpha=alpha, batch_size=1024, lr=2e-3, **common)
    else:
        C = params.pop("C", 1.0)
        alpha = [1.0 / c for c in C] if isinstance(C, (list, tuple)) else 1.0 / C
        loss = "log_loss" if name == "logreg" else "squared_hinge"
        clf = StreamingClassifier(loss=loss, alpha=alpha, batch_size=1024, lr=1e-2, **common)
        if name == "svm":
            k = min(params.pop("n_components", 1024), n_samples)
            steps.append(("rbf", Nystroem(n_components=k, gamma=params.pop("gamma", None), random_state=seed)))
    _check_no_params_left(name, params)
    return steps, clf


def fit_params(name: str, class_weight: str | None, y) -> dict:
    """Keyword arguments for the Pipeline's ``fit``: scikit-learn's MLP has no
    ``class_weight``, so balanced classes reach it as per-row sample weights."""
    if name == "mlp" and class_weight is not None:
        return {"clf__sample_weight": compute_sample_weight(class_weight, y)}
    return {}


def _check_no_params_left(name: str, params: dict) -> None:
    if params:
        raise FeatxError(f"unknown hyper-parameters for {name}: {', '.join(params)}.")


def parse_grid(text: str) -> dict[str, list]:
    """``"C=0.01,0.1,1"`` or ``"alpha=1e-4,1e-3;hidden=256,512"`` -> a parameter grid."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise FeatxError(f"--grid {text!r}: expected NAME=V1,V2,... (e.g. C=0.01,0.1,1).")
        k, v = part.split("=", 1)
        try:
            values = [int(x) if x.strip().lstrip("-").isdigit() else float(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise FeatxError(f"--grid {text!r}: values must be numbers.") from None
        if not values:
            raise FeatxError(f"--grid {text!r}: {k} has no values.")
        k = k.strip()
        lowest = 0 if k == "alpha" else 1 if k in ("hidden", "n_components", "max_iter") else None
        for x in values:
            if not np.isfinite(x) or (x < lowest if lowest is not None else x <= 0):
                allowed = f">= {lowest}" if lowest is not None else "> 0"
                raise FeatxError(f"--grid {text!r}: {k}={x} is out of range; every value must be finite and {allowed}.")
        grid[k] = values
    return grid
