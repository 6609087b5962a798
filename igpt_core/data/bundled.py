"""The built-in datasets, needing no files: scikit-learn's digits, digits moved about a bigger canvas,
and crops of the photos that scikit-learn and scikit-image ship."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import resize
from .registry import Request, register
from .splits import SPLITS, TEST_PERCENT, grey_to_rgb, take_split

@register("digits", "scikit-learn's 1797 handwritten digits, 8×8, 10 classes (built in, the default)")
def _load_digits(request: Request):
    from sklearn import datasets  # imported here: scikit-learn takes ~1 s to import

    digits = datasets.load_digits()
    # Values are 0..16 (counts of set pixels in 4×4 blocks): scale to the full 0..255 range.
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)
    images, labels = take_split(grey_to_rgb(grey), digits.target, request, test_percent=TEST_PERCENT)
    return images, labels, [str(d) for d in range(10)]


# Translated digits: every digit once, at a size and position drawn from this fixed stream, so the
# dataset is the same on every machine; the split seed only decides which digits land in which split.
MOVED_CANVAS = 16
MOVED_SIDES = (8, 12)  # smallest and largest digit side, in pixels
MOVED_SEED = 2020


@register("digits-moved", "the same 1797 digits, each scaled to 8..12 pixels and placed at a random spot of a "
          "16×16 canvas (fixed seed), 10 classes (built in; pixels alone no longer separate the classes)")
def _load_digits_moved(request: Request):
    from sklearn import datasets

    digits = datasets.load_digits()
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(MOVED_SEED)
    canvas = np.zeros((len(grey), MOVED_CANVAS, MOVED_CANVAS), dtype=np.uint8)
    for i, digit in enumerate(grey):
        side = int(rng.integers(MOVED_SIDES[0], MOVED_SIDES[1] + 1))
        top, left = (int(v) for v in rng.integers(0, MOVED_CANVAS - side + 1, size=2))
        scaled = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR))
        canvas[i, top : top + side, left : left + side] = scaled
    images, labels = take_split(grey_to_rgb(canvas), digits.target, request, test_percent=TEST_PERCENT)
    return images, labels, [str(d) for d in range(10)]


# Photos by split. Splitting by photo (not by crop) keeps val/test crops from scenes never seen in
# training; overlapping crops of one photo would otherwise leak between splits. skimage's `cat` is
# the same picture as `chelsea`, so it is left out.
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("china", "flower", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"),
    "val": ("coffee",),
    "test": ("chelsea",),
}
PHOTO_CROPS = {"train": 4096, "val": 512, "test": 512}


@lru_cache(maxsize=1)
def _bundled_photos() -> dict[str, np.ndarray]:
    """The offline photos of scikit-learn and scikit-image, read-only so the cache can't be altered."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {Path(f).stem: image for f, image in zip(sample.filenames, sample.images)}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        photos[name] = getattr(skimage.data, name)()
    for image in photos.values():
        image.flags.writeable = False
    return photos


# What each built-in photo shows, for galleries.
PHOTO_NAMES = {"china": "temple", "flower": "flower", "astronaut": "astronaut", "rocket": "rocket",
               "hubble_deep_field": "galaxies", "immunohistochemistry": "cells", "retina": "retina",
               "coffee": "coffee", "chelsea": "cat"}


def builtin_photos() -> dict[str, np.ndarray]:
    """The built-in photos at full size (uint8 RGB, read-only), by what they show: cat, astronaut, ..."""
    return {PHOTO_NAMES[name]: photo for name, photo in _bundled_photos().items()}


@register("photos", "unlabelled 32×32 crops of the photos shipped with scikit-learn and scikit-image (built in)")
def _load_photos(request: Request):
    size = request.resolution or 32
    photos = [_bundled_photos()[name] for name in PHOTO_SPLITS[request.split]]
    # Shrink each photo first so its short side is 8 × size (never enlarging): the smallest crop
    # (1/8 of the short side) is then still >= size pixels, and resizing small crops is ~3× faster
    # than resizing crops of the full-size photos. PIL directly, as the photos are not square.
    shrunk = []
    for photo in photos:
        h, w = photo.shape[:2]
        scale = min(1.0, 8 * size / min(h, w))
        if scale < 1:
            photo = np.asarray(Image.fromarray(photo).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        shrunk.append(photo)
    # A different random stream per split, all fixed by the seed.
    rng = np.random.default_rng([request.seed, SPLITS.index(request.split)])
    crops = []
    for _ in range(PHOTO_CROPS[request.split]):
        photo = shrunk[rng.integers(len(shrunk))]
        h, w = photo.shape[:2]
        short = min(h, w)
        side = int(rng.integers(short // 8, short // 2 + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crops.append(resize(photo[top : top + side, left : left + side], size))
    return np.stack(crops), None, None
