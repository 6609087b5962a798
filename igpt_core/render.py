"""Pictures for people: enlarged pixels, grids like the paper's figures, heat maps. numpy + PIL only
(and files.py, which is standard library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_write


def enlarge(image: np.ndarray, pixel: int) -> np.ndarray:
    """Each pixel drawn as a pixel × pixel square (nearest neighbour), so tokens stay visible."""
    return np.repeat(np.repeat(np.asarray(image), pixel, axis=0), pixel, axis=1)


def display_scale(size: int, target: int = 192) -> int:
    """A whole-number enlargement that shows a size × size image at about `target` pixels."""
    return max(1, round(target / size))


def grid(rows: list[list[np.ndarray]], *, pixel: int | None = None, pad: int = 6,
         labels: list[str] | None = None) -> np.ndarray:
    """Lay out rows of equally sized uint8 images, enlarged, on white; optional column labels on top."""
    size = rows[0][0].shape[0]
    pixel = pixel or display_scale(size)
    cell = size * pixel
    n_cols = max(len(r) for r in rows)
    top = 16 if labels else 0
    out = np.full((top + pad + len(rows) * (cell + pad), pad + n_cols * (cell + pad), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = top + pad + r * (cell + pad), pad + c * (cell + pad)
            out[y : y + cell, x : x + cell] = enlarge(image, pixel)
    if labels:
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        for c, label in enumerate(labels[:n_cols]):
            draw.text((pad + c * (cell + pad), 2), label, fill=(40, 40, 40))
        out = np.asarray(picture)
    return out


def completion_grid(original: np.ndarray, seen: np.ndarray, kept: np.ndarray, samples: np.ndarray,
                    per_row: int = 4) -> np.ndarray:
    """The paper's completion figure: original, what the model sees, the kept part, then the samples."""
    cells = [original, seen, kept, *samples]
    labels = ["original", "model's view", "kept", *[f"sample {i + 1}" for i in range(len(samples))]]
    per_row = max(per_row, 3)
    rows = [cells[i : i + per_row + 3] for i in range(0, len(cells), per_row + 3)]
    return grid(rows, labels=labels)


def mark_square(image: np.ndarray, box: tuple[int, int, int], line: int = 2) -> np.ndarray:
    """The image with the square box (left, top, side) outlined and everything outside it dimmed."""
    left, top, side = box
    out = (np.asarray(image, dtype=np.float32) * 0.45).astype(np.uint8)
    out[top : top + side, left : left + side] = np.asarray(image)[top : top + side, left : left + side]
    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture)
    right, bottom = left + side - 1, top + side - 1
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0), width=line + 2)  # dark under light: seen on any picture
    draw.rectangle([left + 1, top + 1, right - 1, bottom - 1], outline=(255, 255, 255), width=line)
    return np.asarray(picture)


def hide_rows(image: np.ndarray, keep_rows: int, fill=(128, 128, 128)) -> np.ndarray:
    """The image with rows from keep_rows on painted grey: what a completion starts from."""
    out = np.array(image, copy=True)
    out[keep_rows:] = fill
    return out


# A perceptual dark-to-bright ramp (close to matplotlib's "inferno"), so no plotting library is needed.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def heatmap(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Map a 2-D float array to uint8 RGB on a dark-to-bright ramp (0 -> dark, vmax -> bright)."""
    values = np.asarray(values, dtype=np.float64)
    vmax = float(vmax if vmax is not None else max(values.max(), 1e-9))
    x = np.clip(values / vmax, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - low)[..., None]
    return np.rint(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def save_png(image: np.ndarray, path) -> None:
    """Write a PNG atomically (lossless, so every palette colour survives)."""
    atomic_write(Path(path), lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG"))
