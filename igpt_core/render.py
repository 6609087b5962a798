"""Pictures for people: enlarged pixels, grids like the paper's figures, heat maps. numpy + PIL only
(and files.py, which is standard library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_write

BACKGROUND = (255, 255, 255)  # white behind every picture and its text


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


def surprise_picture(view: np.ndarray, nll: np.ndarray, pixel: int | None = None) -> np.ndarray:
    """The model's view beside its surprise map (negative log-likelihood per pixel, nats): from dark
    (0 nats: a colour the model was certain of) to bright (this picture's most surprising pixel),
    so 0 always means the same and the brightest pixel is the one to look at."""
    high = max(float(np.max(nll)), 1e-6)
    return grid([[view, heatmap(nll, vmax=high)]], labels=["model's view", f"surprise (0..{high:.1f} nats)"],
                pixel=pixel)


def save_png(image: np.ndarray, path) -> None:
    """Write a PNG atomically (lossless, so every palette colour survives)."""
    atomic_write(Path(path), lambda tmp: Image.fromarray(np.asarray(image)).save(tmp, format="PNG"))


# -- inside the model: what a pixel is drawn from, where the model looked, what each layer paints --

MARK = (0, 200, 255)  # outline of the chosen pixel: a cyan that stands out on the ramp and on digits


def mark_pixel(image: np.ndarray, row: int, col: int, pixel: int, color=MARK) -> np.ndarray:
    """An enlarged image (each pixel `pixel` × `pixel` wide) with one pixel outlined."""
    picture = Image.fromarray(np.ascontiguousarray(image))
    y, x = row * pixel, col * pixel
    ImageDraw.Draw(picture).rectangle([x, y, x + pixel - 1, y + pixel - 1], outline=color, width=max(1, pixel // 8))
    return np.asarray(picture)


def overlay(image: np.ndarray, values: np.ndarray, vmax: float | None = None, alpha: float = 0.7) -> np.ndarray:
    """A heat map over an image: the image in grey, the values' ramp colours blended on top."""
    grey = np.asarray(image, dtype=np.float64).mean(-1, keepdims=True)
    blended = (1 - alpha) * grey + alpha * heatmap(values, vmax)
    return np.rint(blended).clip(0, 255).astype(np.uint8)


def distribution_bars(colors: np.ndarray, probabilities, true_index: int | None = None, *, width: int = 320,
                      row: int = 22) -> np.ndarray:
    """One row per colour: a swatch, a bar as long as its probability, the percentage. The true
    colour's row (true_index into `colors`) is outlined."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    picture = Image.new("RGB", (width, row * len(colors) + 4), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    bar_room = width - row - 60
    for i, (color, p) in enumerate(zip(colors, probabilities)):
        y = 2 + i * row
        draw.rectangle([2, y, row - 2, y + row - 4], fill=tuple(int(c) for c in color), outline=(120, 120, 120))
        draw.rectangle([row + 4, y + 4, row + 4 + max(1, round(bar_room * p)), y + row - 8], fill=(90, 110, 160))
        draw.text((width - 54, y + 4), f"{100 * p:5.1f}%", fill=(40, 40, 40))
        if i == true_index:
            draw.rectangle([0, y - 2, width - 1, y + row - 2], outline=MARK, width=2)
    return np.asarray(picture)


def stack(parts: list[np.ndarray], pad: int = 6, across: bool = False) -> np.ndarray:
    """Pictures one under the other (or side by side, `across`) on white, aligned top-left."""
    along, other = (1, 0) if across else (0, 1)
    size = [0, 0]
    size[along] = sum(p.shape[along] + pad for p in parts) + pad
    size[other] = max(p.shape[other] for p in parts) + 2 * pad
    out = np.full((*size, 3), 255, np.uint8)
    offset = pad
    for p in parts:
        y, x = (pad, offset) if across else (offset, pad)
        out[y : y + p.shape[0], x : x + p.shape[1]] = p
        offset += p.shape[along] + pad
    return out


def caption(text: str, width: int, height: int = 16) -> np.ndarray:
    """A line of text on white, as a picture, for titling a section."""
    picture = Image.new("RGB", (width, height), BACKGROUND)
    ImageDraw.Draw(picture).text((2, 2), text, fill=(20, 20, 20))
    return np.asarray(picture)


def _labelled_rows(cells: list[np.ndarray], labels: list[str], per_row: int) -> np.ndarray:
    """Equal-sized pictures in rows of `per_row`, each row with its own labels on top."""
    rows = [grid([cells[i : i + per_row]], pixel=1, labels=labels[i : i + per_row]) for i in range(0, len(cells), per_row)]
    return stack(rows, pad=0)


def attention_panel(view: np.ndarray, maps: np.ndarray, row: int, col: int, labels: list[str],
                    scale: int | None = None, per_row: int = 6) -> np.ndarray:
    """Attention maps (n, side, side) as heat maps over the model's view, in rows, each scaled to its
    own maximum, the chosen pixel outlined."""
    scale = scale or display_scale(view.shape[0])
    cells = [mark_pixel(enlarge(overlay(view, m), scale), row, col, scale) for m in maps]
    return _labelled_rows(cells, labels, per_row)


def layer_strip(paintings: np.ndarray, true_probability, row: int, col: int, scale: int | None = None,
                per_row: int = 7) -> np.ndarray:
    """What each layer would paint (n_layer + 1, side, side, 3), in rows, labelled with the probability
    each layer gives the true colour of the chosen pixel."""
    scale = scale or display_scale(paintings.shape[1])
    labels = [f"{'embeddings' if i == 0 else f'layer {i}'}: {p:.2f}" for i, p in enumerate(true_probability)]
    return _labelled_rows([mark_pixel(enlarge(image, scale), row, col, scale) for image in paintings], labels, per_row)


def inside_picture(view: np.ndarray, row: int, col: int, colors: np.ndarray, probabilities, true_index: int | None,
                   attention: np.ndarray, paintings: np.ndarray, true_probability, title: str) -> np.ndarray:
    """The `igpt inside` figure: the model's view with the pixel marked beside its top colours; the
    attention of every layer (L, side, side) over the image; what each layer would paint
    (L + 1, side, side, 3) with the true colour's probability. The pixel is outlined throughout."""
    scale = display_scale(view.shape[0], 160)
    top = stack([mark_pixel(enlarge(view, scale), row, col, scale), distribution_bars(colors, probabilities, true_index)],
                across=True)
    layers = attention_panel(view, attention, row, col, [f"layer {i + 1}" for i in range(len(attention))], scale)
    paint = layer_strip(paintings, true_probability, row, col, scale)
    width = max(top.shape[1], layers.shape[1], paint.shape[1])
    return stack([caption(title, width), top, caption("where it looked: attention of each layer, mean over heads", width),
                  layers, caption("what each layer would paint: argmax colour (p of the true colour here)", width), paint])
