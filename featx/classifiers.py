"""The classifiers of ``featx fit``: one :class:`ClassifierSpec` per ``--clf``.

Every classifier is a scikit-learn Pipeline whose first step standardises the features, so
scaling is learned inside any hold-out split and never sees validation rows.  A spec holds
everything ``featx fit`` needs to know about one classifier: how to build it in memory and
out of core, its default grid and the parameter a regularisation path walks, how its refit
starts, what it needs of the data.  A new classifier is one entry of :data:`CLASSIFIERS`
(and :data:`featx.bundle.ALLOWED_TYPES` if it brings a new type; tests/test_bundle.py says).
scikit-learn, torch and featx's own estimators are imported when a classifier is built, so
the command line can read the names at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from featx.errors import FeatxError

# An RBF SVC's fit time grows faster than quadratically with the number of samples (libsvm
# caches and solves over the kernel matrix); beyond this many training rows featx fits a
# Nystroem kernel approximation followed by a linear SVM instead.
SVC_MAX_SAMPLES = 10_000


def _scaler():
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def _logreg(n_samples, class_weight, seed, params):
    from featx.linear import FastLogisticRegression

    # scikit-learn's objective and C, solved by L-BFGS over float32 arithmetic (featx.linear)
    return [], FastLogisticRegression(C=params.pop("C", 1.0), max_iter=params.pop("max_iter", 1000),
                                      class_weight=class_weight, tol=params.pop("tol", 1e-4))


def _svm(n_samples, class_weight, seed, params):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.kernel_approximation import Nystroem
    from sklearn.svm import SVC, LinearSVC

    C = params.pop("C", 1.0)
    if n_samples is not None and n_samples > SVC_MAX_SAMPLES:
        k = min(params.pop("n_components", 1024), n_samples)
        rbf = Nystroem(n_components=k, gamma=params.pop("gamma", None), random_state=seed)
        return [("rbf", rbf)], CalibratedClassifierCV(
            LinearSVC(C=C, class_weight=class_weight, dual="auto", random_state=seed), cv=3, method="sigmoid")
    # probabilities by Platt scaling on internal folds (scikit-learn's replacement for the
    # deprecated SVC(probability=True))
    svc = SVC(C=C, kernel="rbf", gamma=params.pop("gamma", "scale"), class_weight=class_weight, random_state=seed)
    return [], CalibratedClassifierCV(svc, ensemble=False, method="sigmoid")


def _mlp(n_samples, class_weight, seed, params):
    from sklearn.neural_network import MLPClassifier

    # one hidden layer of 512 units (the course's head is a Dense layer with dropout);
    # scikit-learn's MLP has no dropout, so the L2 penalty alpha and early stopping
    # regularise it; class_weight reaches it as sample weights when it is fitted (fit_params)
    return [], MLPClassifier(hidden_layer_sizes=(params.pop("hidden", 512),), alpha=params.pop("alpha", 1e-3),
                             early_stopping=True, validation_fraction=0.1, n_iter_no_change=5,
                             max_iter=params.pop("max_iter", 200), random_state=seed)


def _online_linear(loss: str):
    def build(n_samples, class_weight, seed, params):
        from featx.online import StreamingClassifier

        C = params.pop("C", 1.0)
        alpha = [1.0 / c for c in C] if isinstance(C, (list, tuple)) else 1.0 / C
        est = StreamingClassifier(loss=loss, alpha=alpha, batch_size=1024, lr=1e-2, class_weight=class_weight,
                                  random_state=seed)
        steps = []
        if loss == "squared_hinge":  # the RBF kernel as a Nystroem map, as above SVC_MAX_SAMPLES in memory
            from sklearn.kernel_approximation import Nystroem

            k = min(params.pop("n_components", 1024), n_samples)
            steps.append(("rbf", Nystroem(n_components=k, gamma=params.pop("gamma", None), random_state=seed)))
        return steps, est

    return build


def _online_mlp(n_samples, class_weight, seed, params):
    from featx.online import StreamingClassifier

    return [], StreamingClassifier(hidden=params.pop("hidden", 512), alpha=params.pop("alpha", 1e-3), batch_size=1024,
                                   lr=2e-3, class_weight=class_weight, random_state=seed)


def _knn(n_samples, class_weight, seed, params):
    from featx.knn import CosineKNN

    if class_weight is not None:
        raise FeatxError("--clf knn has no class weights (its neighbours vote as they are); leave out --class-weight, "
                         "or use another --clf.")
    return [], CosineKNN(k=int(params.pop("k", 20)), vote=params.pop("vote", "temperature"),
                         temperature=float(params.pop("temperature", 0.07)), blocks=params.pop("blocks", None))


def _knn_online(n_samples, class_weight, seed, params):
    raise FeatxError("knn has no streamed model: out of core, featx.fit keeps its training rows as float16 instead.")


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything ``featx fit`` knows about one ``--clf``."""

    name: str
    build: Callable  # (n_samples, class_weight, seed, params) -> (extra steps, estimator), in memory
    build_online: Callable  # the same, out of core (C or alpha may be a list: a path)
    grid: dict[str, list]  # the default search
    regularisation: str  # the parameter a regularisation path walks (out of core: one read for all values)
    online_params: tuple[str, ...]  # the hyper-parameters the out-of-core model takes
    path_in_memory: bool = False  # in memory too, the grid over ``regularisation`` is one warm-started path
    warm_refit: bool = False  # the refit on train + validation starts from the selected solution
    epochs_from_validation: bool = False  # out of core, the refit runs the epochs early stopping chose
    sample_weights: bool = False  # class weights reach it as sample weights (it has no class_weight)
    min_per_class: int = 1  # in memory, rows of every class it needs (svm: its 5 calibration folds)
    min_rows: int = 1  # in memory, training rows it needs (mlp: its 10 % early-stopping hold-out, 2 rows)
    why_min: str = ""
    scaled: bool = True  # its Pipeline standardises the features first (knn: no, it normalises each row)
    neighbours: bool = False  # one neighbour search scores the whole grid (CosineKNN.search_scores)


# Kornblith, Shlens & Le (2019) choose the L2 strength of a multinomial logistic regression
# from log-spaced values on a held-out split.  They use 96 values over 1e-6..1e5; with
# standardised features the optimum lies well inside this range, and warm starts along the
# path make each extra value cheap.
CLASSIFIERS: dict[str, ClassifierSpec] = {s.name: s for s in (
    ClassifierSpec("logreg", _logreg, _online_linear("log_loss"), {"C": [float(c) for c in np.logspace(-4, 0, 9)]},
                   "C", ("C",), path_in_memory=True, warm_refit=True),
    ClassifierSpec("svm", _svm, _online_linear("squared_hinge"), {"C": [0.1, 1.0, 10.0]}, "C",
                   ("C", "gamma", "n_components"), min_per_class=5, why_min="it calibrates its probabilities on 5 folds"),
    ClassifierSpec("mlp", _mlp, _online_mlp, {"alpha": [1e-4, 1e-3, 1e-2]}, "alpha", ("alpha", "hidden"),
                   epochs_from_validation=True, sample_weights=True, min_rows=11,
                   why_min="it holds out 10 % of them (2 rows at least) for early stopping"),
    # DINO's kNN evaluation: k = 20 and T = 0.07 there; the hold-out chooses among these
    ClassifierSpec("knn", _knn, _knn_online, {"k": [1, 5, 10, 20, 50, 100], "vote": ["temperature", "majority"]},
                   "k", ("k", "vote", "temperature"), scaled=False, neighbours=True),
)}
DEFAULT_GRIDS = {name: spec.grid for name, spec in CLASSIFIERS.items()}


def spec_of(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise FeatxError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}.")
    return CLASSIFIERS[name]


def make_classifier(name: str, n_samples: int | None = None, class_weight: str | None = None,
                    seed: int = 0, **params):
    """An unfitted Pipeline (scaler -> [kernel map ->] classifier).

    Args:
        name: a key of :data:`CLASSIFIERS`.
        n_samples: training rows (the svm chooses exact RBF or a kernel approximation by it).
        class_weight: ``None`` or ``"balanced"`` (skewed classes).
        seed: random state for the stochastic parts.
        **params: hyper-parameters of the classifier (``C``, ``alpha``...).
    """
    from sklearn.pipeline import Pipeline

    spec = spec_of(name)
    steps, clf = spec.build(n_samples, class_weight, seed, params)
    _check_no_params_left(name, params)
    return Pipeline([("scale", _scaler() if spec.scaled else "passthrough")] + steps + [("clf", clf)])


def make_online_classifier(name: str, n_samples: int, class_weight: str | None = None, seed: int = 0, **params):
    """The out-of-core counterpart of :func:`make_classifier`: the transformer steps of the
    Pipeline (each fitted by the caller on a pass or a sample of the stream) and a
    :class:`featx.online.StreamingClassifier` (fitted on the stream).

    logreg: softmax regression; svm: Nystroem RBF map + a squared-hinge linear SVM; mlp: one
    hidden ReLU layer (512 units by default).  ``C`` or ``alpha`` may be a list of values,
    trained together as a regularisation path.
    """
    spec = spec_of(name)
    unknown = [k for k in params if k not in spec.online_params]
    if unknown:
        raise FeatxError(f"unknown hyper-parameters for {name}: {', '.join(unknown)}.")
    steps, est = spec.build_online(n_samples, class_weight, seed, params)
    _check_no_params_left(name, params)
    return [("scale", _scaler())] + steps, est


def fit_params(name: str, class_weight: str | None, y) -> dict:
    """Keyword arguments for the Pipeline's ``fit``: class weights as per-row sample weights
    for a classifier without ``class_weight`` (scikit-learn's MLP)."""
    if spec_of(name).sample_weights and class_weight is not None:
        from sklearn.utils.class_weight import compute_sample_weight

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
        lowest = 0 if k == "alpha" else 1 if k in ("hidden", "n_components", "max_iter", "k") else None
        for x in values:
            if not np.isfinite(x) or (x < lowest if lowest is not None else x <= 0):
                allowed = f">= {lowest}" if lowest is not None else "> 0"
                raise FeatxError(f"--grid {text!r}: {k}={x} is out of range; every value must be finite and {allowed}.")
        grid[k] = values
    return grid
