import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.linear import FastLogisticRegression


@parametrize_with_checks([FastLogisticRegression()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_same_solution_as_scikit_learn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8))
    y = (X @ rng.normal(size=(8, 3))).argmax(1)
    for C in (0.01, 1.0):
        ours = FastLogisticRegression(C=C, tol=1e-7).fit(X, y)
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)


def test_binary_matches_scikit_learn():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5))
    y = np.where(X[:, 0] + 0.5 * rng.normal(size=300) > 0, "yes", "no")
    ours = FastLogisticRegression(C=0.5, tol=1e-7).fit(X, y)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)
    assert list(ours.classes_) == ["no", "yes"]


def test_warm_start_needs_fewer_iterations():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(2000, 20))
    y = (X[:, :4] @ rng.normal(size=(4, 4))).argmax(1)
    cold = FastLogisticRegression(C=1.0, tol=1e-6).fit(X, y)
    lr = FastLogisticRegression(C=0.9, tol=1e-6, warm_start=True).fit(X, y)
    lr.set_params(C=1.0).fit(X, y)
    assert lr.n_iter_[0] < cold.n_iter_[0]
    np.testing.assert_allclose(lr.predict_proba(X), cold.predict_proba(X), atol=1e-3)


def test_coef_init_starts_from_a_given_solution():
    """The regularisation path passes the previous solution to fit() instead of setting
    fitted attributes on an unfitted estimator."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1500, 12))
    y = (X[:, :3] @ rng.normal(size=(3, 3))).argmax(1)
    near = FastLogisticRegression(C=0.9, tol=1e-6).fit(X, y)
    cold = FastLogisticRegression(C=1.0, tol=1e-6).fit(X, y)
    warm = FastLogisticRegression(C=1.0, tol=1e-6).fit(X, y, coef_init=near.coef_, intercept_init=near.intercept_)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    np.testing.assert_allclose(warm.predict_proba(X), cold.predict_proba(X), atol=1e-3)
