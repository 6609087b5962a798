"""Image-classification datasets of the Hugging Face `datasets` library, as the source `hf:`.

    hf:NAME                  a dataset on the hub, e.g. hf:uoft-cs/cifar10 (read from the local cache
                             when HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1)
    hf:NAME:CONFIG           one configuration of it
    hf:PATH                  a folder written by `save_to_disk` (a path: starts with / . or ~, or exists)
    ...?image=COL&label=COL  name the columns (otherwise: the one Image column, the one ClassLabel column)

The columns are part of the name, so a run records them and every command reads the same ones.
The splits are cut as for every source (splits.py). Images are decoded only when read, centre-cropped to a square and resized; Arrow tables are
memory-mapped by `datasets`, so large datasets stream.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from ..errors import DatasetError, ImageError
from ..images import center_square, resize, to_rgb
from .core import ImageRows
from .registry import Request, register
from .splits import TEST_PERCENT, take_split

DEFAULT_SIDE = 32  # for datasets whose images are not square (as for folder:)
COLUMN_OPTIONS = ("image", "label")


def parse_source(source: str) -> tuple[str, str | None, dict[str, str], bool]:
    """'NAME[:CONFIG][?image=COL&label=COL]' -> (name or path, config, columns, is_path)."""
    text, _, query = source.partition("?")
    columns = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in COLUMN_OPTIONS or len(values) != 1 or not values[0]:
            raise DatasetError(f"hf:{source}: after '?' give image=COLUMN and/or label=COLUMN, e.g. "
                               f"hf:{text}?image=img&label=fine_label")
        columns[key] = values[0]
    is_path = text.startswith(("/", ".", "~")) or Path(text).expanduser().is_dir()
    if is_path:
        return str(Path(text).expanduser()), None, columns, True
    name, _, config = text.partition(":")
    return name, config or None, columns, False


def open_source(source: str) -> tuple[dict, str, str | None]:
    """What follows 'hf:' -> ({split name: datasets.Dataset}, image column, label column or None)."""
    name, config, columns, is_path = parse_source(source)
    splits = _open(name, config, is_path)
    if "train" not in splits:
        raise DatasetError(f"hf:{source} has splits {', '.join(splits)} but no 'train' split")
    image_column, label_column = _columns(splits["train"], columns, source)
    return splits, image_column, label_column


def labels_and_classes(table, label_column: str | None, where: str) -> tuple[np.ndarray | None, list[str] | None]:
    """int64 labels and class names (from a ClassLabel feature, else "0".."max"); None when unlabelled."""
    if label_column is None:
        return None, None
    labels = np.asarray(table[label_column], dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"hf:{where} has images without a label (-1): choose a split with labels, "
                           "or an unlabelled source")
    feature = table.features[label_column]
    classes = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(int(labels.max()) + 1)]
    return labels, classes


def native_side(table, image_column: str) -> int:
    """The first image's side if it is square (CIFAR 32, STL-10 96), else DEFAULT_SIDE."""
    if len(table) == 0:
        return DEFAULT_SIDE
    width, height = table[0][image_column].size
    return width if width == height else DEFAULT_SIDE


def read_images(table, image_column: str, rows: np.ndarray, side: int, where: str) -> np.ndarray:
    """Rows of the table decoded (datasets does it on access), centre-cropped, resized: uint8 (n, side, side, 3)."""
    try:
        return np.stack([resize(center_square(to_rgb(im)), side) for im in table[rows.tolist()][image_column]])
    except ImageError as err:
        raise DatasetError(f"hf:{where} holds an image igpt cannot use: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL, on a damaged image
        raise DatasetError(f"hf:{where} holds an image that cannot be decoded ({err})") from None


@register("hf:NAME", "a Hugging Face image-classification dataset: hf:NAME, hf:NAME:CONFIG or hf:SAVED_FOLDER, "
          "optionally ?image=COLUMN&label=COLUMN (needs the datasets package: pip install igpt[datasets])",
          prefix="hf:", example="a dataset, e.g. hf:uoft-cs/cifar10 or hf:/path/saved/with/save_to_disk")
def _load_hf(request: Request):
    """`test` is the dataset's own test split (or its validation split if it has none); `val` is 10%
    of its train split; a dataset with a train split only has 20% of it cut as `test` first."""
    splits, image_column, label_column = open_source(request.argument)
    test_name = next((s for s in ("test", "validation") if s in splits), None)
    official_test = request.split == "test" and test_name is not None
    table = splits[test_name if official_test else "train"]
    where = f"{request.argument} [{test_name if official_test else 'train'}]"
    labels, classes = labels_and_classes(table, label_column, where)
    side = request.resolution or native_side(table, image_column)
    rows = ImageRows([(len(table), lambda local: read_images(table, image_column, local, side, where))], side)
    if official_test:
        return rows, labels, classes
    rows, labels = take_split(rows, labels, request, test_percent=0 if test_name else TEST_PERCENT)
    return rows, labels, classes


def _open(name: str, config: str | None, is_path: bool) -> dict:
    """The dataset's splits as {split name: datasets.Dataset}."""
    try:
        import datasets  # imported here: an optional package, and it takes seconds to import
    except ImportError as err:
        raise DatasetError(f"hf: datasets need the Hugging Face datasets package ({err}): "
                           "pip install 'igpt[datasets]'") from None
    try:
        if is_path:
            if not Path(name).is_dir():
                raise DatasetError(f"no folder at {name}: give a folder written by datasets' save_to_disk")
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types (hub, Arrow, files); all are the input's fault
        where = name if is_path else f"{name}{':' + config if config else ''}"
        raise DatasetError(f"the Hugging Face dataset {where} could not be loaded: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def _columns(table, named: dict[str, str], source: str) -> tuple[str, str | None]:
    """The image column and the label column (None: unlabelled), as named or found by feature type."""
    from datasets import ClassLabel, Image

    features = table.features
    for role, column in named.items():
        if column not in features:
            raise DatasetError(f"hf:{source} has no column {column!r} (for {role}); its columns: {', '.join(features)}")
    images = [c for c, f in features.items() if isinstance(f, Image)]
    labels = [c for c, f in features.items() if isinstance(f, ClassLabel)]
    image = named.get("image") or (images[0] if len(images) == 1 else None)
    if image is None:
        found = f"image columns {', '.join(images)}" if images else "no Image column"
        raise DatasetError(f"hf:{source} has {found} (columns: {', '.join(features)}): name one, "
                           f"e.g. hf:{source.partition('?')[0]}?image=COLUMN")
    if "label" in named:
        return image, named["label"]
    if len(labels) > 1:
        raise DatasetError(f"hf:{source} has several label columns ({', '.join(labels)}): name one, "
                           f"e.g. hf:{source.partition('?')[0]}?label={labels[0]}")
    return image, labels[0] if labels else None
