"""Train / val / test cut the same way every time, given a seed.

Where a source has an official test set (CIFAR, MNIST, STL-10, ImageNet's validation set) `test` is
that set and `val` is 10% of the official training set held out by a seeded permutation, as in the
iGPT paper. Otherwise a seeded 20% is `test` and 10% of the rest is `val`.
"""

from __future__ import annotations

import numpy as np

from ..errors import DatasetError

SPLITS = ("train", "val", "test")
# Percentages, applied with round-half-up integer arithmetic so split sizes never depend on floats.
TEST_PERCENT = 20  # only for sources without an official test set
VAL_PERCENT = 10  # of what remains for training (iGPT holds out 10% of the training set)


def split_indices(n: int, split: str, seed: int, *, test_percent: int) -> np.ndarray:
    """Indices (sorted, so the source's order is kept) of `split` among n items.

    One seeded permutation is cut into test | val | train, so the three are disjoint, cover all n
    items, and do not depend on which split is asked for. `test_percent=0` for sources that have an
    official test set: then only train and val are cut from the official training set.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test = (n * test_percent + 50) // 100
    n_val = ((n - n_test) * VAL_PERCENT + 50) // 100
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return np.sort(parts[split])


def take_split(images, labels, request, *, test_percent: int):
    """The rows of `request.split` (a registry `Request`); an empty split is an error, not a silent
    zero-length dataset."""
    index = split_indices(len(images), request.split, request.seed, test_percent=test_percent)
    if len(index) == 0:
        raise DatasetError(
            f"the {request.split} split is empty: the dataset has only {len(images)} images; add more images"
        )
    return images[index], (labels[index] if labels is not None else None)


def check_labels(labels: np.ndarray, n_classes: int, where) -> None:
    """Refuse labels outside 0..n_classes-1: the files do not belong together."""
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(
            f"labels in {where} run {labels.min()}..{labels.max()} but there are {n_classes} classes: "
            "the files do not belong together; replace them with the official files"
        )


def grey_to_rgb(batch: np.ndarray) -> np.ndarray:
    """(N, H, W) grey → (N, H, W, 3) by repeating the channel (a batch version of images.to_rgb)."""
    return np.repeat(batch[..., None], 3, axis=-1)
