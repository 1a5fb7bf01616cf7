"""Train and select: classifiers on stored features, in memory or out of core.

Selection follows the linear-probe protocol of Kornblith, Shlens & Le (CVPR 2019): fit on
the training split for each value of the grid, score on a held-out split (``--val`` file
or a stratified fraction of the training rows), then refit the best setting on
train + validation.  For logistic regression the grid is walked from strong to weak
regularisation, each fit starting from the previous solution, so each further value costs
a few L-BFGS iterations instead of a fit from scratch.

:func:`fit_store` is the policy ``featx fit`` applies to a feature file: in memory when the
features fit the memory budget, out of core otherwise.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn import metrics as skm
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featx.classifiers import fit_params, make_classifier, make_online_classifier, spec_of
from featx import bundle
from featx.errors import FeatxError
from featx.files import check_output, size_text
from featx.knn import unit_rows
from featx.linear import FastLogisticRegression
from featx.metrics import evaluate, evaluate_batches, evaluate_store, scores, write_report
from featx.online import batch_rows
from featx.sources import stratified_holdout
from featx.store import FeatureStore, check_provenance, nonfinite, tap_label, taps_of
from featx.stream import Part, RowStream

SEARCH_TOL = 3e-4  # L-BFGS gradient tolerance while walking the regularisation path


@dataclass
class FitResult:
    pipeline: Pipeline
    params: dict  # the selected hyper-parameters
    search: list[dict] = field(default_factory=list)  # one row per grid point: params, val accuracy, seconds
    val_metrics: dict | None = None  # metrics of the selected model fitted on train only
    fit_seconds: float = 0.0
    out_of_core: bool = False
    convergence: dict | None = None  # out of core: epochs of the final fit, converged or not
    tap: str | None = None  # fit_file: the tap fitted on (combined taps: joined by +)
    report_dir: Path | None = None  # fit_file: where the validation report went (None: no validation)

    @property
    def val_accuracy(self) -> float | None:
        """Validation accuracy of the selected setting (None without validation)."""
        if self.val_metrics is not None:
            return self.val_metrics["accuracy"]
        return max((r["val_accuracy"] for r in self.search), default=None)


def _grid_points(grid: dict[str, list]) -> list[dict]:
    points = [{}]
    for k, values in grid.items():
        points = [{**p, k: v} for p in points for v in values]
    return points


def _check_labels(y: np.ndarray, what: str) -> None:
    if len(y) == 0:
        raise FeatxError(f"{what} has no rows (did every image fail to decode? `featx info` lists the failures).")
    if (y < 0).any():
        raise FeatxError(f"{what} has {(y < 0).sum()} unlabeled rows (label -1); fit needs labelled features.")
    if len(np.unique(y)) < 2:
        raise FeatxError(f"{what} has a single class; a classifier needs at least two.")


def holdout(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows when there is no validation file: a stratified, seeded
    ``fraction`` of every class, as sweep and finetune hold out images
    (:func:`featx.sources.stratified_holdout`): a class of a single row stays in training."""
    if not (0 < fraction < 1):
        raise FeatxError(f"--val-fraction {fraction} is out of range; use a value in (0, 1).")
    train, val = stratified_holdout(y, fraction, seed)
    if len(val) == 0:
        raise FeatxError("no row can be held out for validation: every class has a single row; give a --val file, "
                         "or --search none to fit with default settings.")
    return train, val


def check_class_sizes(clf: str, y: np.ndarray, classes: list[str] | None = None, what: str = "the training rows") -> None:
    """Refuse, naming the class and its count, what the classifier (in memory) would fail on
    with scikit-learn's traceback (:class:`featx.classifiers.ClassifierSpec`'s minimums)."""
    spec = spec_of(clf)
    labels, counts = np.unique(y, return_counts=True)
    k = int(np.argmin(counts))
    name = classes[labels[k]] if classes is not None and 0 <= labels[k] < len(classes) else str(labels[k])
    if counts[k] < spec.min_per_class:
        raise FeatxError(f"class {name!r} has {counts[k]} of {what}, and --clf {clf} needs at least "
                         f"{spec.min_per_class} per class ({spec.why_min}); add images, or use --clf logreg.")
    if len(y) < spec.min_rows:
        raise FeatxError(f"--clf {clf} needs at least {spec.min_rows} of {what} ({spec.why_min}), and there are "
                         f"{len(y)}; add images, or use --clf logreg.")


def check_finite(X: np.ndarray, what: str) -> None:
    """Refuse features with nan or inf (scikit-learn would fail on them with a traceback)."""
    bad = nonfinite(X)
    if len(bad):
        raise FeatxError(f"{what} have non-finite values (nan or inf) in {len(bad)} rows, the first at row {bad[0]}.")


def fit_arrays(X: np.ndarray, y: np.ndarray, clf: str = "logreg", X_val=None, y_val=None,
               val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
               seed: int = 0, refit: bool = True, report: bool = True, classes: list[str] | None = None,
               blocks: tuple[int, ...] | None = None) -> FitResult:
    """Select hyper-parameters on a held-out split and fit the final pipeline.

    Args:
        X, y: training features (float32) and labels.
        clf: ``logreg``, ``svm`` or ``mlp``.
        X_val, y_val: a separate validation set; if absent, ``val_fraction`` of the
            training rows is held out (stratified).
        search: ``"auto"`` (the classifier's default grid), ``"none"`` (defaults, no
            selection) or a grid such as ``{"C": [0.1, 1]}``.
        class_weight: ``None`` or ``"balanced"``.
        seed: random state of the split and the classifiers.
        refit: refit the selected setting on train + validation (the protocol); if False
            the model fitted on train alone is returned.
        report: compute the full validation metrics of the selected model (per class,
            confusion matrix); without it only the search's accuracies are kept.
        classes: the class names (they name a class that is too small in the error).
        blocks: the widths of combined taps side by side in ``X`` (``--tap A --tap B``);
            a standardising pipeline scales every column on its own anyway, knn scales each
            tap's part of a row to unit length (:func:`featx.knn.unit_rows`).
    """
    t0 = time.perf_counter()
    X = np.asarray(X, dtype=np.float32)
    _check_labels(y, "the training set")
    check_finite(X, "the training features")
    spec = spec_of(clf)
    grid = _grid_of(spec, search)
    fixed = _fixed(spec, blocks)
    if not grid and X_val is None:
        check_class_sizes(clf, y, classes)
        pipe = make_classifier(clf, n_samples=len(X), class_weight=class_weight, seed=seed, **fixed)
        pipe.fit(X, y, **fit_params(clf, class_weight, y))
        return FitResult(pipe, {}, [], None, time.perf_counter() - t0)
    if X_val is None:
        tr, va = holdout(y, val_fraction, seed)
        X_tr, X_val, y_tr, y_val = X[tr], X[va], y[tr], y[va]
    else:
        X_tr, y_tr = X, y
        X_val = np.asarray(X_val, dtype=np.float32)
        check_finite(X_val, "the validation features")
    check_class_sizes(clf, y_tr, classes, "the training rows left after the hold-out" if X_val is not None else
                      "the training rows")
    points = _grid_points(grid) or [{}]
    val_metrics = None
    if spec.neighbours:
        rows, best_pipe, val_metrics = _neighbour_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed,
                                                         fixed)
    elif spec.path_in_memory and set(grid) <= {spec.regularisation}:
        rows, best_pipe = _logreg_path(X_tr, y_tr, X_val, y_val, sorted(p.get("C", 1.0) for p in points),
                                       class_weight)
    else:
        rows, best_pipe = _grid_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed)
    best = max(rows, key=lambda r: r["val_accuracy"])  # the first of equals: the order of the grid
    if report and val_metrics is None:
        val_metrics = evaluate(best_pipe, X_val, y_val)
    pipe = best_pipe
    if refit:
        X_all, y_all = np.concatenate([X_tr, X_val]), np.concatenate([y_tr, y_val])
        pipe = make_classifier(clf, n_samples=len(X_all), class_weight=class_weight, seed=seed, **best["params"],
                               **fixed)
        extra = fit_params(clf, class_weight, y_all)
        if spec.warm_refit:  # start from the selected solution: a few iterations suffice
            lr = best_pipe.named_steps["clf"]
            extra.update(clf__coef_init=lr.coef_, clf__intercept_init=lr.intercept_)
        pipe.fit(X_all, y_all, **extra)
    return FitResult(pipe, best["params"], rows, val_metrics, time.perf_counter() - t0)


FIXED_PARAMS = {"blocks"}  # what _fixed sets: not a hyper-parameter a --grid may name


def _grid_of(spec, search) -> dict:
    """The grid to search: the classifier's own ("auto"), none, or the user's, which may not
    name what featx sets itself."""
    grid = spec.grid if search == "auto" else ({} if search == "none" else dict(search))
    internal = set(grid) & FIXED_PARAMS
    if internal:
        raise FeatxError(f"unknown hyper-parameters for {spec.name}: {', '.join(sorted(internal))}.")
    return grid


def _fixed(spec, blocks: tuple[int, ...] | None) -> dict:
    """Parameters that are not searched: knn's tap widths when taps are combined."""
    return {"blocks": tuple(int(b) for b in blocks)} if spec.neighbours and blocks and len(blocks) > 1 else {}


def _grid_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed):
    """One fit per grid point, scored on the validation rows; returns the rows and the best pipeline."""
    rows, best_pipe = [], None
    for p in points:
        t = time.perf_counter()
        pipe = make_classifier(clf, n_samples=len(X_tr), class_weight=class_weight, seed=seed, **p)
        pipe.fit(X_tr, y_tr, **fit_params(clf, class_weight, y_tr))
        acc = float(skm.accuracy_score(y_val, pipe.predict(X_val)))
        if not rows or acc > max(r["val_accuracy"] for r in rows):
            best_pipe = pipe
        rows.append({"params": p, "val_accuracy": acc, "seconds": time.perf_counter() - t})
    return rows, best_pipe


def _neighbour_search(clf, X_tr, y_tr, X_val, y_val, points, class_weight, seed, fixed):
    """kNN: one neighbour search with the largest k scores every grid point, and gives the
    validation metrics of the best (no second search)."""
    t = time.perf_counter()
    pipe = make_classifier(clf, n_samples=len(X_tr), class_weight=class_weight, seed=seed, **fixed).fit(X_tr, y_tr)
    knn = pipe.named_steps["clf"]
    full = [{**knn.get_params(), **p} for p in points]
    sims, labels = knn.neighbours(pipe[:-1].transform(X_val), max(int(p["k"]) for p in full))
    probas = [knn.votes(sims, labels, int(p["k"]), p["vote"]) for p in full]
    accs = [float(np.mean(knn.classes_[proba.argmax(1)] == y_val)) for proba in probas]
    seconds = (time.perf_counter() - t) / len(points)
    rows = [{"params": p, "val_accuracy": acc, "seconds": seconds} for p, acc in zip(points, accs)]
    i = int(np.argmax(accs))  # the first of equals: the order of the grid
    best = make_classifier(clf, n_samples=len(X_tr), seed=seed, **points[i], **fixed).fit(X_tr, y_tr)
    return rows, best, scores(y_val, knn.classes_[probas[i].argmax(1)], knn.classes_, probas[i])


def _logreg_path(X_tr, y_tr, X_val, y_val, Cs, class_weight):
    """Fit along increasing C, each fit starting from the previous solution; the scaler is
    fitted once on X_tr.  Returns the search rows and the best pipeline (first of equals)."""
    scaler = StandardScaler().fit(X_tr)
    Xs_tr, Xs_val = scaler.transform(X_tr), scaler.transform(X_val)
    # the search only has to rank the values of C: a looser tolerance than the final
    # refit's (1e-4) ranks them the same at a fraction of the iterations
    lr = FastLogisticRegression(class_weight=class_weight, tol=SEARCH_TOL)
    rows, best = [], None
    for C in Cs:
        t = time.perf_counter()
        start = {"coef_init": lr.coef_, "intercept_init": lr.intercept_} if rows else {}
        lr.set_params(C=C).fit(Xs_tr, y_tr, **start)
        acc = float(skm.accuracy_score(y_val, lr.predict(Xs_val)))
        if not rows or acc > max(r["val_accuracy"] for r in rows):
            best = copy.deepcopy(lr)
        rows.append({"params": {"C": C}, "val_accuracy": acc, "seconds": time.perf_counter() - t,
                     "iterations": int(np.max(lr.n_iter_))})
    return rows, Pipeline([("scale", scaler), ("clf", best.set_params(tol=1e-4))])


# ----------------------------------------------------------------------------- out of core


def buffer_rows_for(budget: int, width: int) -> int:
    """Rows per stream buffer so that the three buffers in flight (the one trained on, the
    one waiting, the one being read) fit ``budget``; ``width`` counts the floats of a row
    as read plus as transformed."""
    return int(max(256, min(1 << 17, budget // (3 * 4 * max(width, 1)))))


def fit_out_of_core(store: FeatureStore, tap: str | tuple[str, ...] | None = None, clf: str = "logreg", val: FeatureStore | None = None,
                    val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
                    seed: int = 0, memory_budget: int | None = None, rows: np.ndarray | None = None,
                    val_rows: np.ndarray | None = None) -> FitResult:
    """:func:`fit_arrays`' protocol on features larger than memory, streamed from the file.

    ``rows`` and ``val_rows`` (boolean masks) leave rows of the files out (``--drop-nonfinite``).
    ``tap`` may be a tuple of taps, read side by side.

    The same hold-out (the same rows as in memory, or the ``val`` file), the same grid,
    then a refit on train + validation with the selected value.  Each fit streams
    representative mini-batches (:class:`featx.stream.RowStream`) into a
    :class:`featx.online.StreamingClassifier`, which trains the whole regularisation path
    on one read of the data and runs to convergence.  Memory holds about
    ``memory_budget`` bytes of rows besides the model.
    """
    t0 = time.perf_counter()
    tap = tap or store.default_tap
    y = store.labels
    _check_labels(y if rows is None else y[rows], "the training set")
    budget = memory_budget if memory_budget is not None else default_budget()
    spec = spec_of(clf)
    grid = _grid_of(spec, search)
    if spec.neighbours:
        return _neighbours_out_of_core(store, tap, clf, val, val_fraction, grid, class_weight, seed, budget, rows,
                                       val_rows, t0)
    reg = spec.regularisation
    everything = [Part(store, tap, rows)] + ([Part(val, tap, val_rows)] if val is not None else [])
    if not grid and val is None:
        pipe, est = _fit_streamed(clf, everything, {}, None, class_weight, seed, budget)
        return FitResult(pipe, {}, [], None, time.perf_counter() - t0, True, _convergence(est))
    train_parts, val_parts = _split_parts(store, tap, val, val_fraction, seed, rows, val_rows)
    rows, best = [], None
    path = grid.get(reg)
    for other in _grid_points({k: v for k, v in grid.items() if k != reg}):
        t = time.perf_counter()
        params = {**other, **({reg: list(path)} if path else {})}
        pipe, est = _fit_streamed(clf, train_parts, params, val_parts, class_weight, seed, budget)
        seconds = (time.perf_counter() - t) / max(len(est.path_scores_), 1)
        for v, acc in zip(path or [None], est.path_scores_):
            rows.append({"params": {**other, **({reg: v} if v is not None else {})}, "val_accuracy": float(acc),
                         "seconds": seconds, "epochs": est.n_iter_})
        if best is None or max(est.path_scores_) > best[2]:
            best = (pipe, est, max(est.path_scores_))
    chosen = max(rows, key=lambda r: r["val_accuracy"])  # the first of equals: the order of the grid
    selected, est = best[0], best[1]
    val_metrics = evaluate_batches(selected, RowStream(val_parts, buffer_rows_for(budget, store.dim(tap)),
                                                       seed=seed).sequential())
    refit_parts = everything
    epochs = est.best_epoch_ if spec.epochs_from_validation else None  # as many epochs as validation chose
    pipe, final = _fit_streamed(clf, refit_parts, chosen["params"], None, class_weight, seed, budget, epochs)
    return FitResult(pipe, chosen["params"], rows, val_metrics, time.perf_counter() - t0, True,
                     _convergence(final, epochs is not None))


def _neighbours_out_of_core(store, tap, clf, val, val_fraction, grid, class_weight, seed, budget, rows, val_rows,
                            t0) -> FitResult:
    """kNN larger than the budget as float32: its training rows are read block by block,
    scaled to unit length and kept as float16 (half the bytes), which must fit the budget;
    the validation rows are scored a block at a time."""
    y = store.labels
    classes = np.unique(np.concatenate([y if rows is None else y[rows]] +
                                       ([val.labels if val_rows is None else val.labels[val_rows]] if val else [])))
    make_classifier(clf, class_weight=class_weight)  # refuses class weights before reading anything
    fixed = _fixed(spec_of(clf), store.blocks(tap))
    block = buffer_rows_for(budget, store.dim(tap))
    everything = [Part(store, tap, rows)] + ([Part(val, tap, val_rows)] if val is not None else [])
    kept = sum(int(p.mask().sum()) for p in everything) * store.dim(tap) * 2
    if kept > budget:
        raise FeatxError(f"--clf knn keeps every training row in the model: {size_text(kept)} of them as float16 "
                         f"exceed the memory budget of {size_text(budget)}; raise --memory-budget if the memory is there, or "
                         "use another --clf.")

    def fitted(parts, params):
        n = int(sum(p.mask().sum() for p in parts))
        unit, labels, at = np.empty((n, store.dim(tap)), np.float16), np.empty(n, np.int64), 0
        for X, yb in RowStream(parts, block, seed=seed).sequential():
            unit[at:at + len(X)], labels[at:at + len(X)] = unit_rows(X, fixed.get("blocks")), yb
            at += len(X)
        pipe = make_classifier(clf, n_samples=n, seed=seed, **params, **fixed)
        pipe.named_steps["clf"].set_params(dtype="float16").keep_rows(unit, labels, classes)
        return pipe

    if not grid and val is None:
        return FitResult(fitted(everything, {}), {}, [], None, time.perf_counter() - t0, True)
    train_parts, val_parts = _split_parts(store, tap, val, val_fraction, seed, rows, val_rows)
    points = _grid_points(grid) or [{}]
    t = time.perf_counter()
    pipe = fitted(train_parts, {})
    knn, hits, n = pipe.named_steps["clf"], np.zeros(len(points)), 0
    for X, yb in RowStream(val_parts, block, seed=seed).sequential():
        hits += np.asarray(knn.search_scores(X, yb, points)) * len(X)
        n += len(X)
    seconds = (time.perf_counter() - t) / len(points)
    search = [{"params": p, "val_accuracy": float(h / n), "seconds": seconds} for p, h in zip(points, hits)]
    chosen = max(search, key=lambda r: r["val_accuracy"])  # the first of equals: the order of the grid
    knn.set_params(**chosen["params"])
    val_metrics = evaluate_batches(pipe, RowStream(val_parts, block, seed=seed).sequential())
    del pipe, knn
    return FitResult(fitted(everything, chosen["params"]), chosen["params"], search, val_metrics,
                     time.perf_counter() - t0, True)


def _split_parts(store: FeatureStore, tap: str, val: FeatureStore | None, val_fraction: float, seed: int,
                 rows: np.ndarray | None, val_rows: np.ndarray | None) -> tuple[list[Part], list[Part]]:
    """The training and validation rows out of core: the ``val`` file, or the same
    stratified hold-out of the (selected) training rows as in memory."""
    if val is not None:
        return [Part(store, tap, rows)], [Part(val, tap, val_rows)]
    y = store.labels
    use = np.arange(len(y)) if rows is None else np.flatnonzero(rows)
    tr, va = holdout(y[use], val_fraction, seed)
    return [Part(store, tap, _mask(use[tr], len(y)))], [Part(store, tap, _mask(use[va], len(y)))]


def _mask(idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, bool)
    m[idx] = True
    return m


def _fit_streamed(clf: str, parts: list[Part], params: dict, val_parts: list[Part] | None, class_weight,
                  seed: int, budget: int, max_epochs: int | None = None):
    """Fit the transformers (scaler: one pass; kernel map: a sample) and the streamed classifier."""
    n = int(sum(p.mask().sum() for p in parts))
    steps, est = make_online_classifier(clf, n, class_weight, seed, **params)
    width = parts[0].store.dim(parts[0].tap)
    out_width = getattr(steps[-1][1], "n_components", width)
    rows = buffer_rows_for(budget, width + out_width)
    stream = RowStream(parts, rows, batch_rows(n, est.batch_size), seed)
    scaler = steps[0][1]
    for X, _ in stream.sequential():
        scaler.partial_fit(X)
    for _, step in steps[1:]:  # a kernel map, fitted on a sample of the scaled rows
        step.fit(scaler.transform(_sample(parts, step.n_components, seed)))
    pre = Pipeline(steps)
    val = None
    if val_parts:
        val_stream = RowStream(val_parts, rows, seed=seed, transform=pre.transform)
        val = val_stream.sequential
    if max_epochs is not None:
        est.set_params(max_epochs=max_epochs)
    est.fit_stream(stream.with_transform(pre.transform), stream.labels, out_width, val=val)
    return Pipeline(steps + [("clf", est)]), est


def _sample(parts: list[Part], k: int, seed: int) -> np.ndarray:
    """``k`` rows drawn at random (without replacement) from the selected rows of the parts."""
    sizes = [int(p.mask().sum()) for p in parts]
    pick = np.sort(np.random.default_rng(seed).choice(sum(sizes), size=min(k, sum(sizes)), replace=False))
    out, offset = [], 0
    for part, size in zip(parts, sizes):
        mine = pick[(pick >= offset) & (pick < offset + size)] - offset
        if len(mine):
            out.append(part.store.features(part.tap, rows=np.flatnonzero(part.mask())[mine]))
        offset += size
    return np.concatenate(out)


def _convergence(est, epochs_from_validation: bool = False) -> dict:
    """How the final streamed fit ended: epochs, and whether it converged or ran into its limit."""
    out = {"epochs": int(est.n_iter_), "converged": bool(est.converged_), "objective": est.objective_}
    if epochs_from_validation:  # the MLP's refit runs the epochs early stopping chose
        out.update(converged=True, rule="epochs chosen by early stopping on the validation split")
    return out


# ----------------------------------------------------------------------------- the policy


def default_budget() -> int:
    """A quarter of the physical memory (4 GB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def chosen_taps(store: FeatureStore, tap) -> str | tuple[str, ...]:
    """What ``--tap`` names: the file's default tap (None or nothing given), one tap, or a
    tuple of taps to combine (``--tap A --tap B``, a repeat counted once); each must be in the file."""
    if tap is None or (not isinstance(tap, str) and not tap):
        return store.default_tap
    taps = (tap,) if isinstance(tap, str) else tuple(dict.fromkeys(tap))
    for t in taps:
        store.dataset(t)  # the sentence naming the file's taps
    return taps[0] if len(taps) == 1 else taps


def require_taps(store: FeatureStore, taps: tuple[str, ...], what: str, why: str) -> None:
    """Refuse a file that lacks one of ``taps``, saying which and what the file has."""
    missing = [t for t in taps if t not in store.taps]
    if missing:
        raise FeatxError(f"{what} has no tap {missing[0]!r}, {why}; it has: {', '.join(store.taps)}.")


def open_val(path: str | os.PathLike, tap: str | tuple[str, ...], provenance: dict) -> FeatureStore:
    """Open a validation feature file, refusing one made differently from the training features."""
    val = FeatureStore(path)
    try:
        require_taps(val, tap if isinstance(tap, tuple) else (tap,), f"--val {path}", "which the training file has")
        check_provenance(provenance, val.provenance(tap), f"--val {path}")
    except BaseException:
        val.close()
        raise
    return val


def fit_store(store: FeatureStore, tap: str | tuple[str, ...] | None = None, clf: str = "logreg", val_path=None,
              val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
              seed: int = 0, memory_budget: int | None = None, log=None, drop_nonfinite: bool = False) -> FitResult:
    """``featx fit`` on an open feature file: in memory when the tap's features fit
    ``memory_budget`` (default :func:`default_budget`), out of core otherwise.

    Args:
        store: the training features.
        tap: the stored tap to fit on (default: the file's default tap), or a tuple of taps
            to combine side by side.
        val_path: a validation feature file (checked against the training features).
        log: called with one sentence when the fit goes out of core, or rows are dropped.
        drop_nonfinite: leave out rows with nan or inf features (saying how many) instead
            of refusing the file.
    """
    tap = chosen_taps(store, tap)
    budget = memory_budget if memory_budget is not None else default_budget()
    log = log or (lambda text: None)
    val = open_val(val_path, tap, store.provenance(tap)) if val_path else None
    try:
        if store.nbytes(tap) > budget:
            log(f"{size_text(store.nbytes(tap))} of features exceed the memory budget of {size_text(budget)}: "
                "fitting out of core (mini-batches streamed from the file).")
            rows = _finite_rows(store, tap, store.nonfinite_rows(tap), drop_nonfinite, log)
            val_rows = _finite_rows(val, tap, val.nonfinite_rows(tap), drop_nonfinite, log) if val is not None else None
            return fit_out_of_core(store, tap, clf, val, val_fraction, search, class_weight, seed, budget, rows,
                                   val_rows)
        X, y = store.features(tap), store.labels
        keep = _finite_rows(store, tap, nonfinite(X), drop_nonfinite, log)
        if keep is not None:
            X, y = X[keep], y[keep]
        Xv = yv = None
        if val is not None:
            Xv, yv = val.features(tap), val.labels
            keep = _finite_rows(val, tap, nonfinite(Xv), drop_nonfinite, log)
            if keep is not None:
                Xv, yv = Xv[keep], yv[keep]
        return fit_arrays(X, y, clf, Xv, yv, val_fraction, search, class_weight, seed, classes=store.classes,
                          blocks=store.blocks(tap))
    finally:
        if val is not None:
            val.close()


def _finite_rows(store: FeatureStore, tap: str, bad: np.ndarray, drop: bool, log) -> np.ndarray | None:
    """None when every row is finite; else the mask of the finite rows (``drop``), or the
    sentence that refuses the file."""
    if not len(bad):
        return None
    if not drop:
        raise store.nonfinite_error(tap, bad, "or pass --drop-nonfinite to fit on the other rows")
    log(f"{store.path}: leaving out {len(bad)} of {len(store)} rows whose {tap_label(tap)} features are not finite "
        f"(the first: {store.ids_at([bad[0]])[0]}).")
    keep = np.ones(len(store), bool)
    keep[bad] = False
    return keep


# ----------------------------------------------------------------------------- the commands


def fit_file(features: str | os.PathLike, out: str | os.PathLike, clf: str = "logreg",
             tap: str | tuple[str, ...] | None = None,
             val_path=None, val_fraction: float = 0.2, search: str | dict = "auto", class_weight: str | None = None,
             memory_budget: int | None = None, seed: int = 0, report_dir=None, use_pickle: bool = False,
             drop_nonfinite: bool = False, log=None, knn_dtype: str = "float32") -> FitResult:
    """``featx fit``: fit on a feature file (:func:`fit_store`), save the bundle with the
    features' provenance, and write the validation report (default ``<out>-report/``).
    Both output locations are checked before the fit: no bundle without its report.
    ``knn_dtype``: how ``--clf knn`` keeps its training rows in the bundle.  ``tap``: one
    tap, or several combined (the bundle records each: predict extracts them all)."""
    if knn_dtype != "float32" and clf != "knn":
        raise FeatxError(f"--knn-dtype is for --clf knn (the model that keeps its training rows), not --clf {clf}.")
    report_dir = Path(report_dir or os.path.splitext(str(out))[0] + "-report")
    check_output(out, what="--out")
    check_output(report_dir, folder=True, what="--report")
    with FeatureStore(features) as store:
        tap = chosen_taps(store, tap)
        prov = store.provenance(tap)
        result = fit_store(store, tap, clf, val_path, val_fraction, search, class_weight, seed, memory_budget, log,
                           drop_nonfinite)
    if knn_dtype == "float16":  # out of core, knn keeps float16 rows already
        result.pipeline.named_steps["clf"].keep_as(knn_dtype)
    meta = {**prov, "clf": clf, "params": result.params, "fit_seconds": result.fit_seconds,
            "features_file": os.path.abspath(features), "out_of_core": result.out_of_core,
            "convergence": result.convergence}
    bundle.save(out, result.pipeline, meta, use_pickle=use_pickle)
    result.tap = tap_label(tap)
    if result.val_metrics:
        write_report(report_dir, {"clf": clf, "tap": result.tap, "params": result.params, "search": result.search,
                                  "fit_seconds": result.fit_seconds, "out_of_core": result.out_of_core,
                                  "convergence": result.convergence, "metrics": result.val_metrics,
                                  "split": "validation"}, prov["classes"])
        result.report_dir = report_dir
    return result


def evaluate_file(model: str | os.PathLike, features: str | os.PathLike, report_dir=None,
                  allow_pickle: bool = False) -> tuple[bundle.Bundle, dict]:
    """``featx evaluate``: score a model bundle on a labelled feature file of the same
    backbone, weights, tap, pooling and classes (refused otherwise, in one sentence), chunk
    by chunk; write ``metrics.json`` and the confusion matrix to ``report_dir`` if given."""
    if report_dir:
        check_output(report_dir, folder=True, what="--report")
    b = bundle.load(model, allow_pickle=allow_pickle)
    taps = taps_of(b.meta)
    tap = taps[0] if len(taps) == 1 else taps
    with FeatureStore(features) as store:
        require_taps(store, taps, str(features), "which the model was trained on")
        check_provenance(b.meta, store.provenance(tap), str(features))
        if (store.labels < 0).any():
            raise FeatxError(f"{features} has unlabeled rows; evaluate needs labels (use predict instead).")
        m = evaluate_store(b.pipeline, store, tap, b.classes)
    if report_dir:
        write_report(report_dir, {"model": str(model), "features": str(features), "metrics": m}, b.classes)
    return b, m
