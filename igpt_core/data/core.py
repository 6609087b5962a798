"""A dataset split as igpt uses it: `Dataset` (in memory), `DatasetStream` (read batch by batch),
and the two entry points `load_dataset` and `open_dataset`.

Sources too large for memory (ImageNet, STL-10's 100 000 unlabelled images) are read lazily:
`open_dataset` gives a `DatasetStream` that yields batches of images, resized as they are read;
`load_dataset` reads all of it into one array. Token datasets (OpenAI's encoded CIFAR-10 and
ImageNet) hold palette ids rather than pixels: they carry `token_ids` (memory-mapped) and the
`palette` the ids refer to, and their images are decoded only when indexed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..images import resize
from ..palette import Palette
from .registry import Request, find_source
from .splits import SPLITS


@dataclass
class Dataset:
    """One split of a dataset: square uint8 RGB images and, when the source has them, labels."""

    name: str  # registry name as the user typed it, e.g. "digits", "folder:/x/y"
    split: str  # "train", "val" or "test"
    images: np.ndarray  # uint8, (N, H, W, 3), H == W (a `LazyImages` for token datasets)
    labels: np.ndarray | None  # int64 (N,), or None for unlabelled data
    classes: list[str] | None  # class names, index = label; None when unlabelled
    token_ids: np.ndarray | None = None  # (N, T) palette ids, for datasets stored as ids; else None
    palette: Palette | None = None  # the palette token_ids refer to; None when token_ids is None

    def __post_init__(self):
        # Datasets can also be built by hand (notebooks, tests): catch shapes the rest of igpt can't use.
        images = self.images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise DatasetError(
                f"dataset images must be uint8 of shape (N, H, H, 3), got {images.dtype} {images.shape}"
            )
        if self.labels is not None and self.labels.shape != (len(images),):
            raise DatasetError(f"{len(images)} images but labels of shape {self.labels.shape}")

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.images)


def default_data_dir() -> Path:
    """Where dataset files live: $IGPT_DATA_DIR if set, else ./data (absolute, for clear messages)."""
    env = os.environ.get("IGPT_DATA_DIR")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def load_dataset(name: str, split: str = "train", **options) -> Dataset:
    """Load one split of a named dataset (see `DATASETS`) as a `Dataset` of uint8 RGB images.

    Options are `open_dataset`'s: data_dir, seed, resolution, download. `resolution`, when given and
    different from the source's native size, resizes the images with `images.resize` (bilinear, as
    Hugging Face's ImageGPT processor does). Missing or malformed files, unknown names and unknown
    splits raise `DatasetError` with a message saying what to do. A token dataset keeps its ids on
    disk: its `images` are decoded only for the rows asked for (see `LazyImages`).
    """
    stream = open_dataset(name, split, **options)
    images = stream.read() if stream.token_ids is None else LazyImages(stream)
    return Dataset(name=name, split=split, images=images, labels=stream.labels, classes=stream.classes,
                   token_ids=stream.token_ids, palette=stream.palette)


def open_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    resolution: int | None = None,
    download: bool = False,
) -> DatasetStream:
    """Like `load_dataset`, but the images stay where they are until read, batch by batch.

    Labels and class names are read at once (they are small); images are read, and resized to
    `resolution`, only as `DatasetStream.batches` or `.take` asks for them, so a dataset larger than
    memory can be walked through (e.g. to tokenise it into shards).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DatasetError(f"resolution must be a positive whole number of pixels, got {resolution!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a whole number >= 0, got {seed!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    source, argument = find_source(name)
    request = Request(source.key, split, int(seed), data_dir, resolution, bool(download), argument)
    images, labels, classes = source.load(request)
    rows = images if isinstance(images, ImageRows) else ImageRows.of(images)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
    return DatasetStream(name, split, rows, labels, classes, resolution or rows.side, rows.token_ids, rows.palette)


class ImageRows:
    """N square images kept where they are (np.memmap, .npz files, an Arrow table) and read on demand.

    The images come in parts, each `(count, take)`: `take(local_indices)` returns those images of
    the part as uint8 (n, side, side, 3). Indexing with an array of sorted indices gives a subset,
    still unread, so splits can be cut before anything is read.
    """

    token_ids: np.ndarray | None = None  # set by `of_tokens`: the ids the images are decoded from
    palette: Palette | None = None

    def __init__(self, parts: list[tuple[int, Callable[[np.ndarray], np.ndarray]]], side: int,
                 index: np.ndarray | None = None):
        self.parts, self.side = parts, side
        self.starts = np.cumsum([0] + [count for count, _ in parts])
        self.index = np.arange(self.starts[-1]) if index is None else index

    @classmethod
    def of(cls, images: np.ndarray) -> ImageRows:
        """Images already in memory (or any array-like view, such as a transposed np.memmap)."""
        return cls([(len(images), lambda local: np.asarray(images[local]))], int(images.shape[1]))

    @classmethod
    def of_tokens(cls, token_ids: np.ndarray, palette: Palette) -> ImageRows:
        """Images stored as palette ids (N, side²) in raster order, drawn in the palette's colours when read."""
        side = int(round(np.sqrt(token_ids.shape[1])))
        rows = cls([(len(token_ids), lambda local: palette.decode(np.asarray(token_ids[local]), side))], side)
        rows.token_ids, rows.palette = token_ids, palette
        return rows

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: np.ndarray) -> ImageRows:
        return ImageRows(self.parts, self.side, self.index[rows])  # a subset: its ids are no longer token_ids

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Images at positions `rows` (sorted) of this subset, read from their parts, as uint8 (n, side, side, 3)."""
        wanted = self.index[rows]
        out = []
        for (count, take), start in zip(self.parts, self.starts):
            local = wanted[(wanted >= start) & (wanted < start + count)] - start
            if len(local):
                out.append(take(local))
        return np.concatenate(out) if out else np.zeros((0, self.side, self.side, 3), np.uint8)


@dataclass
class DatasetStream:
    """One split of a dataset whose images are read in batches (see `open_dataset`)."""

    name: str
    split: str
    rows: ImageRows
    labels: np.ndarray | None  # int64 (N,), or None for unlabelled data
    classes: list[str] | None
    resolution: int  # side of the images that batches() and take() return
    token_ids: np.ndarray | None = None  # (N, T) palette ids for token datasets (at their own resolution)
    palette: Palette | None = None  # the palette token_ids refer to

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows) -> np.ndarray:
        """Images at sorted positions `rows`, resized to `resolution`: uint8 (n, R, R, 3)."""
        images = self.rows.take(np.asarray(rows, dtype=np.int64))
        return resize(images, self.resolution) if len(images) else images.reshape(0, *[self.resolution] * 2, 3)

    def batches(self, size: int = 1024) -> Iterator[np.ndarray]:
        """The images in order, `size` at a time (the last batch may be smaller)."""
        for begin in range(0, len(self), size):
            yield self.take(np.arange(begin, min(begin + size, len(self))))

    def read(self) -> np.ndarray:
        """All the images in one array (N, R, R, 3), filled batch by batch (no second copy)."""
        out = np.empty((len(self), self.resolution, self.resolution, 3), dtype=np.uint8)
        for begin, images in zip(range(0, len(self), 4096), self.batches(4096)):
            out[begin : begin + len(images)] = images
        return out


class LazyImages:
    """A stream's images as an array-like that decodes only the rows it is indexed with.

    Token datasets are stored as ids (ImageNet's are 1.28M images): `dataset.images[:64]` decodes 64
    of them; `np.asarray(dataset.images)` decodes them all.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, stream: DatasetStream):
        self.stream = stream
        self.shape = (len(stream), stream.resolution, stream.resolution, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        positions = np.arange(len(self))[index]
        if np.ndim(positions) == 0:
            return self.stream.take([int(positions)])[0]
        order = np.argsort(positions, kind="stable")  # take() reads sorted rows; put them back in asked order
        images = self.stream.take(positions[order])
        return images[np.argsort(order, kind="stable")]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self.stream.read()
        return images if dtype is None else images.astype(dtype)
