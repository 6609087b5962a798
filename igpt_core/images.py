"""Reading images from disk or arrays into uint8 RGB, and resizing them the way iGPT does.

Everything downstream (palette, model, apps) takes uint8 arrays of shape (H, W, 3) or (N, H, W, 3).
This module is the one place that turns "whatever the user gave us" into that, with clear errors.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

# Refuse images larger than this many pixels before decoding them (PIL's own bomb guard warns at
# ~89M and errors at twice that; we want one clear error, well before memory is at risk).
MAX_PIXELS = 40_000_000


def to_rgb(image) -> np.ndarray:
    """Convert a PIL image or an array to a uint8 (H, W, 3) RGB array.

    Accepted: grayscale (H, W) or (H, W, 1), RGB (H, W, 3), RGBA (H, W, 4) — alpha is dropped, not
    composited, so transparent areas show whatever colour they store; uint8, uint16 (scaled down
    to 8 bits), bool, or float in [0, 1]. PIL images in any mode (P, CMYK, I;16, LA, ...) are
    converted by PIL. Animated images keep their first frame.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ImageError(
            f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}; "
            "pass one image at a time, channels last"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"the image is empty (shape {array.shape})")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError("a float image must hold finite values in [0, 1]; scale it or pass uint8")
        return np.rint(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(f"integer image values must lie in 0..255, got {array.min()}..{array.max()}")
        return array.astype(np.uint8)
    raise ImageError(f"unsupported image dtype {array.dtype}; pass uint8 RGB")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(
            f"the image is {image.width}×{image.height} pixels, more than the {MAX_PIXELS:,} igpt accepts; "
            "resize it first"
        )
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips instead of scaling, so scale by hand.
        array = np.asarray(image, dtype=np.int64)
        peak = 65535 if array.max() > 255 else 255
        return to_rgb((np.clip(array, 0, peak) * 255 // peak).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # alpha dropped below: documented in to_rgb
    return to_rgb(np.asarray(image.convert("RGB")))


def load_image(source) -> np.ndarray:
    """Read an image from a path, bytes or a file object into uint8 (H, W, 3) RGB.

    Raises `ImageError` with a readable message for a missing, empty, truncated, non-image or
    decompression-bomb-sized file.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the uploaded file"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"no image at {path}: check the path")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        data = path.read_bytes()
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read()
    if len(data) == 0:
        raise ImageError(f"{name} is empty (0 bytes): choose another file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(
                        f"{name} is {image.width}×{image.height} pixels, more than the {MAX_PIXELS:,} "
                        "igpt accepts: resize it first"
                    )
                image.seek(0)  # animated GIF/WebP/APNG: the first frame
                image.load()
                return _pil_to_rgb(image)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        if isinstance(err, UnidentifiedImageError):
            raise ImageError(f"{name} is not an image igpt can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") from None
        raise ImageError(f"{name} is too large to decode safely: resize it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name} could not be decoded ({err}); it may be truncated or corrupted") from None


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images (H, W, 3) or (N, H, W, 3) to size × size with PIL's bilinear filter.

    This is what Hugging Face's ImageGPT processor does (no aspect-preserving crop): crop first if
    the aspect ratio matters. Images already at that size are returned unchanged.
    """
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.shape[1:3] == (size, size):
        return images
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in batch])
    return out[0] if single else out


def center_square(image: np.ndarray) -> np.ndarray:
    """The largest centred square of an (H, W, C) image."""
    return crop(image, None)


# -- choosing what the model sees: a square of the picture, and the pixels painted over -------------


def square_inside(h: int, w: int, left: int, top: int, side: int) -> tuple[int, int, int]:
    """(left, top, side) checked to be a square of at least one pixel inside an h × w image."""
    left, top, side = int(left), int(top), int(side)
    if side < 1 or left < 0 or top < 0 or left + side > w or top + side > h:
        raise ImageError(f"the square at x={left}, y={top} with side {side} does not fit in the {w}×{h} picture: "
                         f"x + side must be at most {w} and y + side at most {h}")
    return left, top, side


def center_box(h: int, w: int) -> tuple[int, int, int]:
    """(left, top, side) of the largest centred square, as `center_square` cuts it."""
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def square_from_drag(h: int, w: int, start, end) -> tuple[int, int, int]:
    """(left, top, side) of the square dragged from point `start` towards `end` ((x, y) in pixels).

    The square keeps the corner where the drag began; its side is the longer of the drag's width
    and height, shortened where needed so that the square stays inside the picture.
    """
    (x0, y0), (x1, y1) = start, end
    x0, y0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
    right, down = x1 >= x0, y1 >= y0
    room_x = w - x0 if right else x0  # how far the square may reach from the corner, each way
    room_y = h - y0 if down else y0
    side = max(1, min(round(max(abs(x1 - x0), abs(y1 - y0))), int(room_x), int(room_y)))
    left = round(x0) if right else round(x0) - side
    top = round(y0) if down else round(y0) - side
    left, top = min(max(left, 0), w - side), min(max(top, 0), h - side)
    return square_inside(h, w, left, top, side)


def crop(image: np.ndarray, box: tuple[int, int, int] | None) -> np.ndarray:
    """The square (left, top, side) of an (H, W, ...) image; None = its centre square."""
    h, w = image.shape[:2]
    left, top, side = center_box(h, w) if box is None else square_inside(h, w, *box)
    return image[top : top + side, left : left + side]


def painted_cells(painted: np.ndarray | None, size: int) -> np.ndarray | None:
    """Which of a model's size × size pixels a brush mask covers; None if nothing is painted.

    `painted` is a bool mask over the picture the model sees, at any resolution (the editor shows
    the picture enlarged). A pixel counts as painted when a quarter of it or more is covered, or,
    for a stroke thinner than that everywhere, when any of it is.
    """
    if painted is None or not painted.any():
        return None
    cover = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize((size, size), Image.BOX)) / 255
    return cover >= 0.25 if (cover >= 0.25).any() else cover > 0


def parse_pixel(text: str, side: int) -> tuple[int, int]:
    """A pixel typed as "ROW,COL", counted from 1 at the top left (the way people count rows and
    columns), -> its 0-based (row, col) in a side × side image; a readable ImageError otherwise."""
    try:
        row, col = (int(part) for part in str(text).replace(";", ",").split(","))
    except ValueError:
        raise ImageError(f"a pixel is ROW,COL counted from 1 at the top left (e.g. 3,4), got {text!r}") from None
    if not (1 <= row <= side and 1 <= col <= side):
        raise ImageError(f"pixel ({row}, {col}) is outside the {side}×{side} image: rows and columns run 1..{side}")
    return row - 1, col - 1
