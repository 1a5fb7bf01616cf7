"""L2-regularised logistic regression: scikit-learn's L-BFGS, float32 arithmetic.

Why not ``sklearn.linear_model.LogisticRegression`` as it is: it evaluates its loss and
gradient in float64; on 60,000 x 1,280 features on a 2-core machine one L-BFGS iteration
costs ~0.2 s, and a regularisation search pays that hundreds of times.  Here the same
optimiser (scipy's L-BFGS-B, with scikit-learn's settings) drives a loss and gradient
computed in float32 with two BLAS products per evaluation, about 2.5x cheaper, and a
warm-started path over C needs few iterations per value (see BENCHMARKS.md).

The objective and the meaning of ``C`` and ``tol`` are scikit-learn's: mean weighted
cross-entropy + ||W||^2 / (2 C n), intercept unpenalised, multinomial for > 2 classes and
a single logit for 2.  The estimator passes ``sklearn.utils.estimator_checks``
(tests/test_linear.py).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_limits
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class FastLogisticRegression(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression: L-BFGS-B over a float32 loss and gradient.

    Args:
        C: inverse regularisation strength, as in scikit-learn.
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest gradient component of the mean objective is below this.
        warm_start: start from the previous solution (for regularisation paths).
        class_weight: None or "balanced" (or a dict class -> weight).
        blas_threads: BLAS threads during the fit (1 is fastest on small machines).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, warm_start: bool = False,
                 class_weight=None, blas_threads: int = 1):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.class_weight = class_weight
        self.blas_threads = blas_threads

    def fit(self, X, y, coef_init=None, intercept_init=None):
        """Fit on (X, y); ``coef_init``/``intercept_init`` start L-BFGS from a given solution
        (a regularisation path passes the previous C's), as ``SGDClassifier.fit`` allows."""
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], reset=True)
        check_classification_targets(y)
        classes, yi = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"This solver needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {classes[0]!r}")
        if self.C <= 0:
            raise ValueError(f"C must be positive; got {self.C!r}")
        n, d = X.shape
        k = 1 if len(classes) == 2 else len(classes)
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        sw = np.ones(n, dtype=np.float32)
        if self.class_weight is not None:
            sw = compute_sample_weight(self.class_weight, y).astype(np.float32)
        w0 = np.zeros(k * d + k)
        if coef_init is None and self.warm_start and getattr(self, "coef_", None) is not None \
                and np.array_equal(getattr(self, "classes_", []), classes):
            coef_init, intercept_init = self.coef_, self.intercept_
        if coef_init is not None:
            coef_init = np.asarray(coef_init, dtype=np.float64)
            if coef_init.shape != (k, d):
                raise ValueError(f"coef_init has shape {coef_init.shape}; this problem needs {(k, d)}")
            intercept = np.zeros(k) if intercept_init is None else np.asarray(intercept_init, dtype=np.float64)
            w0 = np.concatenate([coef_init.ravel(), intercept.ravel()])
        penalty = 1.0 / (self.C * n)
        if k == 1:
            target = yi.astype(np.float32)
        else:
            onehot = np.zeros((n, k), dtype=np.float32)
            onehot[np.arange(n), yi] = 1.0

        def loss_grad(w):
            W = w[: k * d].reshape(k, d).astype(np.float32)
            b = w[k * d:].astype(np.float32)
            Z = X32 @ W.T + b  # (n, k)
            if k == 1:
                z = Z[:, 0]
                loss = np.dot(sw, np.logaddexp(0.0, z) - target * z) / n
                G = ((expit(z) - target) * sw / n)[:, None]
            else:
                Z -= Z.max(axis=1, keepdims=True)
                E = np.exp(Z)
                S = E.sum(axis=1, keepdims=True)
                loss = np.dot(sw, np.log(S[:, 0]) - (Z * onehot).sum(axis=1)) / n
                G = (E / S - onehot) * (sw / n)[:, None]
            gW = (G.T @ X32).astype(np.float64) + penalty * w[: k * d].reshape(k, d)
            gb = G.sum(axis=0, dtype=np.float64)
            loss = float(loss) + 0.5 * penalty * float(np.dot(w[: k * d], w[: k * d]))
            return loss, np.concatenate([gW.ravel(), gb])

        # scikit-learn's own L-BFGS-B settings (sklearn/linear_model/_logistic.py).  One BLAS
        # thread: numpy and scipy each bring an OpenBLAS whose idle threads spin, and on a
        # 2-core machine the two pools fighting made every iteration 2.4x slower (measured).
        with threadpool_limits(self.blas_threads, user_api="blas"):
            res = minimize(loss_grad, w0, method="L-BFGS-B", jac=True,
                           options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                                    "ftol": 64 * np.finfo(float).eps})
        self.n_iter_ = np.array([int(res.nit)])
        self.classes_ = classes
        self.coef_ = res.x[: k * d].reshape(k, d)
        self.intercept_ = res.x[k * d:]
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        scores = X @ self.coef_.T.astype(X.dtype) + self.intercept_.astype(X.dtype)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X):
        s = self.decision_function(X).astype(np.float64)
        if s.ndim == 1:
            p1 = 1.0 / (1.0 + np.exp(-s))
            return np.column_stack([1.0 - p1, p1])
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        return np.log(np.clip(self.predict_proba(X), 1e-300, None))

    def predict(self, X):
        s = self.decision_function(X)
        idx = (s > 0).astype(int) if s.ndim == 1 else s.argmax(axis=1)
        return self.classes_[idx]
