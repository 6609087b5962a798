"""What layers have learned, beyond probe accuracy: CKA similarity, confusion, 2-D projections.

Everything here works on feature matrices (images × width) such as the probe's cached features
(`probe.cached_features`), so nothing re-runs the model.

- **Linear CKA** (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited")
  compares two representations of the same images: 1 when one is a rotation and rescaling of the other,
  near 0 when unrelated. We use the unbiased HSIC estimator (Song et al., 2012), as Nguyen et al. (2021)
  do: its value does not drift with the number of images, so estimates from minibatches can be averaged.
  With linear kernels K = XXᵀ a single pair is computed from the features themselves (O(n·d²), never
  an n × n matrix), so 10,000 images of width 1536 are as easy as 500 of width 64. Maps of many layers
  (`cka_matrix`, `cka_over_training`) summarise each layer once: with at most `GRAM_IMAGES` images, by
  its U-centred Gram matrix (Székely & Rizzo 2014), whose inner products are exactly the unbiased HSIC,
  so each further pair costs n² instead of n·d² (48 layers of width 1536: seconds instead of minutes).
- **Confusion** counts come from the probes (stored with their results); here they become per-class
  accuracy.
- **Projections** are PCA: fast, deterministic, and linear, which is the question a linear probe asks.
  Across checkpoints each axis is flipped to agree with the previous frame, so an animation over
  training does not jump when an eigenvector's sign flips.
- **A run's cached features** (`probed_features`, `layer_over_training`, `run_cka_over_training`) are
  read one checkpoint at a time, on at most `max_images` evenly spaced test images (the same images
  at every checkpoint); checkpoints whose features are not cached are returned as missing, for the
  caller to say which `igpt probe` command makes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from .probe import cached_features, load_probe_results
from .runs import as_run

# Above this many images a layer's n × n Gram matrix (8·n² bytes) costs more than its features:
# CKA maps then compare features pair by pair.
GRAM_IMAGES = 2048
# The images the apps' CKA maps use at most: enough for the unbiased estimator's noise to be far below
# the differences a heat map shows, few enough that a 48-layer map takes seconds.
CKA_IMAGES = 1000


def _hsic_terms(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC of linear kernels K = xxᵀ, L = yyᵀ (Song et al. 2012, eq. 5), from the features:
    (tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1) / (n(n-3)), K̃ = K with a zero diagonal."""
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 images, got {n}")
    diag_k = np.einsum("ij,ij->i", x, x)  # diag(K)
    diag_l = np.einsum("ij,ij->i", y, y)
    trace_kl = np.sum((x.T @ y) ** 2) - diag_k @ diag_l  # tr(K̃L̃) = ‖xᵀy‖²_F − Σ K_ii L_ii
    k_rows = x @ x.sum(0) - diag_k  # K̃1
    l_rows = y @ y.sum(0) - diag_l  # L̃1
    total = trace_kl + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k_rows @ l_rows)
    return float(total / (n * (n - 3)))


def _as_matrix(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be a 2-D (images × width) matrix, got shape {a.shape}")
    return a


def linear_cka(x, y, *, batch_size: int | None = None) -> float:
    """Linear CKA of two feature matrices of the same images (n × d1 and n × d2), in [0, 1] up to the
    estimator's noise. `batch_size`: average the HSIC estimates of consecutive minibatches of that many
    images (Nguyen et al. 2021), for features too many to hold at once; None uses all images together."""
    x, y = _as_matrix(x), _as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same images: {x.shape[0]} rows against {y.shape[0]}")
    starts = range(0, x.shape[0], batch_size or x.shape[0])
    if batch_size:
        starts = [s for s in starts if x.shape[0] - s >= 4]  # a last sliver too small for the estimator
    xy = xx = yy = 0.0
    for s in starts:
        xb, yb = x[s:s + (batch_size or x.shape[0])], y[s:s + (batch_size or x.shape[0])]
        xy += _hsic_terms(xb, yb)
        xx += _hsic_terms(xb, xb)
        yy += _hsic_terms(yb, yb)
    if xx <= 0 or yy <= 0:
        return 0.0  # a constant representation carries nothing to compare
    return float(xy / np.sqrt(xx * yy))


class _Summary:
    """What the unbiased HSIC needs of one feature matrix, computed once for all the pairs it is in:
    its U-centred Gram matrix when the images are few (≤ GRAM_IMAGES), otherwise the features."""

    def __init__(self, x):
        x = _as_matrix(x)
        n = self.n = x.shape[0]
        if n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 images, got {n}")
        self.features, self.gram = x, None
        if n <= GRAM_IMAGES:
            # U-centring K̃ (K with a zero diagonal): subtract row and column sums/(n-2), add the
            # total/((n-1)(n-2)), zero the diagonal. Then HSIC_unbiased(K, L) = ⟨Ũ(K̃), Ũ(L̃)⟩ / (n(n-3)).
            k = x @ x.T
            np.fill_diagonal(k, 0.0)
            sums = k.sum(0)
            k -= (sums[:, None] + sums[None, :]) / (n - 2)
            k += sums.sum() / ((n - 1) * (n - 2))
            np.fill_diagonal(k, 0.0)
            self.features, self.gram = None, k
        self.self_hsic = self.hsic(self)

    def hsic(self, other: "_Summary") -> float:
        if self.n != other.n:
            raise ValueError(f"CKA compares the same images: {self.n} rows against {other.n}")
        if self.gram is None:
            return _hsic_terms(self.features, other.features)
        return float(np.vdot(self.gram, other.gram) / (self.n * (self.n - 3)))

    def cka(self, other: "_Summary") -> float:
        if self.self_hsic <= 0 or other.self_hsic <= 0:
            return 0.0  # a constant representation carries nothing to compare
        return float(self.hsic(other) / np.sqrt(self.self_hsic * other.self_hsic))


def cka_matrix(features: Mapping[int, np.ndarray], other: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """CKA of every layer in `features` (rows, in key order) against every layer in `other` (columns),
    which defaults to `features` itself: the layer × layer map of one checkpoint."""
    rows = [_Summary(features[layer]) for layer in sorted(features)]
    cols = rows if other is None else [_Summary(other[layer]) for layer in sorted(other)]
    out = np.empty((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            out[i, j] = out[j, i] if other is None and j < i else a.cka(b)  # symmetric
    return out


def _against(reference: dict[int, _Summary], features: Mapping[int, np.ndarray]) -> list[float]:
    """CKA of each layer's features with the same layer's reference, in layer order (NaN for a layer
    that `features` lacks, e.g. one probed only at some checkpoints)."""
    return [_Summary(features[layer]).cka(summary) if layer in features else np.nan
            for layer, summary in sorted(reference.items())]


def cka_over_training(by_step: Mapping[int, Mapping[int, np.ndarray]], reference: int | None = None) -> np.ndarray:
    """Layer × checkpoint: CKA of each layer at each checkpoint (columns, in step order) with the same
    layer at the `reference` checkpoint (default: the last). Shows which layers settle early in training
    and which keep changing."""
    steps = sorted(by_step)
    reference = steps[-1] if reference is None else reference
    summaries = {layer: _Summary(x) for layer, x in by_step[reference].items()}
    return np.array([_against(summaries, by_step[s]) for s in steps]).T


def per_class_accuracy(confusion) -> np.ndarray:
    """Accuracy of each true class (rows of a confusion matrix of counts); NaN for a class with no image."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / totals, np.nan)


def pca_2d(x) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of `x` (n × d): (coordinates n × 2, explained variance
    fraction of each). Features are centred, not scaled (scaling would inflate dead dimensions)."""
    x = _as_matrix(x)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variance = s**2 / max((s**2).sum(), 1e-300)
    components = vt[:2]
    if components.shape[0] < 2:  # a width-1 layer: pad with a zero axis
        components = np.vstack([components, np.zeros_like(components)])
        variance = np.append(variance, 0.0)
    return centred @ components.T, variance[:2]


def pca_over_training(by_step: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """2-D PCA coordinates of one layer at each checkpoint (step -> n × 2), each axis's sign chosen to
    agree with the previous checkpoint's, so that playing the frames in order shows change, not flips."""
    frames, previous = {}, None
    for step in sorted(by_step):
        coords, _ = pca_2d(by_step[step])
        if previous is not None:
            signs = np.sign(np.sum(coords * previous, axis=0))
            coords = coords * np.where(signs == 0, 1, signs)
        frames[step] = previous = coords
    return frames


# -- a run's cached features --------------------------------------------------------------------------


def evenly_spaced(n: int, max_images: int | None) -> np.ndarray:
    """Indices of at most `max_images` of n images, spread evenly over all of them (all when None)."""
    if max_images is None or n <= max_images:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_images).round().astype(int))


class ProbedFeatures(NamedTuple):
    """One checkpoint's cached probe features, on some of the split's images."""

    features: dict[int, np.ndarray]  # layer -> (n, d)
    labels: np.ndarray  # (n,)
    images: np.ndarray  # (n,) the images' indices in the split


def probed_features(run, step: int, dataset: str | None = None, *, layers=None, split: str = "test",
                    max_images: int | None = None, runs_dir=None) -> ProbedFeatures | None:
    """The cached probe features of checkpoint `step` on at most `max_images` evenly spaced images of
    the split, the same ones at every checkpoint; only `layers` if given. None when they are not
    cached: `igpt probe RUN --checkpoints STEP` makes them."""
    found = cached_features(run, dataset, step, split, layers=layers, runs_dir=runs_dir)
    if found is None:
        return None
    features, labels = found
    keep = evenly_spaced(len(labels), max_images)
    return ProbedFeatures({layer: x[keep] for layer, x in features.items()}, labels[keep], keep)


def probed_steps(run, dataset: str | None = None, *, runs_dir=None) -> list[int]:
    """The checkpoints with stored probe results on `dataset` (default: the run's own), ascending."""
    table = load_probe_results(as_run(run, runs_dir), dataset)
    return [] if table is None else table.steps


class TrainingFeatures(NamedTuple):
    """One layer's cached features over training."""

    by_step: dict[int, np.ndarray]  # step -> (n, d), in step order
    labels: np.ndarray | None  # (n,), None when no checkpoint's features are cached
    images: np.ndarray | None  # (n,) the images' indices in the split
    missing: list[int]  # probed checkpoints whose features are not cached


def layer_over_training(run, layer: int, dataset: str | None = None, *, split: str = "test",
                        max_images: int | None = None, runs_dir=None) -> TrainingFeatures:
    """Layer `layer`'s cached features at every probed checkpoint (only that layer is read), on at
    most `max_images` evenly spaced images: what `pca_over_training` animates."""
    run = as_run(run, runs_dir)
    by_step, found, missing = {}, None, []
    for step in probed_steps(run, dataset):
        at_step = probed_features(run, step, dataset, layers=[layer], split=split, max_images=max_images)
        if at_step is None:
            missing.append(step)
        else:
            found, by_step[step] = at_step, at_step.features[layer]
    if found is None:
        return TrainingFeatures({}, None, None, missing)
    return TrainingFeatures(by_step, found.labels, found.images, missing)


class CkaOverTraining(NamedTuple):
    """`cka_over_training` of a run's cached features."""

    steps: list[int]  # the columns: checkpoints with cached features, ascending
    layers: list[int]  # the rows
    values: np.ndarray  # (layers, steps): each layer against itself at the reference checkpoint
    reference: int | None  # the last checkpoint with cached features; None if there is none
    missing: list[int]  # probed checkpoints whose features are not cached


def run_cka_over_training(run, dataset: str | None = None, *, split: str = "test", max_images: int | None = CKA_IMAGES,
                          runs_dir=None) -> CkaOverTraining:
    """Layer × checkpoint CKA of a run's cached features against its last cached checkpoint, reading
    one checkpoint at a time (a big model's features at every checkpoint need not fit in memory)."""
    run = as_run(run, runs_dir)
    steps = probed_steps(run, dataset)
    missing, columns, summaries, reference = [], {}, None, None
    for step in reversed(steps):  # the reference first: the last checkpoint whose features are cached
        found = probed_features(run, step, dataset, split=split, max_images=max_images)
        if found is None:
            missing.append(step)
            continue
        if summaries is None:
            reference, summaries = step, {layer: _Summary(x) for layer, x in found.features.items()}
        columns[step] = _against(summaries, found.features)
    done = sorted(columns)
    values = np.array([columns[s] for s in done]).T if done else np.empty((0, 0))
    return CkaOverTraining(done, sorted(summaries or {}), values, reference, sorted(missing))
