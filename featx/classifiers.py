"""Classifier factories: ``"svm" | "logreg" | "mlp"`` -> a scikit-learn Pipeline.

Every classifier is a Pipeline whose first step standardises the features, so scaling is
learned inside any cross-validation or hold-out split and never sees validation rows.
"""

from __future__ import annotations

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from featx.errors import FeatxError
from featx.linear import FastLogisticRegression

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
        if class_weight is not None:
            raise FeatxError("--class-weight balanced is not supported by the mlp classifier; use logreg or svm.")
        # one hidden layer as in the course's Dense(1000)+Dropout head; scikit-learn's MLP
        # has no dropout, so the L2 penalty alpha and early stopping regularise it instead
        clf = MLPClassifier(hidden_layer_sizes=(params.pop("hidden", 512),), alpha=params.pop("alpha", 1e-3),
                            early_stopping=True, validation_fraction=0.1, n_iter_no_change=5,
                            max_iter=params.pop("max_iter", 200), random_state=seed)
    else:
        raise FeatxError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}.")
    _check_no_params_left(name, params)
    return Pipeline(steps + [("clf", clf)])


def make_online_classifier(name: str, class_weight: str | None = None, seed: int = 0, **params):
    """The out-of-core counterpart: an estimator with ``partial_fit`` (SGD or MLP)."""
    if name == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(params.pop("hidden", 512),), alpha=params.pop("alpha", 1e-3),
                            random_state=seed)
    elif name in ("logreg", "svm"):
        loss = "log_loss" if name == "logreg" else "hinge"
        # SGD's alpha multiplies the mean loss's L2 term: alpha = 1 / (C * n) for the same model
        clf = SGDClassifier(loss=loss, alpha=params.pop("alpha", 1e-4), random_state=seed, class_weight=class_weight,
                            learning_rate="optimal", average=True)
    else:
        raise FeatxError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}.")
    _check_no_params_left(name, params)
    return clf


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
        grid[k.strip()] = values
    return grid
