"""The browser completion demo: pick a model and a picture, drag a square on it, watch iGPT finish it.

    python apps/demo.py [--port 7860] [--host 127.0.0.1] [--runs-dir DIR]

(`igpt demo` and `make demo` run exactly this.) A thin shell over igpt_core: the square the model sees
is `images.crop` (dragged out with `images.square_from_drag`) seen through `Palette.view`; every action
is one library call — `complete_stream`, `inpaint_stream` or `surprise_map` — plus the drawing in
`igpt_core.render`. OpenAI's released models are listed beside the local runs and imported on first use
(`hf.import_once`). Nothing happens at import: `build_demo(runs_dir)` makes the app, `main()` serves it.
Per-user state lives in `gr.State`; the only shared state is the read-only caches of one app.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib.util
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from igpt_core import IgptError, complete_stream, inpaint_stream, list_runs, load_dataset, load_image, surprise_map
from igpt_core.data import builtin_photos
from igpt_core.hf import OPENAI_MODELS, find_imported, hub_offline, import_once, in_hub_cache
from igpt_core.images import center_box, crop, painted_cells, resize, square_from_drag, square_inside, to_rgb
from igpt_core.likelihood import bits_per_dim, likelihood_kind
from igpt_core.render import completion_grid, display_scale, enlarge, grid, heatmap, hide_rows, mark_square
from igpt_core.runs import ModelCache, open_run, return_freed_memory, runs_root

N_EXAMPLES = 12  # validation images shown in the gallery
EDITOR_SIDE = 1024  # uploads are shrunk to at most this a side (models see <= 64 pixels a side)
SHOWN_SIDE = 256  # small pictures are drawn enlarged to at least this, with visible pixels
PICTURE_SIDE = 384  # ... and the picture to drag a square on, to at least this
BRUSH_RGB = (255, 0, 255)  # the mask brush: magenta, a colour no dataset here is made of
PENDING = (128, 128, 128)  # pixels not generated yet: the grey of render.hide_rows
PHOTOS = "photos"  # gallery of the built-in photos: for imported runs, photo runs, or missing data
NO_RUNS = """### No trained models yet
There are no runs under `{runs_dir}`. Choose one of OpenAI's models in the picker above (downloaded once
from the Hugging Face hub), or make one, then press **Refresh models**:

    make demo         # from the igpt checkout: trains runs/digits (1–4 min on CPU), then opens this page
    igpt train --dataset digits --preset tiny --name digits --runs-dir {runs_dir}
"""
TITLE = """# iGPT: finishing pictures one pixel at a time
Image GPT (*Generative Pretraining from Pixels*, Chen et al. 2020) reads a picture as a sequence of palette
colours, row by row, left to right. Keep the top rows of an image and the model writes the rest **one pixel
at a time in that raster order**; each sample is a different guess. Pick a model and a picture, **drag a
square on the picture** to choose what the model sees, then press **Complete**."""
CROP_HELP = ("**Drag a square** on the picture to choose what the model sees: the square grows from where you "
             "press, by the longer side of your drag, and stops at the picture's edges. Or type it: x, y, side "
             "in the picture's pixels, then Enter.")
CSS = """
.pixels img, #examples img { image-rendering: pixelated; }
#picture img { cursor: crosshair; touch-action: none; }
#drag, #drag-apply { display: none !important; }
#progress, #inpaint-progress { min-height: 1.6em; }
"""
# Drag a square on the picture: the page draws it while the mouse moves (the same rule as
# images.square_from_drag, in screen pixels), then sends the drag's two corners as fractions of the
# picture to the server through the hidden #drag-apply button, whose event reads window.igptDrag.
DRAG_JS = """() => {
  const fit = (img) => {  // the picture's box on screen: <img> centres it (object-fit: scale-down or contain)
    const r = img.getBoundingClientRect();
    const fill = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    const s = getComputedStyle(img).objectFit === 'contain' ? fill : Math.min(fill, 1);
    const w = img.naturalWidth * s, h = img.naturalHeight * s;
    return {left: r.left + (r.width - w) / 2, top: r.top + (r.height - h) / 2, width: w, height: h};
  };
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const square = (d) => {
    const right = d.x1 >= d.x0, down = d.y1 >= d.y0;
    const room = Math.min(right ? d.box.width - d.x0 : d.x0, down ? d.box.height - d.y0 : d.y0);
    const side = Math.min(Math.max(Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0)), room);
    return {left: right ? d.x0 : d.x0 - side, top: down ? d.y0 : d.y0 - side, side};
  };
  let drag = null;
  const point = (e) => [clamp(e.clientX - drag.box.left, 0, drag.box.width),
                        clamp(e.clientY - drag.box.top, 0, drag.box.height)];
  document.addEventListener('dragstart', (e) => { if (e.target.closest('#picture')) e.preventDefault(); }, true);
  document.addEventListener('pointerdown', (e) => {
    const img = e.target.closest && e.target.closest('#picture img');
    if (!img || e.button !== 0 || !img.naturalWidth) return;
    e.preventDefault();
    drag = {box: fit(img), outline: document.createElement('div')};
    [drag.x0, drag.y0] = point(e);
    [drag.x1, drag.y1] = [drag.x0, drag.y0];
    drag.outline.id = 'drag-square';
    drag.outline.style.cssText = 'position:fixed;border:2px dashed #fff;outline:2px solid #000;' +
      'pointer-events:none;z-index:1000;width:0;height:0';
    document.body.appendChild(drag.outline);
  }, true);
  document.addEventListener('pointermove', (e) => {
    if (!drag) return;
    [drag.x1, drag.y1] = point(e);
    const s = square(drag);
    Object.assign(drag.outline.style, {left: drag.box.left + s.left + 'px', top: drag.box.top + s.top + 'px',
                                       width: s.side + 'px', height: s.side + 'px'});
  }, true);
  document.addEventListener('pointerup', (e) => {
    if (!drag) return;
    [drag.x1, drag.y1] = point(e);
    const d = drag;
    drag = null;
    d.outline.remove();
    if (Math.max(Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0)) < 3) return;  // a click, not a drag
    window.igptDrag = JSON.stringify([d.x0 / d.box.width, d.y0 / d.box.height,
                                      d.x1 / d.box.width, d.y1 / d.box.height]);
    document.querySelector('#drag-apply').click();
  }, true);
}"""
READ_DRAG = "(drag, ...rest) => [window.igptDrag || '', ...rest]"


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


def _user_errors(fn):
    """Show IgptError (whose message is written for the user) as a Gradio error in the page."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except IgptError as err:
                raise gr.Error(str(err)) from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IgptError as err:
            raise gr.Error(str(err)) from None
    return call


def _stopped(verb: str, progress: str | None):
    """The progress line after Stop (or an error): unchanged unless a stream was under way. The grid
    is an output too, left as it is: so that this event, not the cancelled one, sets its status
    (a cancel that raced the stream's last frame left the grid marked "Error")."""
    if not progress or not progress.startswith(("Generating", "Filling")):
        return gr.skip(), gr.skip()
    where = progress.split(" (")[0].replace("Generating ", "").replace("Filling — ", "")
    return f"Stopped at {where}: the grid shows the pixels {verb} so far.", gr.skip()


def _describe(summary: dict) -> str:
    """One line of facts about a run, shown beside its name in the picker."""
    if "error" in summary:
        return f"{summary['name']} — unreadable: {summary['error']}"
    bpd = summary["best_val_bpd"]
    return (f"{summary['name']} — {summary['dataset']} · {str(summary['objective']).upper()} · "
            f"{summary['preset'] or 'imported'} · {summary['resolution']}×{summary['resolution']} · "
            f"{summary['steps']} steps · " + (f"val {bpd:.2f} bits/dim" if bpd is not None else "no val loss yet"))


def _describe_hub(repo_id: str, imported) -> str:
    """The picker's line for one of OpenAI's models: what it is, and whether it is here yet."""
    about, download = OPENAI_MODELS[repo_id]
    what = f"{repo_id} — OpenAI's {about}"
    if imported is not None:
        return f"{what} · imported as run {imported.name}"
    if in_hub_cache(repo_id):
        return f"{what} · in the Hugging Face cache: imported when chosen"
    if hub_offline():
        return f"{what} · offline (HF_HUB_OFFLINE=1) and not on this machine"
    return f"{what} · a {download} download, once, when chosen"


# -- the actions ------------------------------------------------------------------------------------


class Demo:
    """The actions behind the page. Holds the read-only caches of one app (models and palettes by
    checkpoint file, gallery images by dataset); everything per-user comes in as arguments."""

    def __init__(self, runs_dir, model_memory: int | None = None):
        self.runs_dir = Path(runs_dir)
        self.models = ModelCache(max_bytes=model_memory)  # bytes; None: the cache's default share of RAM
        self._examples: dict[tuple, tuple] = {}
        self._examples_lock = threading.Lock()
        self._import_lock = threading.Lock()  # two users choosing the same OpenAI model import it once

    # -- runs and models --

    def summaries(self) -> list[dict]:
        out = []
        for run in list_runs(self.runs_dir):
            try:
                out.append(run.summary())
            except IgptError as err:  # an unreadable run.json: listed with the library's one-line reason
                out.append({"name": run.name, "error": str(err)})
        return out

    def run(self, name: str | None):
        """The run behind a picker value: a run's name, or one of OpenAI's hub ids once imported."""
        if not name:
            raise IgptError("choose a model first")
        if name in OPENAI_MODELS:
            run = find_imported(name, self.runs_dir)
            if run is None:
                raise IgptError(f"{name} is not imported yet: choose it in the model picker to import it")
            return run
        return open_run(name, self.runs_dir)

    def using(self, name: str | None, step: int | None = None):
        """`with demo.using(name, step) as (model, palette, step):` a run's model, loaded once and kept in
        memory (not released by the model cache's budget) until the block ends: wrap a request's work."""
        run = self.run(name)
        try:
            step = int(step) if step not in (None, "") else None
        except (TypeError, ValueError):
            raise IgptError(f"the checkpoint must be a training step such as {run.checkpoints()[-1:]}, "
                            f"got {step!r}") from None
        return self.models.lease(run, step)

    def examples(self, name: str) -> tuple[list, list[np.ndarray], list[str], str]:
        """(pictures to choose from, their thumbnails at the model's size, captions, where they come from)."""
        run = self.run(name)
        info, size = run.info, run.model_config.image_size
        dataset, note = info.get("dataset") or PHOTOS, ""
        if dataset.startswith("imported:"):
            dataset, note = PHOTOS, " (an imported model)"
        key = (dataset, size, info.get("data_dir"))
        with self._examples_lock:
            if key not in self._examples:
                try:
                    self._examples[key] = self._gallery(dataset, size, info.get("data_dir"), note)
                except IgptError:
                    self._examples[key] = self._gallery(PHOTOS, size, None, f" ({dataset} is not on this machine)")
            return self._examples[key]

    @staticmethod
    def _gallery(dataset: str, size: int, data_dir, note: str):
        if dataset == PHOTOS:  # the whole photos, to crop; thumbnails show their centre squares
            photos = builtin_photos()
            pictures = [resize(crop(p, None), EDITOR_SIDE) if max(p.shape[:2]) > EDITOR_SIDE else p
                        for p in photos.values()]
            return (pictures, [resize(crop(p, None), size) for p in pictures], list(photos),
                    f"the built-in photos{note}: centre squares; drag on the picture to choose another part")
        data = load_dataset(dataset, "val", resolution=size, data_dir=data_dir)
        images = list(data.images[:N_EXAMPLES])
        if data.labels is not None and data.classes:
            captions = [data.classes[label] for label in data.labels[:N_EXAMPLES]]
        else:
            captions = [f"#{i + 1}" for i in range(len(images))]
        return images, images, captions, f"validation images of {dataset}{note}"

    # -- page actions: the model --

    def refresh(self, current: str | None):
        """Re-list the runs and OpenAI's models: (picker, no-runs notice, main panel)."""
        summaries = self.summaries()
        local = [s["name"] for s in summaries if "error" not in s]
        choices = [(_describe(s), s["name"]) for s in summaries]
        choices += [(_describe_hub(repo_id, find_imported(repo_id, self.runs_dir)), repo_id)
                    for repo_id in OPENAI_MODELS]
        usable = local + list(OPENAI_MODELS)
        value = current if current in usable else (local[0] if local else None)
        return (gr.Dropdown(choices=choices, value=value), gr.Markdown(visible=not local), gr.Column(visible=True))

    def relist(self, name: str | None):
        """After one of OpenAI's models was chosen (and so imported): the listing says it is here now."""
        return self.refresh(name) if name in OPENAI_MODELS else (gr.skip(),) * 3

    @_user_errors
    def choose_run(self, name: str | None, progress=gr.Progress(track_tqdm=True)):
        """A model was picked (one of OpenAI's is imported first, with download progress): its facts,
        checkpoints, gallery and the rows slider for its resolution."""
        if not name:
            return "", gr.Dropdown(choices=[], value=None), [], gr.Slider()
        if name in OPENAI_MODELS:
            try:
                self._import(name, progress)
            except IgptError as err:  # e.g. offline: say so in one line and leave the rest of the page as it is
                return f"**{name}**: {err}", gr.skip(), gr.skip(), gr.skip()
        run = self.run(name)
        summary = run.summary()
        steps = run.checkpoints()
        size = summary["resolution"]
        _, thumbnails, captions, origin = self.examples(name)
        scale = display_scale(size, 96)
        gallery = [(enlarge(image, scale), caption) for image, caption in zip(thumbnails, captions)]
        return (self._facts(run, summary, origin),
                gr.Dropdown(choices=[(f"step {s}", s) for s in steps], value=steps[-1] if steps else None),
                gr.Gallery(value=gallery, label=f"Examples ({origin}) — click one"),
                gr.Slider(minimum=0, maximum=size, value=size // 2, step=1))

    def _import(self, repo_id: str, progress) -> None:
        with self._import_lock:
            if find_imported(repo_id, self.runs_dir) is None:
                progress(0, desc=f"Importing {repo_id}: a {OPENAI_MODELS[repo_id][1]} download, once")
                import_once(repo_id, self.runs_dir)

    @staticmethod
    def _facts(run, summary: dict, origin: str) -> str:
        size, bpd, steps = summary["resolution"], summary["best_val_bpd"], run.checkpoints()
        pixels = f"{size}×{size} pixels in {summary['colors']} colours"
        if str(summary["dataset"]).startswith("imported:"):
            source = summary["dataset"].removeprefix("imported:")
            about = OPENAI_MODELS.get(source, ("weights imported from Hugging Face",))[0]
            return f"**{run.name}**: {about} (from {source}), autoregressive, {pixels}.  \nGallery: {origin}."
        objective = {"ar": "autoregressive (next pixel)", "bert": "BERT (masked pixels)"}.get(summary["objective"],
                                                                                             summary["objective"])
        return (f"**{run.name}**: trained on **{summary['dataset']}**, {objective}, preset {summary['preset'] or '—'}, "
                f"{pixels}, {summary['steps']} training steps"
                + (f", validation {bpd:.3f} bits/dim" if bpd is not None else "")
                + ("" if steps else " — **no checkpoint yet**: let training write one, then Refresh")
                + f".  \nGallery: {origin}.")

    # -- page actions: the picture and its square --

    @staticmethod
    def pick_index(evt: gr.SelectData):
        return evt.index

    @_user_errors
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

    @_user_errors
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

    @_user_errors
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

    @_user_errors
    def type_square(self, name: str | None, picture, square: str | None):
        """A square typed as "x, y, side": (square, picture with the square marked, paint editor, view)."""
        if picture is None:
            return (gr.skip(),) * 4
        box = _parse_square(square, picture)
        return (_square_text(box), *self._square_outputs(name, picture, box))

    def _prepare(self, palette, size, editor, picture, square):
        """(the square at the model's size, its ids, the model's view, the painted pixels or None)."""
        region, painted = _model_input(editor, picture, square)
        original, ids, view = palette.view(region, size)
        return original, ids, view, painted_cells(painted, size)

    @_user_errors
    def show_view(self, name: str | None, editor: dict | None, picture, square=""):
        """The model's view of the chosen square, large, with the pixels painted for inpainting tinted."""
        if not name or (picture is None and (editor or {}).get("background") is None):
            return None
        if name in OPENAI_MODELS and find_imported(name, self.runs_dir) is None:
            return gr.skip()  # not imported yet: choosing it imports it, and shows the view then
        run = self.run(name)
        size = run.model_config.image_size
        _, _, view, painted = self._prepare(self.models.palette(run), size, editor, picture, square)
        return enlarge(_shade(view, painted), display_scale(size, 256))

    # -- page actions: completing, filling in, scoring --

    @_user_errors
    def complete(self, name, step, editor, picture, square, keep_rows, n_samples, temperature, top_k, seed, update,
                 watch=False, int8=False):
        """Stream completions from the top `keep_rows` rows: (grid, progress text, what sample 1's next
        pixel is drawn from if `watch` and the model is AR, else None) at least once per row."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            keep_rows = int(keep_rows)
            original, ids, view, _ = self._prepare(palette, size, editor, picture, square)
            known = np.zeros(size * size, bool)
            known[: keep_rows * size] = True
            stream = complete_stream(model, ids, keep_rows, int(n_samples), temperature=float(temperature),
                                     top_k=int(top_k or 0) or None, seed=int(seed or 0),
                                     every=1 if update == "every pixel" else size, precision="int8" if int8 else "fp32")
            drawn_from = {"numbers": None}
            if watch and model.config.objective == "ar":
                stream = self._watching(stream, model, palette, keep_rows * size, temperature, top_k, drawn_from)
            for frame in self._frames(stream, model, palette, known, original, view, hide_rows(view, keep_rows),
                                      int(n_samples), "complete"):
                yield *frame, drawn_from["numbers"]

    @staticmethod
    def _watching(stream, model, palette, start: int, temperature, top_k, drawn_from: dict):
        """The stream, noting in drawn_from what sample 1's next pixel is drawn from (`next_pixel`)."""
        for out, filled, done in stream:
            if start + filled < out.shape[1]:
                drawn_from["numbers"] = _sibling("inside").pixel_numbers(model, palette, out[0], start + filled,
                                                                         temperature, top_k)
            yield out, filled, done

    @_user_errors
    def inpaint(self, name, step, editor, picture, square, n_samples, temperature, top_k, seed):
        """Stream fills of the pixels painted in the editor: (grid, progress text)."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            original, ids, view, hidden = self._prepare(palette, size, editor, picture, square)
            if hidden is None:
                raise IgptError("paint over the pixels to regenerate first, with the brush of the Inpaint tab's editor")
            known = ~hidden.reshape(-1)
            kept = view.copy()
            kept[hidden] = PENDING
            stream = inpaint_stream(model, ids, known, int(n_samples), temperature=float(temperature),
                                    top_k=int(top_k or 0) or None, seed=int(seed or 0))
            yield from self._frames(stream, model, palette, known, original, view, kept, int(n_samples), "inpaint")

    def _frames(self, stream, model, palette, known, original, view, kept, n_samples, action):
        """The paper's figure after each streamed step, with a progress line; pixels not generated yet are grey."""
        size = model.config.image_size
        total = int((~known).sum())
        order = np.flatnonzero(~known)  # AR models fill these in raster order

        def progress(filled: int) -> str:
            if model.config.objective == "ar":
                return f"Generating row {int(order[filled]) // size + 1}/{size} — {filled}/{total} pixels"
            return f"Filling — {filled}/{total} pixels (BERT commits its most confident guesses first)"

        start = time.perf_counter()
        if total:
            yield completion_grid(original, view, kept, np.stack([kept] * n_samples)), progress(0)
        for out, filled, done in stream:
            samples = palette.decode(out, size)
            if filled < total:
                samples.reshape(len(samples), -1, 3)[:, ~known & ~done.numpy()] = PENDING  # a view of samples
                text = progress(filled)
            else:
                what, button = ("completions", "Complete") if action == "complete" else ("fills", "Fill in")
                text = (f"Done: {len(samples)} {what}, {total} pixels each, in {time.perf_counter() - start:.1f} s. "
                        f"Change the seed and press {button} again for new guesses.")
            yield completion_grid(original, view, kept, samples), text

    @contextlib.contextmanager
    def model_and_ids(self, name, step, editor, picture, *region):
        """`with` it: (model, palette, palette ids of the model's view), what the "Inside the model" tab looks
        at; the model stays in memory until the block ends."""
        with self.using(name, step) as (model, palette, _):
            _, ids, _, _ = self._prepare(palette, model.config.image_size, editor, picture, *region)
            yield model, palette, ids

    @_user_errors
    def surprise(self, name, step, editor, picture, square):
        """Per-pixel surprise (negative log-likelihood) of the model's view, as a heat map."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            _, ids, view, _ = self._prepare(palette, size, editor, picture, square)
            nll = surprise_map(model, ids)
        worst = np.unravel_index(int(nll.argmax()), nll.shape)
        low, high = float(nll.min()), float(nll.max())  # the ramp spans this image's own range, for contrast
        picture = grid([[view, heatmap(nll - low, vmax=max(high - low, 1e-6))]],
                       labels=["model's view", f"surprise ({low:.1f}..{high:.1f} nats)"],
                       pixel=display_scale(size, 256))
        text = (f"Mean surprise **{nll.mean():.3f} nats per pixel** ({bits_per_dim(nll.mean()):.3f} bits), "
                f"{likelihood_kind(model.config)} likelihood. "
                f"Bright = the model did not expect that colour there; the most surprising pixel is at row "
                f"{worst[0] + 1}, column {worst[1] + 1} ({nll.max():.2f} nats).")
        return picture, text


# -- the page: its parts, top to bottom ---------------------------------------------------------------


def _model_row(picker) -> SimpleNamespace:
    with gr.Row(equal_height=True):
        # Custom values allowed: API clients may name a run (or step) made after the page was built;
        # the library's own message answers a name or step that does not exist.
        run = gr.Dropdown(choices=picker.choices, value=picker.value, label="Model: a local run (dataset · "
                          "objective · preset · resolution · training steps · validation bits/dim) or one of "
                          "OpenAI's", scale=5, allow_custom_value=True, elem_id="run")
        step = gr.Dropdown(choices=[], label="Checkpoint", scale=1, allow_custom_value=True, elem_id="step")
        refresh = gr.Button("Refresh models", scale=0, min_width=140, elem_id="refresh")
    return SimpleNamespace(run=run, step=step, refresh=refresh)


def _picture_row() -> SimpleNamespace:
    """Gallery and upload | the picture, where a square is dragged | what the model sees."""
    with gr.Row():
        with gr.Column(scale=4):
            gallery = gr.Gallery(label="Examples — click one", columns=3, height=330, allow_preview=False,
                                 format="png", elem_id="examples")
            upload = gr.File(label="…or upload your own picture (PNG, JPEG, GIF, BMP, TIFF, WebP)",
                             file_count="single", type="filepath", elem_id="upload")
            upload_note = gr.Markdown(elem_id="upload-note")
        with gr.Column(scale=5):
            picture = gr.Image(label="Your picture: drag a square on it", format="png", interactive=False,
                               height=400, buttons=[], elem_id="picture")
            square = gr.Textbox(label="The square the model sees: x, y, side (pixels of your picture)",
                                max_lines=1, elem_id="square")
            gr.Markdown(CROP_HELP, elem_id="square-help")
            # The page's drag script hands the dragged corners to the server through these two.
            drag = gr.Textbox(visible="hidden", elem_id="drag")
            drag_apply = gr.Button(visible="hidden", elem_id="drag-apply")
        with gr.Column(scale=4):
            view = gr.Image(label="What the model sees", format="png", interactive=False, height=400,
                            elem_id="view", elem_classes="pixels")
            gr.Markdown("The square at the model's resolution, in its palette of colours; pixels painted for "
                        "inpainting are tinted magenta.", elem_id="view-help")
    return SimpleNamespace(gallery=gallery, upload=upload, upload_note=upload_note, picture=picture, square=square,
                           drag=drag, drag_apply=drag_apply, view=view)


def _sampling_row() -> SimpleNamespace:
    with gr.Row():
        n_samples = gr.Slider(1, 8, value=4, step=1, label="Samples", elem_id="samples")
        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (1 = as trained)",
                                elem_id="temperature")
        top_k = gr.Slider(0, 64, value=0, step=1, label="Top-k (0 = all colours)", elem_id="top-k")
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (same seed, same guesses)", elem_id="seed")
    return SimpleNamespace(n_samples=n_samples, temperature=temperature, top_k=top_k, seed=seed)


def _complete_tab() -> SimpleNamespace:
    with gr.Tab("Complete", id="complete"):
        with gr.Row(equal_height=True):
            keep_rows = gr.Slider(0, 8, value=4, step=1, label="Rows to keep (from the top)", scale=3,
                                  elem_id="keep-rows")
            update = gr.Radio(["every row", "every pixel"], value="every row", label="Update the picture", scale=2,
                              elem_id="update")
            watch = gr.Checkbox(label="Show what the next pixel is drawn from (AR)", value=False, scale=2,
                                elem_id="watch")
            int8 = gr.Checkbox(False, label="int8: faster, approximate", scale=1, elem_id="int8")
            button = gr.Button("Complete", variant="primary", scale=1, elem_id="complete-btn")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
        progress = gr.Markdown(elem_id="progress")
        with gr.Row(equal_height=True, visible=False, elem_id="watching") as watching:  # shown while `watch` is ticked
            drawing = gr.Image(show_label=False, format="png", interactive=False, height=200, scale=1,
                               elem_id="drawing")
            drawing_text = gr.Markdown(elem_id="drawing-text")
        drawn_from = gr.State(None)  # what sample 1's next pixel is drawn from, as the stream goes
        result = gr.Image(label="Completions", show_label=False, format="png", interactive=False, elem_id="grid",
                          elem_classes="pixels", buttons=["download", "fullscreen"])
    return SimpleNamespace(keep_rows=keep_rows, update=update, button=button, stop=stop, progress=progress,
                           result=result, watch=watch, int8=int8, watching=watching, drawing=drawing,
                           drawing_text=drawing_text, drawn_from=drawn_from)


def _surprise_tab() -> SimpleNamespace:
    with gr.Tab("Surprise map", id="surprise"):
        with gr.Row(equal_height=True):
            gr.Markdown("How unexpected each pixel of the model's view is to the model: its negative "
                        "log-likelihood in nats, from dark (this picture's least surprising pixel) to bright "
                        "(its most surprising).")
            button = gr.Button("Show the surprise map", variant="primary", scale=0, min_width=220,
                               elem_id="surprise-btn")
        text = gr.Markdown(elem_id="surprise-text")
        result = gr.Image(label="Surprise map", show_label=False, format="png", interactive=False, elem_id="surprise",
                          elem_classes="pixels")
    return SimpleNamespace(button=button, text=text, result=result)


def _inpaint_tab() -> SimpleNamespace:
    with gr.Tab("Inpaint", id="inpaint"):
        with gr.Row():
            with gr.Column(scale=1):
                paint = gr.ImageEditor(
                    label="Paint over the pixels to regenerate", type="numpy", image_mode="RGBA", sources=(),
                    transforms=(), layers=False,
                    brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed", default_size=20),
                    eraser=gr.Eraser(default_size=20), format="png", height=400, elem_id="paint")
            with gr.Column(scale=1):
                gr.Markdown("The editor shows the square the model sees; paint over any pixels with the brush "
                            "(tools on its left) and the model's view tints them. **Fill in** regenerates them "
                            "from everything else. BERT-objective runs are trained for exactly this; "
                            "autoregressive runs fill in raster order, seeing only the pixels above and to the "
                            "left of each one. Choosing another square clears the paint.")
                with gr.Row():
                    button = gr.Button("Fill in", variant="primary", min_width=140, elem_id="inpaint-btn")
                    stop = gr.Button("Stop", variant="stop", min_width=100, elem_id="inpaint-stop")
        progress = gr.Markdown(elem_id="inpaint-progress")
        result = gr.Image(label="Fills", show_label=False, format="png", interactive=False, elem_id="inpaint-grid",
                          elem_classes="pixels", buttons=["download", "fullscreen"])
    return SimpleNamespace(paint=paint, button=button, stop=stop, progress=progress, result=result)


def _wire_choices(demo: gr.Blocks, actions: Demo, ui: SimpleNamespace) -> None:
    """The model picker, the gallery, uploads and the square: each keeps the model's view up to date."""
    pick = ui.pick
    listing = [ui.run, ui.notice, ui.panel]
    choice = [ui.facts, ui.step, pick.gallery, ui.complete.keep_rows]
    shown = [ui.paint, ui.chosen, pick.view, pick.upload_note, pick.square, pick.picture]
    squared = [pick.square, pick.picture, ui.paint, pick.view]
    picture = [ui.run, ui.paint, ui.chosen, pick.square]
    ui.refresh.click(actions.refresh, ui.run, listing, api_name="refresh")
    chosen = ui.run.change(actions.choose_run, ui.run, choice, api_name="choose_run")
    chosen.success(actions.show_view, picture, pick.view, api_name="run_view", api_visibility="private")
    chosen.success(actions.relist, ui.run, listing, api_visibility="private")
    pick.gallery.select(actions.pick_index, None, ui.example_index, api_visibility="private").then(
        actions.use_example, [ui.run, ui.example_index], shown, api_name="use_example")
    pick.upload.upload(actions.upload, [ui.run, pick.upload], shown, api_name="upload")
    pick.drag_apply.click(actions.drag_square, [pick.drag, ui.run, ui.chosen], squared, js=READ_DRAG,
                          api_name="drag_square", show_progress="hidden", trigger_mode="always_last")
    pick.square.submit(actions.type_square, [ui.run, ui.chosen, pick.square], squared, api_name="type_square")
    # Only the user's own strokes (.input, not .change): a picture set by an action comes with its view, and
    # a late .change from that update could overwrite the view of a picture chosen since.
    ui.paint.input(actions.show_view, picture, pick.view, api_name="show_view")
    # On page load: the current list of models, then the first run's gallery with its first example ready.
    demo.load(actions.refresh, ui.run, listing, api_name="page_runs", api_visibility="private").then(
        actions.choose_run, ui.run, choice, api_name="page_run", api_visibility="private").then(
        actions.first_example, [ui.run, ui.chosen], shown, api_name="page_example", api_visibility="private")


def _wire_actions(actions: Demo, ui: SimpleNamespace) -> None:
    """Complete, surprise and inpaint; Stop cancels a stream, and its progress line says where it stopped."""
    picture = [ui.run, ui.step, ui.paint, ui.chosen, ui.pick.square]
    sampling = [ui.sampling.n_samples, ui.sampling.temperature, ui.sampling.top_k, ui.sampling.seed]
    tab = ui.complete
    completing = tab.button.click(actions.complete, [*picture, tab.keep_rows, *sampling, tab.update, tab.watch,
                                   tab.int8],
                                  [tab.result, tab.progress, tab.drawn_from], api_name="complete",
                                  show_progress="minimal", show_progress_on=tab.result)
    tab.watch.change(lambda on: gr.Row(visible=on), tab.watch, tab.watching, api_visibility="private",
                     show_progress="hidden")
    # The stream notes next_pixel's numbers in a State (not returned to API clients); its change draws them.
    tab.drawn_from.change(_sibling("inside").watched, tab.drawn_from, [tab.drawing, tab.drawing_text],
                          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    # A cancelled event counts as failed, so .failure notes it after the last frame.
    tab.stop.click(None, cancels=[completing])
    completing.failure(functools.partial(_stopped, "generated"), tab.progress, [tab.progress, tab.result],
                       api_visibility="private", show_progress="hidden")
    ui.surprise.button.click(actions.surprise, picture, [ui.surprise.result, ui.surprise.text], api_name="surprise")
    tab = ui.inpaint
    filling = tab.button.click(actions.inpaint, [*picture, *sampling], [tab.result, tab.progress], api_name="inpaint",
                               show_progress="minimal", show_progress_on=tab.result)
    tab.stop.click(None, cancels=[filling])
    filling.failure(functools.partial(_stopped, "filled"), tab.progress, [tab.progress, tab.result],
                    api_visibility="private", show_progress="hidden")


@functools.cache
def _sibling(name: str):
    """Another module of apps/ (a folder of scripts, not a package), imported by its path."""
    spec = importlib.util.spec_from_file_location(f"igpt_apps_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_demo(runs_dir=None, model_memory: int | None = None) -> gr.Blocks:
    """The Gradio app over the runs in `runs_dir` (default: $IGPT_RUNS_DIR or ./runs); its models take at most
    `model_memory` bytes, beyond those in use (default: the model cache's share of RAM)."""
    runs_dir = runs_root(runs_dir)
    actions = Demo(runs_dir, model_memory)
    picker, notice, _ = actions.refresh(None)
    with gr.Blocks(title="iGPT completion demo", delete_cache=(600, 3600)) as demo:
        gr.Markdown(TITLE)
        ui = _model_row(picker)
        ui.notice = gr.Markdown(NO_RUNS.format(runs_dir=runs_dir), visible=notice.visible, elem_id="no-runs")
        with gr.Column() as ui.panel:
            ui.facts = gr.Markdown(elem_id="facts")
            ui.chosen = gr.State(None)  # the user's picture: a gallery example at its true pixels, or the upload
            ui.example_index = gr.Number(visible=False, precision=0)
            ui.pick = _picture_row()
            ui.sampling = _sampling_row()
            with gr.Tabs():
                ui.complete = _complete_tab()
                ui.surprise = _surprise_tab()
                ui.inpaint = _inpaint_tab()
                _sibling("inside").build_tab(actions.model_and_ids, [ui.run, ui.step],
                                             [ui.inpaint.paint, ui.chosen, ui.pick.square],
                                             [ui.sampling.temperature, ui.sampling.top_k], _user_errors)
            ui.paint = ui.inpaint.paint
        _wire_choices(demo, actions, ui)
        _wire_actions(actions, ui)
    demo.queue(default_concurrency_limit=2, max_size=64)  # two users compute at once; the rest wait in line
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **launch_options):
    """Launch the app with its stylesheet, drag script and an upload size limit (prevent_thread_lock=True in tests)."""
    return demo.launch(server_name=host, server_port=port, css=CSS, js=DRAG_JS, max_file_size="64mb",
                       show_error=True, **launch_options)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Open the iGPT completion demo in the browser.")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--runs-dir", default=None, help="folder holding the runs (default: $IGPT_RUNS_DIR or ./runs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not os.environ.get("GRADIO_TEMP_DIR"):  # uploads and rendered images go here, and nowhere else
        temp = tempfile.mkdtemp(prefix="igpt-demo-")
        os.environ["GRADIO_TEMP_DIR"] = temp
        atexit.register(shutil.rmtree, temp, ignore_errors=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a plain `kill` also removes it
    runs_dir = runs_root(args.runs_dir)
    return_freed_memory()  # a server: released models and finished requests' decoders give their memory back
    demo = build_demo(runs_dir)
    print(f"iGPT demo on http://{args.host}:{args.port} — runs from {runs_dir.resolve()}")
    serve(demo, args.host, args.port)


if __name__ == "__main__":
    main()
