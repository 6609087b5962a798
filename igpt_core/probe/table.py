"""Stored probe results: the table of one run on one dataset (`ProbeTable`), reading it back, and
Spearman's ρ between the checkpoints' validation loss and their probe accuracy.

    runs/<run>/probes/<dataset>.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IgptError
from ..files import safe_name
from ..runs import Run, as_run

RESULTS_FORMAT = 1


@dataclass
class ProbeTable:
    """The stored probe results of one run on one dataset, after the latest `probe_run`."""

    dataset: str
    # {"step", "val_loss", "layer", "val_acc", "test_acc", "C", "confusion"}, sorted by (step, layer);
    # "confusion" (test counts, rows = true class) is absent from rows stored before it was kept
    rows: list[dict]
    references: dict  # {"raw_pixels": {...} | None, "random_init": [{"layer", ...}]}, with the same scores
    objective: str
    n_layer: int
    path: Path
    note: str | None = None  # e.g. that images were resized: callers print it as a warning
    settings: dict = field(default_factory=dict)
    created: str | None = None
    # Probes of several layers' features joined end to end (the paper's best ImageNet probe, 72.0%,
    # joins five layers of iGPT-XL): {"step", "val_loss", "layers": [...], "val_acc", "test_acc", "C"}.
    concat: list[dict] = field(default_factory=list)
    data_hashes: dict = field(default_factory=dict)  # {split: hash of its exact images}: names the feature cache

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def steps(self) -> list[int]:
        """The probed checkpoints, ascending."""
        return sorted({r["step"] for r in self.rows})

    def best(self, step: int | None = None) -> dict | None:
        """The row with the best validation accuracy (of one checkpoint, if `step` is given).

        Chosen on validation, never on test accuracy, as the paper does; ties go to the earlier
        checkpoint, then the shallower layer.
        """
        rows = [r for r in self.rows if step is None or r["step"] == step]
        return max(rows, key=lambda r: (r["val_acc"], -r["step"], -r["layer"]), default=None)

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names, index = label = the confusion matrices' row and column."""
        return self.settings.get("classes")

    def confusion(self, step: int, layer: int) -> np.ndarray | None:
        """The test confusion matrix of the probe of `layer` at checkpoint `step`: int64 counts
        (classes, classes), row = true class, column = predicted class. None for a row stored before
        confusion matrices were kept; KeyError if that (step, layer) was never probed."""
        row = next((r for r in self.rows if r["step"] == step and r["layer"] == layer), None)
        if row is None:
            raise KeyError(f"no probe of layer {layer} at step {step} in {self.path.name}")
        return _as_counts(row.get("confusion"))

    def reference_confusion(self, name: str, layer: int | None = None) -> np.ndarray | None:
        """The test confusion matrix of a reference: name "raw_pixels", or "random_init" with a layer.
        None where it is not stored."""
        if name == "raw_pixels":
            return _as_counts((self.references.get("raw_pixels") or {}).get("confusion"))
        row = next((r for r in self.references.get("random_init", []) if r["layer"] == layer), {})
        return _as_counts(row.get("confusion"))

    def per_class_accuracy(self, step: int, layer: int) -> np.ndarray | None:
        """Test accuracy of each class (the confusion matrix's diagonal over its row sums; NaN for a
        class without test images), or None where no confusion matrix is stored."""
        counts = self.confusion(step, layer)
        if counts is None:
            return None
        totals = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(counts) / totals, np.nan)

    def best_by_step(self) -> list[dict]:
        """Each checkpoint's best-layer row, by step."""
        return [self.best(step) for step in self.steps]

    def loss_accuracy_rho(self, metric: str = "test_acc") -> float | None:
        """Spearman ρ between the checkpoints' validation loss and their best layer's accuracy.

        The paper's "better generative models learn better features" (§4.1, Figure 3) is a negative ρ.
        Checkpoints without a stored val loss are left out; None with fewer than 3 of them.
        """
        rows = [r for r in self.best_by_step() if r.get("val_loss") is not None]
        return spearman([r["val_loss"] for r in rows], [r[metric] for r in rows])

    def to_dict(self) -> dict:
        return {
            "format": RESULTS_FORMAT,
            "dataset": self.dataset,
            "objective": self.objective,
            "n_layer": self.n_layer,
            "settings": self.settings,
            "rows": self.rows,
            "references": self.references,
            "concat": self.concat,
            "created": self.created,
            "data_hashes": self.data_hashes,
        }


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks, so ties share a rank); None with
    fewer than 3 points or when either side has no spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        return None
    rx, ry = _average_ranks(x), _average_ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _as_counts(confusion) -> np.ndarray | None:
    return None if confusion is None else np.asarray(confusion, dtype=np.int64)


def results_path(run: Run, dataset: str) -> Path:
    return run.path / "probes" / f"{safe_name(dataset, '_') or 'dataset'}.json"


def _is_confusion(x) -> bool:
    """A square matrix of counts, as lists (or absent: None)."""
    return x is None or (isinstance(x, list) and all(
        isinstance(row, list) and len(row) == len(x)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in row) for row in x))


def _is_scores(x) -> bool:
    """Accuracies in [0, 1] and, where stored, a confusion matrix."""
    return isinstance(x, dict) and _is_acc(x.get("val_acc")) and _is_acc(x.get("test_acc")) \
        and _is_confusion(x.get("confusion"))


def _is_acc(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _are_concat_rows(rows, n_layer: int) -> bool:
    return isinstance(rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("layers"), list)
        and all(isinstance(layer, int) and 0 <= layer <= n_layer for layer in r["layers"])
        and _is_scores(r)
        for r in rows
    )


def load_probe_results(run, dataset: str | None = None, *, runs_dir=None) -> ProbeTable | None:
    """The stored probe table of `run` (a Run or a run name) on `dataset` (default: the run's own),
    or None if it was never probed. A damaged file, or one of a newer format than this igpt reads,
    raises IgptError naming the file."""
    run = as_run(run, runs_dir)
    dataset = dataset or run.info.get("dataset")
    path = results_path(run, dataset)
    if not path.exists():
        return None

    def damaged(why: str):
        return IgptError(f"the probe results {path} are damaged ({why}); delete the file and run "
                         f"`igpt probe {run.name} --dataset {dataset}` again")

    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise damaged(f"not readable JSON: {err}") from None
    if not isinstance(value, dict):
        raise damaged("not a JSON object")
    fmt = value.get("format", RESULTS_FORMAT)
    if not isinstance(fmt, int) or fmt > RESULTS_FORMAT:
        raise IgptError(f"the probe results {path} have format {fmt!r}, newer than this igpt reads "
                        f"({RESULTS_FORMAT}); update igpt")
    problem = _table_problem(value)
    if problem:
        raise damaged(problem)
    return ProbeTable(dataset=str(value["dataset"]), rows=value["rows"], references=value["references"],
                      objective=value["objective"], n_layer=value["n_layer"], path=path,
                      settings=value.get("settings") or {}, created=value.get("created"),
                      concat=value.get("concat", []), data_hashes=value.get("data_hashes") or {})


def _table_problem(value: dict) -> str | None:
    """What is wrong with a stored table's JSON object, or None if nothing is."""
    for key in ("dataset", "rows", "references", "objective", "n_layer"):
        if key not in value:
            return f"missing {key!r}"
    if not isinstance(value["rows"], list):
        return "'rows' is not a list"
    n_layer = value["n_layer"]
    if not isinstance(n_layer, int):
        return "'n_layer' is not a whole number"
    for i, row in enumerate(value["rows"]):
        problem = _row_problem(row, n_layer)
        if problem:
            return f"row {i} {problem}"
    refs = value["references"]
    if not isinstance(refs, dict):
        return "'references' is not an object"
    raw = refs.get("raw_pixels")
    if raw is not None and not _is_scores(raw):
        return "'references.raw_pixels' is malformed"
    rand = refs.get("random_init", [])
    if not isinstance(rand, list) or not all(isinstance(r, dict) and isinstance(r.get("layer"), int) and _is_scores(r)
                                             for r in rand):
        return "'references.random_init' is malformed"
    if not _are_concat_rows(value.get("concat", []), n_layer):
        return "'concat' is malformed"
    return None


def _row_problem(row, n_layer: int) -> str | None:
    """What is wrong with one (checkpoint, layer) row, said after "row i", or None."""
    if not isinstance(row, dict):
        return "is not an object"
    missing = [k for k in ("step", "layer", "val_acc", "test_acc", "C", "val_loss") if k not in row]
    if missing:
        return f"lacks {missing}"
    if not isinstance(row["step"], int) or not isinstance(row["layer"], int) or not 0 <= row["layer"] <= n_layer:
        return "has a bad step or layer"
    if not (_is_acc(row["val_acc"]) and _is_acc(row["test_acc"])):
        return "has accuracies outside [0, 1]"
    if not _is_confusion(row.get("confusion")):
        return "has a malformed confusion matrix"
    if row["val_loss"] is not None and not isinstance(row["val_loss"], (int, float)):
        return "has a non-numeric val_loss"
    return None
