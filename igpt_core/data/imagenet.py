"""Downsampled ImageNet 32² / 64² in its official format: .npz batches, one file read at a time."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .core import ImageRows
from .download import ensure_files
from .registry import Request, register
from .splits import take_split

IMAGENET_TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
IMAGENET_TEST_FILE = "val_data.npz"  # the official validation set serves as the test set, as in the paper
IMAGENET_SOURCE = "https://image-net.org/download-images (Downsampled ImageNet, after logging in)"


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array `key` in an .npz file, read from its header only (the data may be GBs)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
    except KeyError:
        raise DatasetError(f"{path} has no array {key!r}: it is not a downsampled-ImageNet batch; replace it "
                           "with the official file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path} could not be read ({err}); it may be truncated: replace it with the official file") from None
    return tuple(shape)


def _read_npz(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path) as archive:
            return archive[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise DatasetError(f"{path} could not be read ({err}); it may be truncated: replace it with the official file") from None


def _imagenet_part(path: Path, side: int, cache: dict) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """One .npz batch as a lazy part: the whole file is read (.npz allows no less) when first asked for.

    `cache` is shared by the parts of one split and holds one file, so reading in order keeps at
    most one batch file in memory (~0.4 GB at 32², ~1.6 GB at 64²).
    """
    shape = _npz_shape(path, "data")
    if len(shape) != 2 or shape[1] != 3 * side * side:
        raise DatasetError(f"{path} holds data of shape {shape}; expected (N, {3 * side * side}) for {side}×{side} "
                           "images: replace it with the official file of this resolution")

    def take(local: np.ndarray) -> np.ndarray:
        if cache.get("path") != path:
            cache.clear()
            data = _read_npz(path, "data")
            if data.shape != shape:
                raise DatasetError(f"{path} holds data of shape {data.shape}, its header said {shape}: replace it")
            # Rows are channel-first (s² R, then s² G, then s² B, each row-major), as in CIFAR.
            cache.update(path=path, images=data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
        return cache["images"][local]

    return shape[0], take


@register("imagenet64", "downsampled ImageNet 64×64, as imagenet32 (.npz batches in DATA_DIR/imagenet64)")
@register("imagenet32", "downsampled ImageNet 32×32, 1000 classes, 1.28M train / 50 000 test "
          "(.npz batches in DATA_DIR/imagenet32; needs an ImageNet login, no --download)")
def _load_imagenet(request: Request):
    side = int(request.key.removeprefix("imagenet"))
    folder = request.data_dir / request.key
    names = [*IMAGENET_TRAIN_FILES, IMAGENET_TEST_FILE]

    def refuse_download():
        raise DatasetError(f"downsampled ImageNet cannot be downloaded by igpt (it needs an ImageNet login): "
                           f"download the {side}×{side} .npz files from {IMAGENET_SOURCE} and place "
                           f"{', '.join(names)} in {folder}")

    ensure_files(folder, names, f"ImageNet {side}×{side}", IMAGENET_SOURCE, request, refuse_download)
    files = [folder / IMAGENET_TEST_FILE] if request.split == "test" else [folder / f for f in IMAGENET_TRAIN_FILES]
    cache: dict = {}
    parts = [_imagenet_part(path, side, cache) for path in files]
    labels = []
    for path, (count, _) in zip(files, parts):
        part_labels = np.asarray(_read_npz(path, "labels"), dtype=np.int64).ravel()
        if len(part_labels) != count:
            raise DatasetError(f"{path} holds {count} images but {len(part_labels)} labels: replace it with the official file")
        if count and (part_labels.min() < 1 or part_labels.max() > 1000):
            raise DatasetError(f"labels in {path} run {part_labels.min()}..{part_labels.max()}, not 1..1000: "
                               "replace it with the official file")
        labels.append(part_labels - 1)  # the files number the classes from 1
    rows, labels = ImageRows(parts, side), np.concatenate(labels)
    if request.split != "test":
        rows, labels = take_split(rows, labels, request, test_percent=0)
    # The distributed files carry class numbers only; names are the files' own numbers, 1..1000.
    return rows, labels, [str(i) for i in range(1, 1001)]
