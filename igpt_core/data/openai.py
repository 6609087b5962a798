"""OpenAI's encoded datasets: CIFAR-10 and ImageNet 32×32 as palette ids, released with iGPT.

OpenAI published both already quantised to its 512-colour palette (openai/image-gpt, download.py),
as NumPy files in this layout under DATA_DIR/openai:

    kmeans_centers.npy               (512, 3) float colours in [-1, 1]: the palette the ids refer to
    cifar10/cifar10_trX.npy          (N, 1024) palette ids of 32×32 images, raster order
    cifar10/cifar10_trY.npy          (N, 10) one-hot labels (fed as float to the classifier in run.py)
    ... _vaX/_vaY (val), _teX/_teY (test); imagenet/imagenet_*.npy alike, with 1000 classes

The ids stay on disk (np.load with mmap_mode="r"): a `Dataset` of these sources carries them as
`token_ids`, with `palette` set to OpenAI's, and decodes images only for the rows asked for. The
ids mean OpenAI's colours; `check_token_palette` refuses a run whose palette is another.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..download import byte_bar, download
from ..errors import DatasetError, IgptError
from ..files import atomic_write_bytes
from ..palette import Palette
from .core import Dataset, DatasetStream, ImageRows
from .download import ensure_files
from .registry import Request, register

FOLDER = "openai"  # under the data folder
CENTERS_FILE = "kmeans_centers.npy"
DEFAULT_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
URL_VARIABLE = "IGPT_OPENAI_URL"  # overrides DEFAULT_URL (a mirror, or a local server in the tests)
SPLIT_FILES = {"train": "tr", "val": "va", "test": "te"}  # OpenAI's file names for our splits
# The same images encoded with a run's own palette: what to use when the run's palette is not OpenAI's.
IMAGE_TWINS = {"openai:cifar10": "cifar10", "openai:imagenet": "imagenet32"}
LABEL_CHUNK = 65536  # rows of one-hot labels read at a time (ImageNet's are 1.28M × 1000 floats)


def openai_url() -> str:
    """Where OpenAI's files are downloaded from: $IGPT_OPENAI_URL if set, else OpenAI's public bucket."""
    return os.environ.get(URL_VARIABLE, DEFAULT_URL).rstrip("/")


def openai_folder(data_dir: str | Path) -> Path:
    """The folder holding OpenAI's palette and one sub-folder per encoded dataset."""
    return Path(data_dir).expanduser() / FOLDER


def palette_url(base: str | None = None) -> str:
    """kmeans_centers.npy on the server `base` (default `openai_url()`), where OpenAI's download.py finds it."""
    return f"{(base or openai_url()).rstrip('/')}/color-clusters/{CENTERS_FILE}"


def fetch_openai_palette(folder: str | Path, openai_root: str | Path, *, base: str | None = None, bar=None,
                         error: type[IgptError] = DatasetError) -> Path:
    """Put OpenAI's palette (kmeans_centers.npy) in `folder`, downloading it at most once per OpenAI folder.

    Two places want the same 6 KB file: the OpenAI folder (DATA_DIR/openai), beside the encoded
    datasets, and each checkpoint folder in it (igpt-SIZE), which keeps OpenAI's own flat layout so
    that `import-openai --from` can read it alone. Neither is sent to the other's place; instead a copy
    already in `openai_root` or one of its igpt-* folders is reused: copied, not linked (6 KB; a copy
    works on every file system and outlives the other folder). A file under its real name is complete
    (the downloader renames only then) and is reused if it loads as (k, 3) colours. Otherwise it is
    downloaded from `base` (default `openai_url()`); errors are raised as `error`.
    """
    target = Path(folder) / CENTERS_FILE
    if target.is_file():
        return target
    root = Path(openai_root)
    for known in [root / CENTERS_FILE, *sorted(root.glob(f"igpt-*/{CENTERS_FILE}"))]:
        if known.is_file() and known != target and readable_palette(known.parent):
            atomic_write_bytes(target, known.read_bytes())
            return target
    advice = f"Download it elsewhere and place it in {target.parent}"
    return download(palette_url(base), target, bar=bar, advice=advice, error=error)


def readable_palette(folder: Path) -> bool:
    """Whether folder/kmeans_centers.npy loads as (k, 3) colours (`openai_palette_centers` would accept it)."""
    try:
        openai_palette_centers(folder)
    except DatasetError:
        return False
    return True


def openai_palette_centers(folder: str | Path) -> np.ndarray:
    """OpenAI's 512 colours, (512, 3) float32 in [-1, 1], from `folder`/kmeans_centers.npy."""
    path = Path(folder).expanduser() / CENTERS_FILE
    if not path.is_file():
        raise DatasetError(f"OpenAI's palette is missing: no {path}. Download it from "
                           f"{palette_url()}, or pass download=True (CLI --download)")
    try:
        centers = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path} could not be read ({err}); it may be truncated: delete it and download it again") from None
    if centers.ndim != 2 or centers.shape[1] != 3 or not np.issubdtype(centers.dtype, np.floating):
        raise DatasetError(f"{path} holds {centers.dtype} {centers.shape}, not (k, 3) colours: replace it with OpenAI's file")
    return centers.astype(np.float32)


def check_token_palette(dataset: Dataset | DatasetStream, palette: Palette) -> None:
    """Refuse to feed a dataset's token ids to a model whose palette is not the one they refer to.

    Two palettes are the same when their colours are (rint(127.5 (c + 1)), as uint8): a run imported
    from OpenAI has exactly kmeans_centers.npy's 512 colours, and so do Hugging Face's ImageGPT
    processors. A dataset without token ids (made of images) fits every palette.
    """
    if dataset.token_ids is None:
        return
    ids_palette = dataset.palette
    if len(palette) == len(ids_palette) and np.array_equal(palette.colors, ids_palette.colors):
        return
    twin = IMAGE_TWINS.get(str(dataset.name).strip().lower())
    instead = f"use `{twin}` instead, which is encoded with the run's own palette" if twin else \
        "use a dataset of images instead, which is encoded with the run's own palette"
    raise DatasetError(f"{dataset.name} holds ids in OpenAI's {len(ids_palette)}-colour palette; this run's palette "
                       f"is another ({len(palette)} colours, not OpenAI's); {instead}")


def palette_ids(dataset: Dataset | DatasetStream, palette: Palette, size: int, rows=None) -> np.ndarray:
    """The palette ids (n, size²) a model with `palette` and side `size` reads for a dataset's images
    at sorted positions `rows` (default: all of them).

    A token dataset gives its stored ids as they are, after `check_token_palette`: re-quantising
    decoded colours would cost time and could move an id where two colours round alike. Its ids
    cannot be resized, so a model of another side is refused. Other datasets are encoded with
    `palette` (resized to `size` first, as `Palette.encode` does).
    """
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows, dtype=np.int64)
    if dataset.token_ids is None:
        images = dataset.images[rows] if isinstance(dataset, Dataset) else dataset.take(rows)
        return palette.encode(images, size)
    check_token_palette(dataset, palette)
    side = int(round(np.sqrt(dataset.token_ids.shape[1])))
    if side != size:
        raise DatasetError(f"{dataset.name} holds ids of {side}×{side} images but this model reads {size}×{size}; "
                           f"ids cannot be resized: use a model of side {side}")
    return np.asarray(dataset.token_ids[rows], dtype=np.int64)  # only these rows leave the disk


@register("openai:cifar10", "OpenAI's CIFAR-10 as 9-bit palette ids, 32×32, 10 classes, for runs imported from "
          f"OpenAI (.npy files in DATA_DIR/{FOLDER}/cifar10; --download fetches them)")
def _load_openai_cifar10(request: Request):
    return _load_encoded(request, "cifar10")


@register("openai:imagenet", "OpenAI's ImageNet 32×32 as 9-bit palette ids, 1000 classes, for runs imported from "
          f"OpenAI (.npy files in DATA_DIR/{FOLDER}/imagenet; --download fetches them)")
def _load_openai_imagenet(request: Request):
    return _load_encoded(request, "imagenet")


def _load_encoded(request: Request, name: str):
    """One split's ids, memory-mapped, as ImageRows that decode them with OpenAI's palette."""
    root = openai_folder(request.data_dir)
    x_name, y_name = (f"{name}/{name}_{SPLIT_FILES[request.split]}{part}.npy" for part in ("X", "Y"))
    # Where each file lives in OpenAI's bucket (download.py): datasets/ and color-clusters/.
    urls = {CENTERS_FILE: palette_url(), x_name: f"{openai_url()}/datasets/{Path(x_name).name}",
            y_name: f"{openai_url()}/datasets/{Path(y_name).name}"}

    def fetch():
        by_hand = f"Download {', '.join(urls.values())} elsewhere and place them in {root} as {', '.join(urls)}."
        with byte_bar(True, f"downloading OpenAI's {name}") as bar:
            fetch_openai_palette(root, root, bar=bar)
            for file in (x_name, y_name):
                download(urls[file], root / file, bar=bar, advice=by_hand, error=DatasetError)

    ensure_files(root, list(urls), f"OpenAI's encoded {name}", f"{openai_url()}/, as in openai/image-gpt's download.py",
                 request, fetch)
    palette = Palette(openai_palette_centers(root))
    token_ids = _read_ids(root / x_name)
    labels, n_classes = _read_labels(root / y_name, len(token_ids))
    # The files carry class numbers only, so the classes are named by their numbers.
    return ImageRows.of_tokens(token_ids, palette), labels, [str(i) for i in range(n_classes)]


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path} could not be read ({err}); it may be truncated: delete it and download it again") from None


def _read_ids(path: Path) -> np.ndarray:
    """(N, side²) integer ids, left on disk. Their range is checked as rows are decoded."""
    ids = _open_npy(path)
    side = int(round(np.sqrt(ids.shape[1]))) if ids.ndim == 2 else 0
    if ids.ndim != 2 or side * side != ids.shape[1] or not np.issubdtype(ids.dtype, np.integer):
        raise DatasetError(f"{path} holds {ids.dtype} {ids.shape}; expected integer palette ids of shape "
                           f"(N, side²), one row per image: replace it with OpenAI's file")
    return ids


def _read_labels(path: Path, n_images: int) -> tuple[np.ndarray, int]:
    """int64 labels and the number of classes, from one-hot rows (N, classes) as OpenAI wrote them,
    or from plain class numbers (N,)."""
    labels = _open_npy(path)
    if labels.ndim not in (1, 2):
        raise DatasetError(f"{path} holds labels of shape {labels.shape}; expected (N, classes) one-hot rows")
    if len(labels) != n_images:
        raise DatasetError(f"{path} holds {len(labels)} labels for {n_images} images: a file is truncated or they "
                           "do not belong together; replace them with OpenAI's files")
    if labels.ndim == 1:
        labels = np.asarray(labels, dtype=np.int64)
        return labels, int(labels.max()) + 1 if len(labels) else 0
    out = np.empty(n_images, dtype=np.int64)
    for begin in range(0, n_images, LABEL_CHUNK):  # argmax a chunk at a time: the file stays on disk
        out[begin : begin + LABEL_CHUNK] = np.argmax(labels[begin : begin + LABEL_CHUNK], axis=1)
    return out, labels.shape[1]
