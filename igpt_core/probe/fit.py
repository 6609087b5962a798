"""The linear probe itself: logistic regression on standardised features, C chosen on validation.

As the paper does it (Chen et al. 2020, §2.4): L-BFGS, as scikit-learn runs it. Every fit runs on one
BLAS thread, so its numbers do not depend on the machine's thread settings; several fits run at
once in worker processes instead (`fit_probes`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from ..errors import IgptError

# Regularisation strengths tried, ascending (each fit warm-starts from the previous one). Features
# are standardised, so one grid serves every width; the best C is chosen on the validation split.
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


# Every fit runs on one BLAS/OpenMP thread. At probe sizes a threaded product costs more than it
# saves (digits, 1294 × 128 features, the default C grid: 18.6 s on 2 threads, 1.05 s on 1), and
# the order of a threaded sum depends on the thread count, which changed L-BFGS's path and so the
# accuracies. Pinned, a fit gives the same numbers on every machine setting; the cores are used by
# fitting several layers at once in separate processes instead (`fit_probes`).
FIT_THREADS = 1


def fit_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, Cs=DEFAULT_CS, max_iter: int = 1000,
              classes=None) -> dict:
    """Logistic regression on standardised features; C chosen by validation accuracy.

    The scaler is fitted on the training features only. Each C (ascending) is fitted on the training
    split with L-BFGS, warm-starting from the previous C; the C with the best validation accuracy
    (the smallest such C on ties) is reported with its validation and test accuracy. The model is
    not refitted on train + val, so the validation accuracy is an honest estimate for the chosen C's
    model and the test split is touched once per C only to read off the reported number.
    Runs on FIT_THREADS BLAS/OpenMP threads whatever the process's settings, so the result does not
    depend on them.

    Returns {"C", "val_acc", "test_acc", "train_acc", "confusion", "val_accs": {C: acc}, "iterations":
    {C: L-BFGS iterations}, "converged"} ("converged": whether the chosen C's fit converged within
    max_iter). "confusion" is the chosen C's test confusion matrix as lists of counts: row i holds the
    test images of class classes[i], column j the ones predicted as classes[j]; `classes` are the
    label values (default: every label seen in the three splits, ascending).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))
    if len(np.unique(train_y)) < 2:
        raise IgptError("the probe's training split holds a single class: use more training images (max_train)")
    if not Cs:
        raise IgptError("fit_probe needs at least one value of C")
    classes = np.unique(np.concatenate([train_y, val_y, test_y])) if classes is None else np.asarray(classes)
    with threadpool_limits(limits=FIT_THREADS):
        scaler = StandardScaler().fit(np.asarray(train_x, dtype=np.float64))
        tx, vx, sx = (scaler.transform(np.asarray(x, dtype=np.float64)) for x in (train_x, val_x, test_x))
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)
        best, val_accs, iterations, converged = None, {}, {}, True
        for C in sorted(float(c) for c in Cs):
            clf.set_params(C=C)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(tx, train_y)
            this_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            val_acc = float((clf.predict(vx) == val_y).mean())
            val_accs[C], iterations[C] = val_acc, int(clf.n_iter_.max())
            if best is None or val_acc > best["val_acc"]:
                predicted = clf.predict(sx)
                best = {
                    "C": C,
                    "val_acc": val_acc,
                    "test_acc": float((predicted == test_y).mean()),
                    "train_acc": float((clf.predict(tx) == train_y).mean()),
                    "confusion": confusion_matrix(test_y, predicted, classes).tolist(),
                }
                converged = this_converged
    return {**best, "val_accs": val_accs, "iterations": iterations, "converged": converged}


def confusion_matrix(true, predicted, classes) -> np.ndarray:
    """Counts (len(classes), len(classes)) int64: row i = true class classes[i], column j = predicted
    class classes[j]. Every label must be one of `classes`."""
    index = {label: i for i, label in enumerate(np.asarray(classes).tolist())}
    try:
        rows = [index[label] for label in np.asarray(true).tolist()]
        cols = [index[label] for label in np.asarray(predicted).tolist()]
    except KeyError as err:
        raise IgptError(f"label {err.args[0]!r} is not one of the classes {list(index)}") from None
    counts = np.zeros((len(index), len(index)), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return counts


def fit_workers() -> int:
    """Processes `fit_probes` uses by default: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fit_probes(jobs, *, Cs=DEFAULT_CS, classes=None, workers: int | None = None, on_fit=None) -> dict:
    """`fit_probe` on many feature sets: {key: result} for jobs [(key, (train_x, train_y, val_x,
    val_y, test_x, test_y)), ...], fitted in `workers` processes (default: one per core); `classes`
    orders every fit's confusion matrix (see fit_probe).

    Each fit is single-threaded (FIT_THREADS), so the results do not depend on `workers`: on two
    cores, two single-threaded fits at once take about half the time of one after the other, where
    one fit on two BLAS threads took 18× longer. Workers are started with forkserver (spawn where
    that does not exist), never forked from this process: a fork of a process that has run torch's
    thread pool can deadlock. on_fit(key, result) is called in the caller's thread as each fit ends.
    """
    jobs = list(jobs)
    workers = min(fit_workers() if workers is None else int(workers), len(jobs))
    results = {}

    def finish(key, result):
        results[key] = result
        if on_fit is not None:
            on_fit(key, result)

    if workers <= 1:
        for key, arrays in jobs:
            finish(key, fit_probe(*arrays, Cs=Cs, classes=classes))
        return results
    with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_stop_with_parent) as pool:
        pending = {pool.submit(_fit_job, arrays, tuple(Cs), classes): key for key, arrays in jobs}
        try:
            for future in as_completed(pending):
                finish(pending[future], future.result())
        except BaseException:
            for future in pending:
                future.cancel()  # the running fits end with their processes, at most one fit later
            raise
    return results


def _fit_job(arrays, Cs, classes) -> dict:
    """What a fit_probes worker process runs (a module-level function, so it can be pickled)."""
    return fit_probe(*arrays, Cs=Cs, classes=classes)


def _stop_with_parent() -> None:
    """In a worker: exit when the process that started it is gone (killed, say), instead of
    waiting for work forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch():
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _worker_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The server imports torch (with this module) and scikit-learn once; each worker is forked from it.
    context.set_forkserver_preload([__name__, "sklearn.linear_model", "sklearn.preprocessing"])
    return context


def warm_up_workers(workers: int | None = None) -> None:
    """Start the process that fit_probes' workers are forked from, so that its imports (torch,
    scikit-learn: seconds) happen while the caller still extracts features. Nothing to do for one
    worker, or where there is no forkserver."""
    if (fit_workers() if workers is None else workers) > 1 and _worker_context().get_start_method() == "forkserver":
        import multiprocessing.forkserver

        multiprocessing.forkserver.ensure_running()

