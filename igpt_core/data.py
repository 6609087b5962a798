"""Named image datasets as uint8 RGB arrays, split into train / val / test the same way every time.

`load_dataset(name, split)` is the one entry point. Sources (see `DATASETS`):

- built in, no files needed: scikit-learn's `digits` (labelled) and `photos`, unlabelled crops of the
  photos that scikit-learn and scikit-image ship;
- real datasets in their standard on-disk formats under a data folder: CIFAR-10/100 (the official
  python pickle batches), MNIST / Fashion-MNIST (IDX files, raw or gzipped), STL-10 (the official
  binary files, read through np.memmap), downsampled ImageNet 32² / 64² (the official .npz batches);
- `folder:PATH`, any folder of images, where sub-folders are class labels;
- `hf:NAME`, any image-classification dataset of the Hugging Face `datasets` library (hf_data.py).

Splits are deterministic given `seed`. Where the source has an official test set (CIFAR, MNIST,
STL-10, ImageNet's validation set) `test` is that set and `val` is 10% of the official training set
held out by a seeded permutation, as in the iGPT paper. Otherwise a seeded 20% is `test` and 10% of
the rest is `val`.

Sources too large for memory (ImageNet, STL-10's 100 000 unlabelled images) are read lazily:
`open_dataset` gives a `DatasetStream` that yields batches of images, resized as they are read;
`load_dataset` reads all of it into one array.

Nothing here touches the network unless `download=True` is passed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from . import hf_data
from .errors import DatasetError, ImageError
from .files import atomic_write
from .images import center_square, load_image, resize
from .shards import open_shards, shards_path

SPLITS = ("train", "val", "test")
# Percentages, applied with round-half-up integer arithmetic so split sizes never depend on floats.
TEST_PERCENT = 20  # only for sources without an official test set
VAL_PERCENT = 10  # of what remains for training (iGPT holds out 10% of the training set)
FOLDER_PREFIX = "folder:"
FOLDER_KEY = "folder:PATH"  # how DATASETS names the folder source; "folder:/some/path" picks a folder
HF_PREFIX = "hf:"
HF_KEY = "hf:NAME"  # how DATASETS names the Hugging Face source
SHARDS_KEY = "shards:DIR"  # how DATASETS names tokenised shards
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 1797 handwritten digits, 8×8, 10 classes (built in, the default)",
    "digits-moved": "the same 1797 digits, each scaled to 8..12 pixels and placed at a random spot of a "
    "16×16 canvas (fixed seed), 10 classes (built in; pixels alone no longer separate the classes)",
    "photos": "unlabelled 32×32 crops of the photos shipped with scikit-learn and scikit-image (built in)",
    "cifar10": "CIFAR-10, 32×32 colour, 10 classes (python batches in DATA_DIR/cifar-10-batches-py)",
    "cifar100": "CIFAR-100, 32×32 colour, 100 fine classes (python files in DATA_DIR/cifar-100-python)",
    "mnist": "MNIST handwritten digits, 28×28, 10 classes (IDX files in DATA_DIR/mnist)",
    "fashion-mnist": "Fashion-MNIST clothing, 28×28, 10 classes (IDX files in DATA_DIR/fashion-mnist)",
    "stl10": "STL-10, 96×96 colour, 10 classes, 5000 train / 8000 test (binary files in DATA_DIR/stl10_binary)",
    "stl10-unlabeled": "STL-10's 100 000 unlabelled 96×96 images, for pre-training (same folder as stl10)",
    "imagenet32": "downsampled ImageNet 32×32, 1000 classes, 1.28M train / 50 000 test "
    "(.npz batches in DATA_DIR/imagenet32; needs an ImageNet login, no --download)",
    "imagenet64": "downsampled ImageNet 64×64, as imagenet32 (.npz batches in DATA_DIR/imagenet64)",
    HF_KEY: "a Hugging Face image-classification dataset: hf:NAME, hf:NAME:CONFIG or hf:SAVED_FOLDER, "
    "optionally ?image=COLUMN&label=COLUMN (needs the datasets package: pip install igpt[datasets])",
    SHARDS_KEY: "palette ids written by `igpt tokenize`, in their palette's colours (training streams them from disk)",
    FOLDER_KEY: "every image under PATH, centre-cropped to a square and resized to 32×32; "
    "sub-folders are class labels",
}


@dataclass
class Dataset:
    """One split of a dataset: square uint8 RGB images and, when the source has them, labels."""

    name: str  # registry name as the user typed it, e.g. "digits", "folder:/x/y"
    split: str  # "train", "val" or "test"
    images: np.ndarray  # uint8, (N, H, W, 3), H == W
    labels: np.ndarray | None  # int64 (N,), or None for unlabelled data
    classes: list[str] | None  # class names, index = label; None when unlabelled

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


@dataclass(frozen=True)
class _Request:
    """What a loader is asked for; each loader uses the fields it needs."""

    key: str  # the dataset's key in DATASETS ("cifar10", "folder:PATH", ...)
    split: str
    seed: int
    data_dir: Path
    resolution: int | None
    download: bool
    path: Path | None = None  # for folder:PATH
    source: str | None = None  # for hf:NAME, what follows "hf:"


def load_dataset(name: str, split: str = "train", **options) -> Dataset:
    """Load one split of a named dataset (see `DATASETS`) as a `Dataset` of uint8 RGB images.

    Options are `open_dataset`'s: data_dir, seed, resolution, download. `resolution`, when given and
    different from the source's native size, resizes the images with `images.resize` (bilinear, as
    Hugging Face's ImageGPT processor does). Missing or malformed files, unknown names and unknown
    splits raise `DatasetError` with a message saying what to do.
    """
    stream = open_dataset(name, split, **options)
    return Dataset(name=name, split=split, images=stream.read(), labels=stream.labels, classes=stream.classes)


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
    key, path, source = _parse_name(name)
    request = _Request(key, split, int(seed), data_dir, resolution, bool(download), path, source)
    images, labels, classes = _LOADERS[key](request)
    rows = images if isinstance(images, ImageRows) else ImageRows.of(images)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
    return DatasetStream(name, split, rows, labels, classes, resolution or rows.side)


def _parse_name(name: str) -> tuple[str, Path | None, str | None]:
    stripped = str(name).strip()
    if stripped.lower().startswith(FOLDER_PREFIX):
        path = stripped[len(FOLDER_PREFIX) :]
        if not path:
            raise DatasetError("folder: needs a path, e.g. folder:/home/me/pictures")
        return FOLDER_KEY, Path(path).expanduser(), None
    shards = shards_path(stripped)
    if shards is not None:
        return SHARDS_KEY, shards, None
    if stripped.lower().startswith(HF_PREFIX):
        source = stripped[len(HF_PREFIX) :]
        if not source:
            raise DatasetError("hf: needs a dataset, e.g. hf:uoft-cs/cifar10 or hf:/path/saved/with/save_to_disk")
        return HF_KEY, None, source
    # Be lenient about case and "_" vs "-" (fashion_mnist): there is no ambiguity to protect.
    key = stripped.lower().replace("_", "-")
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r} — known: {', '.join(DATASETS)}")
    return key, None, None


# ------------------------------------------------------------------------------------ lazy images


class ImageRows:
    """N square images kept where they are (np.memmap, .npz files, an Arrow table) and read on demand.

    The images come in parts, each `(count, take)`: `take(local_indices)` returns those images of
    the part as uint8 (n, side, side, 3). Indexing with an array of sorted indices gives a subset,
    still unread, so splits can be cut before anything is read.
    """

    def __init__(self, parts: list[tuple[int, Callable[[np.ndarray], np.ndarray]]], side: int,
                 index: np.ndarray | None = None):
        self.parts, self.side = parts, side
        self.starts = np.cumsum([0] + [count for count, _ in parts])
        self.index = np.arange(self.starts[-1]) if index is None else index

    @classmethod
    def of(cls, images: np.ndarray) -> ImageRows:
        """Images already in memory (or any array-like view, such as a transposed np.memmap)."""
        return cls([(len(images), lambda local: np.asarray(images[local]))], int(images.shape[1]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: np.ndarray) -> ImageRows:
        return ImageRows(self.parts, self.side, self.index[rows])

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


# ---------------------------------------------------------------------------------------- splits


def _split_indices(n: int, split: str, seed: int, *, test_percent: int) -> np.ndarray:
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


def _take_split(images, labels, request: _Request, *, test_percent: int):
    """The rows of `request.split`; an empty split is an error, not a silent zero-length dataset."""
    index = _split_indices(len(images), request.split, request.seed, test_percent=test_percent)
    if len(index) == 0:
        raise DatasetError(
            f"the {request.split} split is empty: the dataset has only {len(images)} images; add more images"
        )
    return images[index], (labels[index] if labels is not None else None)


def _grey_to_rgb(batch: np.ndarray) -> np.ndarray:
    """(N, H, W) grey → (N, H, W, 3) by repeating the channel (a batch version of images.to_rgb)."""
    return np.repeat(batch[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------- built-in sources


def _load_digits(request: _Request):
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes ~1 s to import

    digits = load_digits()
    # Values are 0..16 (counts of set pixels in 4×4 blocks): scale to the full 0..255 range.
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)
    images, labels = _take_split(_grey_to_rgb(grey), digits.target, request, test_percent=TEST_PERCENT)
    return images, labels, [str(d) for d in range(10)]


# Translated digits: every digit once, at a size and position drawn from this fixed stream, so the
# dataset is the same on every machine; the split seed only decides which digits land in which split.
MOVED_CANVAS = 16
MOVED_SIDES = (8, 12)  # smallest and largest digit side, in pixels
MOVED_SEED = 2020


def _load_digits_moved(request: _Request):
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)
    rng = np.random.default_rng(MOVED_SEED)
    canvas = np.zeros((len(grey), MOVED_CANVAS, MOVED_CANVAS), dtype=np.uint8)
    for i, digit in enumerate(grey):
        side = int(rng.integers(MOVED_SIDES[0], MOVED_SIDES[1] + 1))
        top, left = (int(v) for v in rng.integers(0, MOVED_CANVAS - side + 1, size=2))
        scaled = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR))
        canvas[i, top : top + side, left : left + side] = scaled
    images, labels = _take_split(_grey_to_rgb(canvas), digits.target, request, test_percent=TEST_PERCENT)
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


def _load_photos(request: _Request):
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


# ------------------------------------------------------------------------------------------ CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str  # as extracted from the official archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str
    md5: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR_SPECS: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        b"label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _CifarSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        b"fine_labels",  # the 100 fine classes, as usually reported (not the 20 coarse super-classes)
        b"fine_label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays, lists, dicts and strings, and nothing else.

    The CIFAR files are python pickles, the official format, placed by the user. A pickle can run
    arbitrary code when loaded; refusing every global except numpy's array reconstruction means a
    tampered file fails to load instead. (`numpy.core` is how files written by numpy 1.x name it.)
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were written by Python 2; keys come back as bytes.
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise DatasetError(
            f"{path} is not a readable CIFAR python batch ({err}); it may be truncated or not the "
            "'python version' of the dataset: replace it with the official file"
        ) from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} does not hold a CIFAR batch (a dict): replace it with the official file")
    return content


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    if b"data" not in batch or label_key not in batch:
        raise DatasetError(
            f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR batch: replace it with the official file"
        )
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as err:
        raise DatasetError(f"{path} holds data igpt cannot read as pixels and labels ({err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(
            f"{path} holds data of shape {data.shape} and {len(labels)} labels; expected (N, 3072) and N labels"
        )
    # Rows are channel-first (1024 R, then 1024 G, then 1024 B, each row-major): to (N, 32, 32, 3).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_cifar(request: _Request):
    spec = CIFAR_SPECS[request.key]
    folder = request.data_dir / spec.folder
    _ensure_files(folder, spec.files, spec.title, spec.url, request, lambda: _download_cifar(spec, request.data_dir))
    meta = _read_cifar_pickle(folder / spec.meta_file)
    if spec.names_key not in meta:
        raise DatasetError(f"{folder / spec.meta_file} lacks {spec.names_key!r}: replace it with the official file")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    files = spec.test_files if request.split == "test" else spec.train_files
    batches = [_read_cifar_batch(folder / f, spec.label_key) for f in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    _check_labels(labels, len(classes), folder)
    if request.split != "test":
        images, labels = _take_split(images, labels, request, test_percent=0)
    return images, labels, classes


def _check_labels(labels: np.ndarray, n_classes: int, where: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(
            f"labels in {where} run {labels.min()}..{labels.max()} but there are {n_classes} classes: "
            "the files do not belong together; replace them with the official files"
        )


# ------------------------------------------------------------------------------------------ IDX


@dataclass(frozen=True)
class _IdxSpec:
    title: str
    folder: str
    base_url: str
    md5: dict[str, str]  # of the official .gz files
    classes: tuple[str, ...]


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 or 1 dimensions

IDX_SPECS: dict[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        "MNIST",
        "mnist",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": _IdxSpec(
        "Fashion-MNIST",
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


def _idx_path(folder: Path, name: str) -> Path | None:
    """The file as placed: raw, or gzipped as distributed."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file: a big-endian magic number, one uint32 per dimension, then uint8 data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(
            f"{path} could not be read ({err}); it may be truncated: replace it with the official file"
        ) from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else "nothing"
        raise DatasetError(
            f"{path} is not an IDX {'image' if magic == IMAGES_MAGIC else 'label'} file "
            f"(magic number 0x{magic:08x} expected, found {found}): replace it with the official file"
        )
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated inside its header: replace it with the official file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} holds {len(raw) - header} bytes of data but its header ({' × '.join(map(str, dims))}) "
            f"says {expected}: the file is truncated or corrupted; replace it with the official file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx(request: _Request):
    spec = IDX_SPECS[request.key]
    folder = request.data_dir / spec.folder
    names = [*IDX_FILES["train"], *IDX_FILES["test"]]
    _ensure_files(folder, names, spec.title, spec.base_url, request, lambda: _download_idx(spec, folder), gz_ok=True)
    image_name, label_name = IDX_FILES["test" if request.split == "test" else "train"]
    image_path, label_path = _idx_path(folder, image_name), _idx_path(folder, label_name)
    images = _read_idx(image_path, IMAGES_MAGIC)
    labels = _read_idx(label_path, LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels: "
            "the files do not belong together; replace them with the official files"
        )
    if images.shape[1] != images.shape[2]:
        raise DatasetError(f"{image_path} holds {images.shape[1]}×{images.shape[2]} images; igpt needs square ones")
    _check_labels(labels, len(spec.classes), folder)
    images = _grey_to_rgb(images)
    if request.split != "test":
        images, labels = _take_split(images, labels, request, test_percent=0)
    return images, labels, list(spec.classes)


# ----------------------------------------------------------------------------------------- STL-10

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


def _load_stl10(request: _Request):
    """`stl10`: the 5000 labelled training and 8000 test images. `stl10-unlabeled`: the 100 000
    unlabelled images, for pre-training (train and val cut from them; test = the test images, unlabelled)."""
    folder = request.data_dir / STL10_FOLDER
    names = [n for pair in STL10_FILES.values() for n in pair if n]
    by_hand = (f"Download {STL10_URL} elsewhere and extract it into {request.data_dir}, so that "
               f"{folder} holds {', '.join(names)}.")
    fetch = lambda: _download_archive(STL10_URL, STL10_MD5, request.data_dir, STL10_FOLDER, names, by_hand)  # noqa: E731
    _ensure_files(folder, names, "STL-10", STL10_URL, request, fetch)
    unlabelled = request.key == "stl10-unlabeled"
    if request.split == "test" or not unlabelled:
        image_name, label_name = STL10_FILES["test" if request.split == "test" else "train"]
        images = _read_stl10_images(folder / image_name)
        labels = _read_stl10_labels(folder / label_name, len(images), folder / image_name)
    else:
        images, labels = _read_stl10_images(folder / STL10_FILES["unlabeled"][0]), None
    rows = ImageRows.of(images)
    if request.split != "test":
        rows, labels = _take_split(rows, labels, request, test_percent=0)
    if unlabelled:
        return rows, None, None
    return rows, labels, list(STL10_CLASSES)


# ------------------------------------------------------------------------------ ImageNet 32² / 64²

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


def _load_imagenet(request: _Request):
    side = int(request.key.removeprefix("imagenet"))
    folder = request.data_dir / request.key
    names = [*IMAGENET_TRAIN_FILES, IMAGENET_TEST_FILE]

    def refuse_download():
        raise DatasetError(f"downsampled ImageNet cannot be downloaded by igpt (it needs an ImageNet login): "
                           f"download the {side}×{side} .npz files from {IMAGENET_SOURCE} and place "
                           f"{', '.join(names)} in {folder}")

    _ensure_files(folder, names, f"ImageNet {side}×{side}", IMAGENET_SOURCE, request, refuse_download)
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
        rows, labels = _take_split(rows, labels, request, test_percent=0)
    # The distributed files carry class numbers only; names are the files' own numbers, 1..1000.
    return rows, labels, [str(i) for i in range(1, 1001)]


# ----------------------------------------------------------------------------------------- folder


def _is_hidden(path: Path, root: Path) -> bool:
    # .DS_Store, .ipynb_checkpoints, .git ...: never part of a dataset.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path, root: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, root)
    )


def _load_folder(request: _Request):
    root = request.path
    if not root.exists():
        raise DatasetError(f"no folder at {root}: check the path given after 'folder:'")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder: give the folder that holds the images")
    size = request.resolution or 32
    entries = sorted(p for p in root.iterdir() if not _is_hidden(p, root))
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    # A sub-folder is a class only if it holds images (at any depth); empty or unrelated ones are ignored.
    class_dirs = [d for d in entries if d.is_dir() and _image_files(d, root)]
    if class_dirs and loose:
        raise DatasetError(
            f"{root} has class sub-folders and also {len(loose)} image(s) directly inside it "
            f"(e.g. {loose[0].name}), which belong to no class: move them into a sub-folder or remove them"
        )
    if class_dirs:
        files, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            found = _image_files(class_dir, root)
            files += found
            labels += [label] * len(found)
        labels, classes = np.array(labels, dtype=np.int64), [d.name for d in class_dirs]
    else:
        files, labels, classes = loose, None, None
    if not files:
        raise DatasetError(
            f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}): add images, "
            "one sub-folder per class for a labelled dataset"
        )
    # The split is cut from the file list, so that only its own images are read and resized.
    files, labels = _take_split(np.array(files, dtype=object), labels, request, test_percent=TEST_PERCENT)
    return np.stack([_read_folder_image(f, size) for f in files]), labels, classes


def _read_folder_image(path: Path, size: int) -> np.ndarray:
    try:
        image = load_image(path)
    except ImageError as err:
        raise DatasetError(f"cannot read {path}: {err}. Remove or fix that file, then load the folder again") from None
    return resize(center_square(image), size)


# -------------------------------------------------------------------------------- Hugging Face


def _load_hf(request: _Request):
    """`test` is the dataset's own test split (or its validation split if it has none); `val` is 10%
    of its train split; a dataset with a train split only has 20% of it cut as `test` first."""
    splits, image_column, label_column = hf_data.open_source(request.source)
    test_name = next((s for s in ("test", "validation") if s in splits), None)
    official_test = request.split == "test" and test_name is not None
    table = splits[test_name if official_test else "train"]
    where = f"{request.source} [{test_name if official_test else 'train'}]"
    labels, classes = hf_data.labels_and_classes(table, label_column, where)
    side = request.resolution or hf_data.native_side(table, image_column)
    rows = ImageRows([(len(table), lambda local: hf_data.read_images(table, image_column, local, side, where))], side)
    if official_test:
        return rows, labels, classes
    rows, labels = _take_split(rows, labels, request, test_percent=0 if test_name else TEST_PERCENT)
    return rows, labels, classes


def _load_shards(request: _Request):
    """Tokenised shards as images: each id shown as its palette colour, so every command can read them.
    Re-encoding with the same palette gives the same ids back; other palettes see a quantised image."""
    shards = open_shards(request.path)
    split = shards.split(request.split)
    side = shards.resolution

    def part(array):
        return len(array), lambda local: shards.palette.decode(np.asarray(array[local]), side)

    labels = None if split.labels is None else np.asarray(split.labels)
    return ImageRows([part(array) for array in split.arrays], side), labels, shards.classes


# -------------------------------------------------------------------------------- files & download


def _ensure_files(folder: Path, names, title: str, source: str, request: _Request, fetch, *, gz_ok=False) -> None:
    """Check that every file of a dataset is present; fetch them first if download was asked for."""

    def missing():
        return [n for n in names if not (_idx_path(folder, n) if gz_ok else (folder / n).is_file())]

    if missing() and request.download:
        fetch()
    if missing():
        suffix = "[.gz]" if gz_ok else ""
        raise DatasetError(
            f"{title} files are missing: {', '.join(f'{folder / n}{suffix}' for n in missing())}. "
            f"Place the official files in {folder} (from {source}), or pass download=True "
            "(CLI --download) on a machine with network access."
        )


def _download(url: str, dest: Path, md5: str, by_hand: str) -> None:
    """Fetch url to dest, verified by md5, written to a temp file then renamed: never half-written."""
    def fetch(tmp: str) -> None:
        digest = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5: integrity only
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSError
            raise DatasetError(f"the download of {url} failed ({err}). {by_hand}") from None
        if digest.hexdigest() != md5:
            raise DatasetError(
                f"the download of {url} is corrupted (md5 {digest.hexdigest()}, expected {md5}). {by_hand}"
            )

    atomic_write(dest, fetch)


def _download_cifar(spec: _CifarSpec, data_dir: Path) -> None:
    by_hand = (
        f"Download {spec.url} elsewhere and extract it into {data_dir}, so that "
        f"{data_dir / spec.folder} holds {', '.join(spec.files)}."
    )
    _download_archive(spec.url, spec.md5, data_dir, spec.folder, spec.files, by_hand)


def _download_archive(url: str, md5: str, data_dir: Path, folder: str, names, by_hand: str) -> None:
    """Fetch a .tar.gz (unless a verified copy is there) and extract folder/<names> from it."""
    archive = data_dir / url.rsplit("/", 1)[1]
    if not (archive.is_file() and _md5(archive) == md5):
        _download(url, archive, md5, by_hand)
    _extract_tar(archive, data_dir, folder, names)


def _download_idx(spec: _IdxSpec, folder: Path) -> None:
    by_hand = f"Download {', '.join(spec.md5)} from {spec.base_url} elsewhere and place them in {folder}."
    for gz_name, md5 in spec.md5.items():
        if _idx_path(folder, gz_name.removesuffix(".gz")) is None:
            _download(spec.base_url + gz_name, folder / gz_name, md5, by_hand)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_tar(archive: Path, data_dir: Path, folder: str, names) -> None:
    """Extract `folder/<names>` from a tar archive into data_dir, safely and atomically per file.

    Members are checked before anything is written: only plain files and folders that stay inside
    the target, so a crafted archive cannot write elsewhere (../, absolute paths, links).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    target = (tmp / member.name).resolve()
                    if not (member.isfile() or member.isdir()) or not target.is_relative_to(tmp.resolve()):
                        raise DatasetError(
                            f"{archive} contains {member.name!r}, which is not a plain file inside the "
                            "archive's folder: refusing to extract it; delete the archive"
                        )
                # The "data" filter re-checks the same on Pythons that have it (3.10.12+, 3.11.4+).
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **safe)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DatasetError(f"{archive} could not be extracted ({err}): delete it and try again") from None
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            source = tmp / folder / name
            if not source.is_file():
                raise DatasetError(f"{archive} does not contain {folder}/{name}: delete it and try again")
            os.replace(source, data_dir / folder / name)


_LOADERS = {
    "digits": _load_digits,
    "digits-moved": _load_digits_moved,
    "photos": _load_photos,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "mnist": _load_idx,
    "fashion-mnist": _load_idx,
    "stl10": _load_stl10,
    "stl10-unlabeled": _load_stl10,
    "imagenet32": _load_imagenet,
    "imagenet64": _load_imagenet,
    FOLDER_KEY: _load_folder,
    HF_KEY: _load_hf,
    SHARDS_KEY: _load_shards,
}
