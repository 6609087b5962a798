"""MNIST and Fashion-MNIST in their official IDX format, raw or gzipped as distributed."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..download import download
from ..errors import DatasetError
from .download import ensure_files
from .registry import Request, register
from .splits import check_labels, grey_to_rgb, take_split

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


@register("fashion-mnist", "Fashion-MNIST clothing, 28×28, 10 classes (IDX files in DATA_DIR/fashion-mnist)")
@register("mnist", "MNIST handwritten digits, 28×28, 10 classes (IDX files in DATA_DIR/mnist)")
def _load_idx(request: Request):
    spec = IDX_SPECS[request.key]
    folder = request.data_dir / spec.folder
    names = [*IDX_FILES["train"], *IDX_FILES["test"]]
    ensure_files(folder, names, spec.title, spec.base_url, request, lambda: _download_idx(spec, folder),
                 present=lambda name: _idx_path(folder, name) is not None, suffix="[.gz]")
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
    check_labels(labels, len(spec.classes), folder)
    images = grey_to_rgb(images)
    if request.split != "test":
        images, labels = take_split(images, labels, request, test_percent=0)
    return images, labels, list(spec.classes)


def _download_idx(spec: _IdxSpec, folder: Path) -> None:
    by_hand = f"Download {', '.join(spec.md5)} from {spec.base_url} elsewhere and place them in {folder}."
    for gz_name, md5 in spec.md5.items():
        if _idx_path(folder, gz_name.removesuffix(".gz")) is None:
            download(spec.base_url + gz_name, folder / gz_name, md5=md5, advice=by_hand, error=DatasetError)
