"""The demo's pictures: a gallery example or an upload, the square of it the model sees (dragged or
typed), the pixels painted over it for inpainting, and the model's view of all that."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from igpt_core import IgptError, load_image, to_rgb
from igpt_core import center_box, crop, painted_cells, square_from_drag, square_inside
from igpt_core.render import display_scale, enlarge, mark_square

if __package__:  # imported as the package igpt_apps
    from .demo_models import EDITOR_SIDE, OPENAI_MODELS, find_imported, user_errors
else:  # run by path (python apps/demo.py): this folder is on sys.path
    from demo_models import EDITOR_SIDE, OPENAI_MODELS, find_imported, user_errors

SHOWN_SIDE = 256  # small pictures are drawn enlarged to at least this, with visible pixels
PICTURE_SIDE = 384  # ... and the picture to drag a square on, to at least this
BRUSH_RGB = (255, 0, 255)  # the mask brush: magenta, a colour no dataset here is made of


# -- small glue: the user's picture -> what the model sees -------------------------------------------


def _painted(editor: dict | None) -> np.ndarray | None:
    """The pixels painted over the picture in the editor, bool (H, W) of the editor's picture, or None."""
    painted = None
    for layer in (editor or {}).get("layers") or []:  # brush layers: RGBA, transparent where unpainted
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4:
            mark = layer[..., 3] > 0
            painted = mark if painted is None or painted.shape != mark.shape else painted | mark
    return painted


def _parse_square(text: str | None, picture: np.ndarray) -> tuple[int, int, int]:
    """The crop box typed (or set by a drag) as "x, y, side"; empty = the picture's centre square."""
    h, w = picture.shape[:2]
    if not (text or "").strip():
        return center_box(h, w)
    try:
        left, top, side = (int(round(float(part))) for part in str(text).replace(";", ",").split(","))
    except ValueError:
        raise IgptError(f"the crop is three whole numbers, x, y, side (e.g. 0, 0, {min(h, w)}), got {text!r}") from None
    return square_inside(h, w, left, top, side)


def _square_text(box: tuple[int, int, int]) -> str:
    return ", ".join(str(v) for v in box)


def _model_input(editor: dict | None, picture: np.ndarray | None, square: str | None):
    """(the chosen square of the picture, uint8 RGB; the pixels painted over it, bool, or None).

    The picture comes from the user's state (a gallery example at its true pixels, or the upload); the
    paint editor shows the chosen square and holds the brush strokes. An API call may instead send the
    picture as the editor's background, with strokes over the whole picture.
    """
    painted = _painted(editor)
    if picture is not None:
        return crop(picture, _parse_square(square, picture)), painted
    background = (editor or {}).get("background")
    if background is None:
        raise IgptError("choose an example from the gallery or upload an image first")
    picture = to_rgb(background)
    left, top, side = _parse_square(square, picture)
    if painted is not None:  # the same square on the strokes' canvas, which may show the picture enlarged
        scale = painted.shape[0] / picture.shape[0]
        painted = painted[round(top * scale) : round((top + side) * scale),
                          round(left * scale) : round((left + side) * scale)]
    return crop(picture, (left, top, side)), painted


def _shade(view: np.ndarray, cells: np.ndarray | None) -> np.ndarray:
    """The model's view with painted pixels tinted in the brush colour."""
    if cells is None:
        return view
    out = view.astype(np.float32)
    out[cells] = 0.45 * out[cells] + 0.55 * np.array(BRUSH_RGB, np.float32)
    return np.rint(out).astype(np.uint8)


def _enlarged(image: np.ndarray, side: int = SHOWN_SIDE) -> tuple[np.ndarray, int]:
    """(a picture drawn at about `side` pixels or more, with visible pixels; its whole-number scale)."""
    scale = max(1, side // max(image.shape[:2]))
    return enlarge(image, scale), scale


class Pictures:
    """The picture's actions (a mixin of the page's Demo: uses its `run`, `examples` and `models`)."""

    @staticmethod
    def pick_index(evt: gr.SelectData):
        return evt.index

    @user_errors
    def use_example(self, name: str | None, index):
        """Put gallery example `index` (0-based) in the picture."""
        return self._example(name, index)

    def first_example(self, name: str | None, picture):
        """On page load: the first example, unless the user has chosen a picture already (the gallery
        shows before this runs), or there is no run (or it has no gallery)."""
        if picture is not None:
            return (gr.skip(),) * 6
        try:
            return self._example(name, 0)
        except IgptError:
            return (gr.skip(),) * 6

    def _example(self, name: str | None, index):
        if index is None:
            raise IgptError("click an example in the gallery")
        pictures, *_ = self.examples(name)
        return self._show_picture(name, pictures[int(index) % len(pictures)])

    @user_errors
    def upload(self, name: str | None, path: str | None):
        """An uploaded file: read it (with a readable message for anything unusable) into the picture."""
        if not path:
            return (gr.skip(),) * 6
        image = load_image(Path(path).read_bytes())  # bytes: messages say "the uploaded file", not a temp path
        h, w = image.shape[:2]
        notes = []
        if max(h, w) > EDITOR_SIDE:
            smaller = Image.fromarray(image)
            smaller.thumbnail((EDITOR_SIDE, EDITOR_SIDE), Image.LANCZOS)
            image = np.asarray(smaller)
        if name:
            size = self.run(name).model_config.image_size
            if min(h, w) < size:
                notes.append(f"The picture is only {w}×{h} pixels, smaller than the model's {size}×{size}: "
                             "it is enlarged, so expect blocks.")
            if h != w:
                notes.append("The model sees a square: at first the centre of the picture (drag a square on the "
                             "picture to choose another part).")
        for note in notes:
            gr.Warning(note)
        return self._show_picture(name, image, " ".join(notes))

    def _show_picture(self, name, picture: np.ndarray, note: str = ""):
        """A new picture, its centre square chosen: (paint editor, picture state, view, note, square, picture)."""
        box = center_box(*picture.shape[:2])
        shown, paint, view = self._square_outputs(name, picture, box)
        return paint, picture, view, note, _square_text(box), shown

    def _square_outputs(self, name, picture: np.ndarray, box):
        """(the picture with the square marked, the paint editor showing the square, the model's view)."""
        shown, scale = _enlarged(picture, PICTURE_SIDE)
        shown = mark_square(shown, tuple(v * scale for v in box))
        region, _ = _enlarged(crop(picture, box))
        paint = {"background": region, "layers": [], "composite": region}
        return shown, paint, self.show_view(name, None, picture, _square_text(box))

    @user_errors
    def drag_square(self, drag: str | None, name: str | None, picture):
        """A square dragged on the picture (its corners as fractions of the picture, from the page's script):
        (square, picture with the square marked, paint editor, view)."""
        if picture is None or not drag:
            return (gr.skip(),) * 4
        try:
            x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in json.loads(drag))
        except (ValueError, TypeError):
            raise IgptError(f"the dragged square came as {drag!r}, not four numbers") from None
        h, w = picture.shape[:2]
        box = square_from_drag(h, w, (x0 * w, y0 * h), (x1 * w, y1 * h))
        return (_square_text(box), *self._square_outputs(name, picture, box))

    @user_errors
    def type_square(self, name: str | None, picture, square: str | None):
        """A square typed as "x, y, side": (square, picture with the square marked, paint editor, view)."""
        if picture is None:
            return (gr.skip(),) * 4
        box = _parse_square(square, picture)
        return (_square_text(box), *self._square_outputs(name, picture, box))

    def prepare(self, palette, size, editor, picture, square):
        """(the square at the model's size, its ids, the model's view, the painted pixels or None)."""
        region, painted = _model_input(editor, picture, square)
        original, ids, view = palette.view(region, size)
        return original, ids, view, painted_cells(painted, size)

    @user_errors
    def show_view(self, name: str | None, editor: dict | None, picture, square=""):
        """The model's view of the chosen square, large, with the pixels painted for inpainting tinted."""
        if not name or (picture is None and (editor or {}).get("background") is None):
            return None
        if name in OPENAI_MODELS and find_imported(name, self.runs_dir) is None:
            return gr.skip()  # not imported yet: choosing it imports it, and shows the view then
        run = self.run(name)
        size = run.model_config.image_size
        _, _, view, painted = self.prepare(self.models.palette(run), size, editor, picture, square)
        return enlarge(_shade(view, painted), display_scale(size, 256))
