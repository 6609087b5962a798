"""The browser completion demo: pick a model and a picture, keep its top rows, watch iGPT finish it.

    python apps/demo.py [--port 7860] [--host 127.0.0.1] [--runs-dir DIR]

(`igpt demo` and `make demo` run exactly this.) A thin shell over igpt_core: every action is one
library call — `complete_stream`, `inpaint_stream` or `surprise_map` — plus the drawing in
`igpt_core.render`. Nothing happens at import: `build_demo(runs_dir)` makes the app, `main()` serves it.
Per-user state lives in `gr.State`; the only shared state is the read-only model cache of one app.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from igpt_core import IgptError, complete_stream, inpaint_stream, list_runs, load_dataset, load_image, surprise_map
from igpt_core.images import resize
from igpt_core.likelihood import bits_per_dim, likelihood_kind
from igpt_core.render import completion_grid, display_scale, enlarge, grid, heatmap, hide_rows
from igpt_core.runs import default_runs_dir, open_run

N_EXAMPLES = 12  # validation images shown in the gallery
EDITOR_SIDE = 1024  # uploads are shrunk to at most this for the editor (models see <= 64 pixels a side)
BRUSH_RGB = (255, 0, 255)  # the mask brush: magenta, a colour no dataset here is made of
PENDING = (128, 128, 128)  # pixels not generated yet: the grey of render.hide_rows
WHOLE = (1, 50, 50)  # region sliders (zoom, centre across %, centre down %): the picture's whole centre square
FALLBACK_DATASET = "photos"  # gallery for imported runs, or when a run's own data is not on this machine
NO_RUNS = """### No trained models yet
There are no runs under `{runs_dir}`. Make one, then press **Refresh models**:

    make demo         # from the igpt checkout: trains runs/digits (~2 min on CPU), then opens this page
    igpt train --dataset digits --preset tiny --name digits --runs-dir {runs_dir}
"""
TITLE = """# iGPT: finishing pictures one pixel at a time
Image GPT (*Generative Pretraining from Pixels*, Chen et al. 2020) reads a picture as a sequence of palette
colours, row by row, left to right. Keep the top rows of an image and the model writes the rest **one pixel
at a time in that raster order**; each sample is a different guess. Pick a model, pick or upload a picture
(zoom into a part of it if you like), then press **Complete**."""
CSS = """
.pixels img, #examples img { image-rendering: pixelated; }
#progress, #inpaint-progress { min-height: 1.6em; }
"""


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


def _region(h: int, w: int, zoom: float, across: float, down: float) -> tuple[int, int, int]:
    """(top, left, side) of the square the model sees: 1/zoom of the short side, centred at (across %, down %)."""
    side = max(1, round(min(h, w) / max(float(zoom or 1), 1.0)))
    top = int(np.clip(round(float(down) / 100 * h - side / 2), 0, h - side))
    left = int(np.clip(round(float(across) / 100 * w - side / 2), 0, w - side))
    return top, left, side


def _model_input(editor: dict | None, picture: np.ndarray | None, zoom, across, down):
    """(the chosen square of the picture, uint8 RGB; the pixels painted in it, bool, or None).

    The picture comes from the user's state (a gallery example at its true pixels, or the upload), not
    from the editor, which only shows it (enlarged) and holds the brush strokes. An API call may instead
    send the picture as the editor's background.
    """
    if picture is None:
        background = (editor or {}).get("background")
        if background is None:
            raise IgptError("choose an example from the gallery or upload an image first")
        picture = np.asarray(background)
        picture = np.stack([picture] * 3, axis=-1) if picture.ndim == 2 else picture[..., :3]
    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    h, w = picture.shape[:2]
    top, left, side = _region(h, w, zoom, across, down)
    painted = _painted(editor)
    if painted is not None:  # the same square on the editor's canvas, which may show the picture enlarged
        scale = painted.shape[0] / h
        painted = painted[round(top * scale) : round((top + side) * scale),
                          round(left * scale) : round((left + side) * scale)]
    return picture[top : top + side, left : left + side], painted


def _model_view(picture: np.ndarray, palette, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the square picture at the model's size, its palette ids (T,), the model's view = ids as colours)."""
    small = resize(picture, size)
    ids = palette.encode(small[None], size)[0]
    return small, ids, palette.decode(ids[None], size)[0]


def _painted_cells(painted: np.ndarray | None, size: int) -> np.ndarray | None:
    """(size, size) bool: the model's pixels painted over (a quarter of the pixel or more), or None."""
    if painted is None or not painted.any():
        return None
    cover = np.asarray(Image.fromarray(painted.astype(np.uint8) * 255).resize((size, size), Image.BOX)) / 255
    return cover >= 0.25 if (cover >= 0.25).any() else cover > 0


def _shade(view: np.ndarray, cells: np.ndarray | None) -> np.ndarray:
    """The model's view with painted pixels tinted in the brush colour."""
    if cells is None:
        return view
    out = view.astype(np.float32)
    out[cells] = 0.45 * out[cells] + 0.55 * np.array(BRUSH_RGB, np.float32)
    return np.rint(out).astype(np.uint8)


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
    """The progress line after Stop (or an error): unchanged unless a stream was under way."""
    if not progress or not progress.startswith(("Generating", "Filling")):
        return gr.skip()
    where = progress.split(" (")[0].replace("Generating ", "").replace("Filling — ", "")
    return f"Stopped at {where}: the grid shows the pixels {verb} so far."


def _describe(summary: dict) -> str:
    """One line of facts about a run, shown beside its name in the picker."""
    if "error" in summary:
        return f"{summary['name']} — unreadable: {summary['error']}"
    bpd = summary["best_val_bpd"]
    return (f"{summary['name']} — {summary['dataset']} · {str(summary['objective']).upper()} · "
            f"{summary['preset'] or 'imported'} · {summary['resolution']}×{summary['resolution']} · "
            f"{summary['steps']} steps · " + (f"val {bpd:.2f} bits/dim" if bpd is not None else "no val loss yet"))


# -- the actions ------------------------------------------------------------------------------------


class Demo:
    """The actions behind the page. Holds the read-only caches of one app: models keyed by
    (run name, step) and gallery images keyed by dataset; everything per-user comes in as arguments."""

    def __init__(self, runs_dir):
        self.runs_dir = Path(runs_dir)
        self._models: dict[tuple[str, int], tuple] = {}
        self._examples: dict[tuple, tuple] = {}
        self._lock = threading.Lock()  # two users asking for the same model load it once
        self._examples_lock = threading.Lock()

    # -- runs and models --

    def summaries(self) -> list[dict]:
        out = []
        for run in list_runs(self.runs_dir):
            try:
                out.append(run.summary())
            except IgptError as err:  # an unreadable run.json: listed with the library's one-line reason
                out.append({"name": run.name, "error": str(err)})
        return out

    def load(self, name: str | None, step: int | None = None):
        """(model, palette, step) of a run, loaded once."""
        if not name:
            raise IgptError("choose a model first")
        run = open_run(name, self.runs_dir)
        try:
            step = run.resolve_step(int(step) if step not in (None, "") else None)
        except (TypeError, ValueError):
            raise IgptError(f"the checkpoint must be a training step such as {run.checkpoints()[-1:]}, "
                            f"got {step!r}") from None
        path = run.checkpoint_path(step)
        stamp = path.stat().st_mtime_ns  # a run re-trained under the same name is loaded again
        with self._lock:
            cached = self._models.get((name, step))
            if cached is None or cached[2] != stamp:
                model, palette, _ = run.load(step)
                palette.quantize(np.zeros((1, 3), np.uint8))  # build its lookup table before threads share it
                cached = self._models[(name, step)] = (model, palette, stamp)
        return cached[0], cached[1], step

    def examples(self, name: str) -> tuple[np.ndarray, list[str], str]:
        """(validation images at the model's size, captions, where they come from)."""
        run = open_run(name, self.runs_dir)
        info, size = run.info, run.model_config.image_size
        dataset, note = info.get("dataset") or FALLBACK_DATASET, ""
        if dataset.startswith("imported:"):
            dataset, note = FALLBACK_DATASET, " (an imported model: showing built-in photos)"
        key = (dataset, size, info.get("data_dir"))
        with self._examples_lock:
            if key not in self._examples:
                try:
                    data = load_dataset(dataset, "val", resolution=size, data_dir=info.get("data_dir"))
                except IgptError:
                    data = load_dataset(FALLBACK_DATASET, "val", resolution=size)
                    note = f" ({dataset} is not on this machine: showing built-in photos)"
                    dataset = FALLBACK_DATASET
                images = data.images[:N_EXAMPLES]
                if data.labels is not None and data.classes:
                    captions = [data.classes[label] for label in data.labels[:N_EXAMPLES]]
                else:
                    captions = [f"#{i + 1}" for i in range(len(images))]
                self._examples[key] = (images, captions, f"validation images of {dataset}{note}")
            return self._examples[key]

    # -- page actions --

    def refresh(self, current: str | None):
        """Re-list the runs: (picker, no-runs notice, main panel)."""
        summaries = self.summaries()
        choices = [(_describe(s), s["name"]) for s in summaries]
        names = [s["name"] for s in summaries if "error" not in s]
        value = current if current in names else (names[0] if names else None)
        return (gr.Dropdown(choices=choices, value=value), gr.Markdown(visible=not names),
                gr.Column(visible=bool(names)))

    @_user_errors
    def choose_run(self, name: str | None):
        """A run was picked: its facts, checkpoints, gallery and the rows slider for its resolution."""
        if not name:
            return "", gr.Dropdown(choices=[], value=None), [], gr.Slider()
        run = open_run(name, self.runs_dir)
        summary = run.summary()
        steps = run.checkpoints()
        size = summary["resolution"]
        images, captions, origin = self.examples(name)
        scale = display_scale(size, 96)
        gallery = [(enlarge(image, scale), caption) for image, caption in zip(images, captions)]
        objective = {"ar": "autoregressive (next pixel)", "bert": "BERT (masked pixels)"}.get(summary["objective"],
                                                                                             summary["objective"])
        bpd = summary["best_val_bpd"]
        facts = (f"**{name}**: trained on **{summary['dataset']}**, {objective}, preset {summary['preset'] or '—'}, "
                 f"{size}×{size} pixels in {summary['colors']} colours, {summary['steps']} training steps"
                 + (f", validation {bpd:.3f} bits/dim" if bpd is not None else "")
                 + ("" if steps else " — **no checkpoint yet**: let training write one, then Refresh")
                 + f".  \nGallery: {origin}.")
        return (facts, gr.Dropdown(choices=[(f"step {s}", s) for s in steps], value=steps[-1] if steps else None),
                gr.Gallery(value=gallery, label=f"Examples ({origin}) — click one"),
                gr.Slider(minimum=0, maximum=size, value=size // 2, step=1))

    @staticmethod
    def pick_index(evt: gr.SelectData):
        return evt.index

    @_user_errors
    def use_example(self, name: str | None, index):
        """Put gallery example `index` (0-based) in the picture editor."""
        return self._example(name, index)

    def first_example(self, name: str | None, picture):
        """On page load: the first example, unless the user has chosen a picture already (the gallery
        shows before this runs), or there is no run (or it has no gallery)."""
        if picture is not None:
            return (gr.skip(),) * 7
        try:
            return self._example(name, 0)
        except IgptError:
            return (gr.skip(),) * 7

    def _example(self, name: str | None, index):
        if index is None:
            raise IgptError("click an example in the gallery")
        if not name:
            raise IgptError("choose a model first")
        images, _, _ = self.examples(name)
        image = images[int(index) % len(images)]
        shown = enlarge(image, display_scale(image.shape[0], 256))
        return self._show_picture(name, image, shown)

    @_user_errors
    def upload(self, name: str | None, path: str | None):
        """An uploaded file: read it (with a readable message for anything unusable) into the picture editor."""
        if not path:
            return (gr.skip(),) * 7
        image = load_image(Path(path).read_bytes())  # bytes: messages say "the uploaded file", not a temp path
        h, w = image.shape[:2]
        notes = []
        if max(h, w) > EDITOR_SIDE:
            smaller = Image.fromarray(image)
            smaller.thumbnail((EDITOR_SIDE, EDITOR_SIDE), Image.LANCZOS)
            image = np.asarray(smaller)
        if name:
            size = open_run(name, self.runs_dir).model_config.image_size
            if min(h, w) < size:
                notes.append(f"The picture is only {w}×{h} pixels, smaller than the model's {size}×{size}: "
                             "it is enlarged, so expect blocks.")
            if h != w:
                notes.append("The model sees a square: the centre of the picture (zoom and move the region "
                             "with the sliders to choose another part).")
        for note in notes:
            gr.Warning(note)
        shown = enlarge(image, max(1, 256 // max(image.shape[:2])))  # small pictures drawn with visible pixels
        return self._show_picture(name, image, shown, " ".join(notes))

    def _show_picture(self, name, picture: np.ndarray, shown: np.ndarray, note: str = ""):
        """A new picture: (editor, picture state, view, note, zoom, across, down), the region reset."""
        editor = {"background": shown, "layers": [], "composite": shown}
        return (editor, picture, self.show_view(name, None, picture, *WHOLE), note, *WHOLE)

    @staticmethod
    def _prepare(palette, size, editor, picture, zoom, across, down):
        """(the region at the model's size, its ids, the model's view, the painted pixels or None)."""
        region, painted = _model_input(editor, picture, zoom, across, down)
        original, ids, view = _model_view(region, palette, size)
        return original, ids, view, _painted_cells(painted, size)

    @_user_errors
    def show_view(self, name: str | None, editor: dict | None, picture, zoom=1, across=50, down=50):
        """The model's view of the chosen region, large, with the pixels painted for inpainting tinted."""
        if not name or (picture is None and (editor or {}).get("background") is None):
            return None
        run = open_run(name, self.runs_dir)
        size = run.model_config.image_size
        _, _, view, painted = self._prepare(run.palette, size, editor, picture, zoom, across, down)
        return enlarge(_shade(view, painted), display_scale(size, 256))

    @_user_errors
    def complete(self, name, step, editor, picture, zoom, across, down, keep_rows, n_samples, temperature, top_k,
                 seed, update):
        """Stream completions from the top `keep_rows` rows: (grid, progress text) at least once per row."""
        model, palette, step = self.load(name, step)
        size = model.config.image_size
        keep_rows = int(keep_rows)
        original, ids, view, _ = self._prepare(palette, size, editor, picture, zoom, across, down)
        known = np.zeros(size * size, bool)
        known[: keep_rows * size] = True
        kept = hide_rows(view, keep_rows)
        stream = complete_stream(model, ids, keep_rows, int(n_samples), temperature=float(temperature),
                                 top_k=int(top_k or 0) or None, seed=int(seed or 0),
                                 every=1 if update == "every pixel" else size)
        yield from self._frames(stream, model, palette, ids, known, original, view, kept, int(n_samples), "complete")

    @_user_errors
    def inpaint(self, name, step, editor, picture, zoom, across, down, n_samples, temperature, top_k, seed):
        """Stream fills of the pixels painted in the editor: (grid, progress text)."""
        model, palette, step = self.load(name, step)
        size = model.config.image_size
        original, ids, view, hidden = self._prepare(palette, size, editor, picture, zoom, across, down)
        if hidden is None:
            raise IgptError("paint over the pixels to regenerate first, with the brush of the picture editor")
        known = ~hidden.reshape(-1)
        kept = view.copy()
        kept[hidden] = PENDING
        stream = inpaint_stream(model, ids, known, int(n_samples), temperature=float(temperature),
                                top_k=int(top_k or 0) or None, seed=int(seed or 0))
        yield from self._frames(stream, model, palette, ids, known, original, view, kept, int(n_samples), "inpaint")

    def _frames(self, stream, model, palette, ids, known, original, view, kept, n_samples, action):
        """The paper's figure after each streamed step, with a progress line; pixels not generated yet are grey."""
        size = model.config.image_size
        total = int((~known).sum())
        order = np.flatnonzero(~known)  # AR models fill these in raster order
        ar = model.config.objective == "ar"

        def progress(filled: int) -> str:
            if ar:
                return f"Generating row {int(order[filled]) // size + 1}/{size} — {filled}/{total} pixels"
            return f"Filling — {filled}/{total} pixels (BERT commits its most confident guesses first)"

        start = time.perf_counter()
        if total:
            yield completion_grid(original, view, kept, np.stack([kept] * n_samples)), progress(0)
        for out, filled in stream:
            samples = palette.decode(out, size)
            if filled < total:
                flat = samples.reshape(len(samples), -1, 3)  # a view: painting it paints samples
                if ar:
                    flat[:, order[filled:]] = PENDING
                else:  # BERT commits pixels in no fixed order: the unfilled ones still hold the prompt's ids
                    flat[(out.cpu().numpy() == ids[None]) & ~known[None]] = PENDING
                text = progress(filled)
            else:
                what, button = ("completions", "Complete") if action == "complete" else ("fills", "Fill in")
                text = (f"Done: {len(samples)} {what}, {total} pixels each, in {time.perf_counter() - start:.1f} s. "
                        f"Change the seed and press {button} again for new guesses.")
            yield completion_grid(original, view, kept, samples), text

    @_user_errors
    def surprise(self, name, step, editor, picture, zoom, across, down):
        """Per-pixel surprise (negative log-likelihood) of the model's view, as a heat map."""
        model, palette, step = self.load(name, step)
        size = model.config.image_size
        _, ids, view, _ = self._prepare(palette, size, editor, picture, zoom, across, down)
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


# -- the page ---------------------------------------------------------------------------------------


def build_demo(runs_dir=None) -> gr.Blocks:
    """The Gradio app over the runs in `runs_dir` (default: $IGPT_RUNS_DIR or ./runs)."""
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    actions = Demo(runs_dir)
    picker, _, panel_state = actions.refresh(None)
    has_runs = panel_state.visible

    with gr.Blocks(title="iGPT completion demo", delete_cache=(600, 3600)) as demo:
        gr.Markdown(TITLE)
        with gr.Row(equal_height=True):
            # Custom values allowed: API clients may name a run (or step) made after the page was built;
            # the library's own message answers a name or step that does not exist.
            run = gr.Dropdown(choices=picker.choices, value=picker.value, label="Model (run): dataset · objective · "
                              "preset · resolution · training steps · validation bits/dim", scale=5,
                              allow_custom_value=True, elem_id="run")
            step = gr.Dropdown(choices=[], label="Checkpoint", scale=1, allow_custom_value=True, elem_id="step")
            refresh = gr.Button("Refresh models", scale=0, min_width=140, elem_id="refresh")
        notice = gr.Markdown(NO_RUNS.format(runs_dir=runs_dir), visible=not has_runs, elem_id="no-runs")
        with gr.Column(visible=has_runs) as panel:
            facts = gr.Markdown(elem_id="facts")
            chosen = gr.State(None)  # the user's picture: a gallery example at its true pixels, or the upload
            example_index = gr.Number(visible=False, precision=0)
            with gr.Row():
                with gr.Column(scale=4):
                    gallery = gr.Gallery(label="Examples — click one", columns=3, height=330, allow_preview=False,
                                         format="png", elem_id="examples")
                    upload = gr.File(label="…or upload your own picture (PNG, JPEG, GIF, BMP, TIFF, WebP)",
                                     file_count="single", type="filepath", elem_id="upload")
                    upload_note = gr.Markdown(elem_id="upload-note")
                with gr.Column(scale=5):
                    editor = gr.ImageEditor(
                        label="Your picture",
                        type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False,
                        brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed",
                                       default_size=20),
                        eraser=gr.Eraser(default_size=20), format="png", height=400, elem_id="picture")
                    # A crop of our own: Gradio 6's editor crop reaches the server only after a later brush stroke.
                    with gr.Row():
                        zoom = gr.Slider(1, 8, value=WHOLE[0], step=0.25, label="Zoom (1 = whole picture)",
                                         elem_id="zoom")
                        across = gr.Slider(0, 100, value=WHOLE[1], step=1, label="Region centre: across %",
                                           elem_id="across")
                        down = gr.Slider(0, 100, value=WHOLE[2], step=1, label="Region centre: down %",
                                         elem_id="down")
                    gr.Markdown("Zoom in and move the region to choose what the model sees. To **inpaint**, "
                                "paint over pixels with the brush (tools on the left of the picture).",
                                elem_id="editor-help")
                with gr.Column(scale=4):
                    view = gr.Image(label="What the model sees", format="png", interactive=False, height=400,
                                    elem_id="view", elem_classes="pixels")
                    gr.Markdown("The chosen square (at zoom 1, the centre of the picture) at the model's "
                                "resolution, in its palette of colours; pixels painted for inpainting are tinted "
                                "magenta.", elem_id="view-help")
            with gr.Row():
                n_samples = gr.Slider(1, 8, value=4, step=1, label="Samples", elem_id="samples")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (1 = as trained)",
                                        elem_id="temperature")
                top_k = gr.Slider(0, 64, value=0, step=1, label="Top-k (0 = all colours)", elem_id="top-k")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (same seed, same guesses)",
                                 elem_id="seed")
            with gr.Tabs():
                with gr.Tab("Complete", id="complete"):
                    with gr.Row(equal_height=True):
                        keep_rows = gr.Slider(0, 8, value=4, step=1, label="Rows to keep (from the top)", scale=3,
                                              elem_id="keep-rows")
                        update = gr.Radio(["every row", "every pixel"], value="every row",
                                          label="Update the picture", scale=2, elem_id="update")
                        complete_btn = gr.Button("Complete", variant="primary", scale=1, elem_id="complete-btn")
                        stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
                    progress = gr.Markdown(elem_id="progress")
                    result = gr.Image(label="Completions", show_label=False, format="png", interactive=False,
                                      elem_id="grid", elem_classes="pixels", buttons=["download", "fullscreen"])
                with gr.Tab("Surprise map", id="surprise"):
                    with gr.Row(equal_height=True):
                        gr.Markdown("How unexpected each pixel of the model's view is to the model: its negative "
                                    "log-likelihood in nats, from dark (this picture's least surprising pixel) "
                                    "to bright (its most surprising).")
                        surprise_btn = gr.Button("Show the surprise map", variant="primary", scale=0, min_width=220,
                                                 elem_id="surprise-btn")
                    surprise_text = gr.Markdown(elem_id="surprise-text")
                    surprise_img = gr.Image(label="Surprise map", show_label=False, format="png", interactive=False,
                                            elem_id="surprise", elem_classes="pixels")
                with gr.Tab("Inpaint", id="inpaint"):
                    with gr.Row(equal_height=True):
                        gr.Markdown("Paint over any pixels of your picture with the brush (the editor's tools are "
                                    "on its left); the model's view tints them. **Fill in** regenerates them from "
                                    "everything else. BERT-objective runs are trained for exactly this; "
                                    "autoregressive runs fill in raster order, seeing only the pixels above and to "
                                    "the left of each one.")
                        inpaint_btn = gr.Button("Fill in", variant="primary", scale=0, min_width=140,
                                                elem_id="inpaint-btn")
                        inpaint_stop = gr.Button("Stop", variant="stop", scale=0, min_width=100,
                                                 elem_id="inpaint-stop")
                    inpaint_progress = gr.Markdown(elem_id="inpaint-progress")
                    inpaint_img = gr.Image(label="Fills", show_label=False, format="png", interactive=False,
                                           elem_id="inpaint-grid", elem_classes="pixels",
                                           buttons=["download", "fullscreen"])

        region = [zoom, across, down]
        picture = [run, editor, chosen, *region]
        shown = [editor, chosen, view, upload_note, *region]
        sampling = [n_samples, temperature, top_k, seed]
        listing = [run, notice, panel]
        choice = [facts, step, gallery, keep_rows]

        refresh.click(actions.refresh, run, listing, api_name="refresh")
        run.change(actions.choose_run, run, choice, api_name="choose_run").then(
            actions.show_view, picture, view, api_name="run_view", api_visibility="private")
        gallery.select(actions.pick_index, None, example_index, api_visibility="private").then(
            actions.use_example, [run, example_index], shown, api_name="use_example")
        upload.upload(actions.upload, [run, upload], shown, api_name="upload")
        # Only the user's own edits (.input, not .change): a picture set by an action comes with its view, and
        # a late .change from that update could overwrite the view of a picture chosen since.
        editor.input(actions.show_view, picture, view, api_name="show_view")  # a brush stroke
        for slider in region:
            slider.input(actions.show_view, picture, view, api_visibility="private", show_progress="hidden",
                         trigger_mode="always_last")
        completing = complete_btn.click(actions.complete,
                                        [run, step, editor, chosen, *region, keep_rows, *sampling, update],
                                        [result, progress], api_name="complete", show_progress="minimal",
                                        show_progress_on=result)
        # Stop cancels the stream; a cancelled event counts as failed, so .failure notes it after the last frame.
        stop_btn.click(None, cancels=[completing])
        completing.failure(functools.partial(_stopped, "generated"), progress, progress, api_visibility="private",
                           show_progress="hidden")
        surprise_btn.click(actions.surprise, [run, step, editor, chosen, *region], [surprise_img, surprise_text],
                           api_name="surprise")
        filling = inpaint_btn.click(actions.inpaint, [run, step, editor, chosen, *region, *sampling],
                                    [inpaint_img, inpaint_progress], api_name="inpaint", show_progress="minimal",
                                    show_progress_on=inpaint_img)
        inpaint_stop.click(None, cancels=[filling])
        filling.failure(functools.partial(_stopped, "filled"), inpaint_progress, inpaint_progress,
                        api_visibility="private", show_progress="hidden")
        # On page load: the current list of runs, then the first run's gallery with its first example ready.
        demo.load(actions.refresh, run, listing, api_name="page_runs", api_visibility="private").then(
            actions.choose_run, run, choice, api_name="page_run", api_visibility="private").then(
            actions.first_example, [run, chosen], shown, api_name="page_example", api_visibility="private")
    demo.queue(default_concurrency_limit=2, max_size=64)  # two users compute at once; the rest wait in line
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **launch_options):
    """Launch the app with its stylesheet and an upload size limit (pass prevent_thread_lock=True in tests)."""
    return demo.launch(server_name=host, server_port=port, css=CSS, max_file_size="64mb", show_error=True,
                       **launch_options)


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
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    demo = build_demo(runs_dir)
    print(f"iGPT demo on http://{args.host}:{args.port} — runs from {runs_dir.resolve()}")
    serve(demo, args.host, args.port)


if __name__ == "__main__":
    main()
