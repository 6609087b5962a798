"""Named image datasets as uint8 RGB arrays, split into train / val / test the same way every time.

`load_dataset(name, split)` is the one entry point. Sources (see `DATASETS`):

- built in, no files needed: scikit-learn's `digits` (labelled) and `photos`, unlabelled crops of the
  photos that scikit-learn and scikit-image ship;
- real datasets in their standard on-disk formats under a data folder: CIFAR-10/100 (the official
  python pickle batches), MNIST / Fashion-MNIST (IDX files, raw or gzipped);
- `folder:PATH`, any folder of images, where sub-folders are class labels.

Splits are deterministic given `seed`. Where the source has an official test set (CIFAR, MNIST)
`test` is that set and `val` is 10% of the official training set held out by a seeded permutation,
as in the iGPT paper. Otherwise a seeded 20% is `test` and 10% of the rest is `val`.

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError, ImageError
from .files import atomic_write
from .images import center_square, load_image, resize

SPLITS = ("train", "val", "test")
# Percentages, applied with round-half-up integer arithmetic so split sizes never depend on floats.
TEST_PERCENT = 20  # only for sources without an official test set
VAL_PERCENT = 10  # of what remains for training (iGPT holds out 10% of the training set)
FOLDER_PREFIX = "folder:"
FOLDER_KEY = "folder:PATH"  # how DATASETS names the folder source; "folder:/some/path" picks a folder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 1797 handwritten digits, 8×8, 10 classes (built in, the default)",
    "photos": "unlabelled 32×32 crops of the photos shipped with scikit-learn and scikit-image (built in)",
    "cifar10": "CIFAR-10, 32×32 colour, 10 classes (python batches in DATA_DIR/cifar-10-batches-py)",
    "cifar100": "CIFAR-100, 32×32 colour, 100 fine classes (python files in DATA_DIR/cifar-100-python)",
    "mnist": "MNIST handwritten digits, 28×28, 10 classes (IDX files in DATA_DIR/mnist)",
    "fashion-mnist": "Fashion-MNIST clothing, 28×28, 10 classes (IDX files in DATA_DIR/fashion-mnist)",
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


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    resolution: int | None = None,
    download: bool = False,
) -> Dataset:
    """Load one split of a named dataset (see `DATASETS`) as a `Dataset` of uint8 RGB images.

    `resolution`, when given and different from the source's native size, resizes the images with
    `images.resize` (bilinear, as Hugging Face's ImageGPT processor does). Missing or malformed files,
    unknown names and unknown splits raise `DatasetError` with a message saying what to do.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DatasetError(f"resolution must be a positive whole number of pixels, got {resolution!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a whole number >= 0, got {seed!r}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key, path = _parse_name(name)
    request = _Request(key, split, int(seed), data_dir, resolution, bool(download), path)
    images, labels, classes = _LOADERS[key](request)
    if resolution is not None and len(images):
        images = resize(images, resolution)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
    return Dataset(name=name, split=split, images=np.ascontiguousarray(images), labels=labels, classes=classes)


def _parse_name(name: str) -> tuple[str, Path | None]:
    stripped = str(name).strip()
    if stripped.lower().startswith(FOLDER_PREFIX):
        path = stripped[len(FOLDER_PREFIX) :]
        if not path:
            raise DatasetError("folder: needs a path, e.g. folder:/home/me/pictures")
        return FOLDER_KEY, Path(path).expanduser()
    # Be lenient about case and "_" vs "-" (fashion_mnist): there is no ambiguity to protect.
    key = stripped.lower().replace("_", "-")
    if key not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r} — known: {', '.join(DATASETS)}")
    return key, None


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
    images = np.stack([_read_folder_image(f, size) for f in files])
    images, labels = _take_split(images, labels, request, test_percent=TEST_PERCENT)
    return images, labels, classes


def _read_folder_image(path: Path, size: int) -> np.ndarray:
    try:
        image = load_image(path)
    except ImageError as err:
        raise DatasetError(f"cannot read {path}: {err}. Remove or fix that file, then load the folder again") from None
    return resize(center_square(image), size)


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
    archive = data_dir / spec.url.rsplit("/", 1)[1]
    by_hand = (
        f"Download {spec.url} elsewhere and extract it into {data_dir}, so that "
        f"{data_dir / spec.folder} holds {', '.join(spec.files)}."
    )
    if not (archive.is_file() and _md5(archive) == spec.md5):
        _download(spec.url, archive, spec.md5, by_hand)
    _extract_tar(archive, data_dir, spec.folder, spec.files)


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
    "photos": _load_photos,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "mnist": _load_idx,
    "fashion-mnist": _load_idx,
    FOLDER_KEY: _load_folder,
}
