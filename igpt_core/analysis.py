"""What layers have learned, beyond probe accuracy: CKA similarity, confusion, 2-D projections.

Everything here works on feature matrices (images × width) such as the probe's cached features
(`probe.cached_features`), so nothing re-runs the model.

- **Linear CKA** (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited")
  compares two representations of the same images: 1 when one is a rotation and rescaling of the other,
  near 0 when unrelated. We use the unbiased HSIC estimator (Song et al., 2012), as Nguyen et al. (2021)
  do: its value does not drift with the number of images, so estimates from minibatches can be averaged.
  With linear kernels K = XXᵀ every term is computed from the features themselves (O(n·d²), never an
  n × n matrix), so 10,000 images of width 1536 are as easy as 500 of width 64.
- **Confusion** counts come from the probes (stored with their results); here they become per-class
  accuracy.
- **Projections** are PCA: fast, deterministic, and linear, which is the question a linear probe asks.
  Across checkpoints each axis is flipped to agree with the previous frame, so an animation over
  training does not jump when an eigenvector's sign flips.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


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


def cka_matrix(features: Mapping[int, np.ndarray], other: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """CKA of every layer in `features` (rows, in key order) against every layer in `other` (columns),
    which defaults to `features` itself: the layer × layer map of one checkpoint."""
    other = features if other is None else other
    rows, cols = sorted(features), sorted(other)
    out = np.empty((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            if other is features and j < i:
                out[i, j] = out[j, i]  # symmetric
            else:
                out[i, j] = linear_cka(features[a], other[b])
    return out


def cka_over_training(by_step: Mapping[int, Mapping[int, np.ndarray]], reference: int | None = None) -> np.ndarray:
    """Layer × checkpoint: CKA of each layer at each checkpoint (columns, in step order) with the same
    layer at the `reference` checkpoint (default: the last). Shows which layers settle early in training
    and which keep changing."""
    steps = sorted(by_step)
    reference = steps[-1] if reference is None else reference
    layers = sorted(by_step[reference])
    return np.array([[linear_cka(by_step[s][layer], by_step[reference][layer]) for s in steps] for layer in layers])


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
