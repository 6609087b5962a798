"""`folder:PATH`: any folder of images, where sub-folders are class labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError, ImageError
from ..images import center_square, load_image, resize
from .registry import Request, register
from .splits import TEST_PERCENT, take_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


def _is_hidden(path: Path, root: Path) -> bool:
    # .DS_Store, .ipynb_checkpoints, .git ...: never part of a dataset.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(folder: Path, root: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, root)
    )


@register("folder:PATH", "every image under PATH, centre-cropped to a square and resized to 32×32; "
          "sub-folders are class labels", prefix="folder:", example="a path, e.g. folder:/home/me/pictures")
def _load_folder(request: Request):
    root = Path(request.argument).expanduser()
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
    files, labels = take_split(np.array(files, dtype=object), labels, request, test_percent=TEST_PERCENT)
    return np.stack([_read_folder_image(f, size) for f in files]), labels, classes


def _read_folder_image(path: Path, size: int) -> np.ndarray:
    try:
        image = load_image(path)
    except ImageError as err:
        raise DatasetError(f"cannot read {path}: {err}. Remove or fix that file, then load the folder again") from None
    return resize(center_square(image), size)
