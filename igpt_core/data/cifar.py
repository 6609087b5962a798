"""CIFAR-10 and CIFAR-100 in their official format: python pickle batches, read without running code."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .download import download_archive, ensure_files
from .registry import Request, register
from .splits import check_labels, take_split

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


@register("cifar100", "CIFAR-100, 32×32 colour, 100 fine classes (python files in DATA_DIR/cifar-100-python)")
@register("cifar10", "CIFAR-10, 32×32 colour, 10 classes (python batches in DATA_DIR/cifar-10-batches-py)")
def _load_cifar(request: Request):
    spec = CIFAR_SPECS[request.key]
    folder = request.data_dir / spec.folder
    ensure_files(folder, spec.files, spec.title, spec.url, request, lambda: _download_cifar(spec, request.data_dir))
    meta = _read_cifar_pickle(folder / spec.meta_file)
    if spec.names_key not in meta:
        raise DatasetError(f"{folder / spec.meta_file} lacks {spec.names_key!r}: replace it with the official file")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    files = spec.test_files if request.split == "test" else spec.train_files
    batches = [_read_cifar_batch(folder / f, spec.label_key) for f in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    check_labels(labels, len(classes), folder)
    if request.split != "test":
        images, labels = take_split(images, labels, request, test_percent=0)
    return images, labels, classes


def _download_cifar(spec: _CifarSpec, data_dir: Path) -> None:
    by_hand = (
        f"Download {spec.url} elsewhere and extract it into {data_dir}, so that "
        f"{data_dir / spec.folder} holds {', '.join(spec.files)}."
    )
    download_archive(spec.url, spec.md5, data_dir, spec.folder, spec.files, by_hand)
