"""STL-10 in its official binary format, read through np.memmap (100 000 unlabelled 96×96 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .core import ImageRows
from .download import download_archive, ensure_files
from .registry import Request, register
from .splits import take_split

STL10_FOLDER = "stl10_binary"  # as extracted from the official archive
STL10_SIDE = 96
STL10_FILES = {  # split -> (images, labels); the unlabelled images have no labels file
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"


def _read_stl10_images(path: Path) -> np.ndarray:
    """The images of an STL-10 .bin file as a lazy (N, 96, 96, 3) view of an np.memmap.

    Each image is 3 channels of 96×96 bytes, each channel stored column by column (the files were
    written from MATLAB): read as (N, 3, 96, 96) that is (N, C, x, y), transposed to (N, y, x, C).
    """
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise DatasetError(
            f"{path} holds {size} bytes, not a whole number of 3×96×96 images ({per_image} bytes each): "
            "it is truncated or not an STL-10 file; replace it with the official file"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // per_image, 3, STL10_SIDE, STL10_SIDE))
    return raw.transpose(0, 3, 2, 1)


def _read_stl10_labels(path: Path, n_images: int, images_path: Path) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n_images:
        raise DatasetError(
            f"{path} holds {len(labels)} labels but {images_path} holds {n_images} images: a file is truncated "
            "or they do not belong together; replace them with the official files"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > len(STL10_CLASSES)):
        raise DatasetError(f"labels in {path} run {labels.min()}..{labels.max()}, not 1..10: replace it with the official file")
    return labels - 1  # the files number the classes from 1


@register("stl10-unlabeled", "STL-10's 100 000 unlabelled 96×96 images, for pre-training (same folder as stl10)")
@register("stl10", "STL-10, 96×96 colour, 10 classes, 5000 train / 8000 test (binary files in DATA_DIR/stl10_binary)")
def _load_stl10(request: Request):
    """`stl10`: the 5000 labelled training and 8000 test images. `stl10-unlabeled`: the 100 000
    unlabelled images, for pre-training (train and val cut from them; test = the test images, unlabelled)."""
    folder = request.data_dir / STL10_FOLDER
    names = [n for pair in STL10_FILES.values() for n in pair if n]
    by_hand = (f"Download {STL10_URL} elsewhere and extract it into {request.data_dir}, so that "
               f"{folder} holds {', '.join(names)}.")
    fetch = lambda: download_archive(STL10_URL, STL10_MD5, request.data_dir, STL10_FOLDER, names, by_hand)  # noqa: E731
    ensure_files(folder, names, "STL-10", STL10_URL, request, fetch)
    unlabelled = request.key == "stl10-unlabeled"
    if request.split == "test" or not unlabelled:
        image_name, label_name = STL10_FILES["test" if request.split == "test" else "train"]
        images = _read_stl10_images(folder / image_name)
        labels = _read_stl10_labels(folder / label_name, len(images), folder / image_name)
    else:
        images, labels = _read_stl10_images(folder / STL10_FILES["unlabeled"][0]), None
    rows = ImageRows.of(images)
    if request.split != "test":
        rows, labels = take_split(rows, labels, request, test_percent=0)
    if unlabelled:
        return rows, None, None
    return rows, labels, list(STL10_CLASSES)
