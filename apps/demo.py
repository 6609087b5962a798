"""The browser completion demo: pick a model and a picture, drag a square on it, watch iGPT finish it.

    python apps/demo.py [--port 7860] [--host 127.0.0.1] [--runs-dir DIR] [--model-memory SIZE]

(`igpt demo` and `make demo` run exactly this.) A thin shell over igpt_core: the square the model sees
is `images.crop` (dragged out with `images.square_from_drag`) seen through `Palette.view`; every action
is one library call — `complete_stream`, `inpaint_stream` or `surprise_map` — plus the drawing in
`igpt_core.render`. OpenAI's released models are listed beside the local runs and imported on first use
(`hf.import_once`). Nothing happens at import: `build_demo(runs_dir)` makes the app, `main()` serves it.
Per-user state lives in `gr.State`; the only shared state is the read-only caches of one app.

This file lays out the page and wires its events; the actions live beside it: demo_models.py (the
model picker), demo_picture.py (the picture and its square), demo_complete.py (complete, inpaint,
surprise), inside.py (the "Inside the model" tab) and watch.py ("Watch it learn": every
checkpoint of a run).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import signal
import sys
from pathlib import Path
import tempfile
from types import SimpleNamespace

import gradio as gr

from igpt_core import IgptError
from igpt_core import return_freed_memory, runs_root

if __package__:  # imported as the package igpt_apps (installed, or by the tests)
    from . import inside, watch
    from .demo_complete import Completion, stopped
    from .demo_models import Models, user_errors
    from .demo_picture import Pictures
else:  # run by path (python apps/demo.py, as `igpt demo` does)
    # Its folder goes on sys.path: Streamlit and Python put it there, but a worker process that re-runs this
    # file as its __main__ (multiprocessing's forkserver does, e.g. for the probe's fits) may not have it.
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import inside
    import watch
    from demo_complete import Completion, stopped
    from demo_models import Models, user_errors
    from demo_picture import Pictures

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


class Demo(Models, Pictures, Completion):
    """The actions behind the page: choosing a model (`Models`), a picture and its square (`Pictures`),
    and running the model on it (`Completion`). Holds the read-only caches of one app; everything
    per-user comes in as arguments."""


# -- the page: its parts, top to bottom ---------------------------------------------------------------


def _model_row(picker) -> SimpleNamespace:
    with gr.Row(equal_height=True):
        # Custom values allowed: API clients may name a run (or step) made after the page was built;
        # the library's own message answers a name or step that does not exist.
        run = gr.Dropdown(choices=picker.choices, value=picker.value, label="Model: a local run (dataset · "
                          "objective · preset · resolution · training steps · validation bits/token) or one of "
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


def _wire_choices(demo: gr.Blocks, actions: Demo, ui: SimpleNamespace):
    """The model picker, the gallery, uploads and the square: each keeps the model's view up to date.
    Returns the event of a model chosen, which the "Watch it learn" tab follows."""
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
    return chosen


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
    tab.drawn_from.change(inside.watched, tab.drawn_from, [tab.drawing, tab.drawing_text],
                          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    # A cancelled event counts as failed, so .failure notes it after the last frame.
    tab.stop.click(None, cancels=[completing])
    completing.failure(functools.partial(stopped, "generated"), tab.progress, [tab.progress, tab.result],
                       api_visibility="private", show_progress="hidden")
    ui.surprise.button.click(actions.surprise, picture, [ui.surprise.result, ui.surprise.text], api_name="surprise")
    tab = ui.inpaint
    filling = tab.button.click(actions.inpaint, [*picture, *sampling], [tab.result, tab.progress], api_name="inpaint",
                               show_progress="minimal", show_progress_on=tab.result)
    tab.stop.click(None, cancels=[filling])
    filling.failure(functools.partial(stopped, "filled"), tab.progress, [tab.progress, tab.result],
                    api_visibility="private", show_progress="hidden")


def build_demo(runs_dir=None, model_memory: int | None = None) -> gr.Blocks:
    """The Gradio app over the runs in `runs_dir` (default: $IGPT_RUNS_DIR or ./runs), keeping at most
    `model_memory` bytes of models loaded (default: the library's budget)."""
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
                inside.build_tab(actions.model_and_ids, [ui.run, ui.step],
                                             [ui.inpaint.paint, ui.chosen, ui.pick.square],
                                             [ui.sampling.temperature, ui.sampling.top_k], user_errors)
                ui.watch = watch.build_tab(actions, ui.run, [ui.inpaint.paint, ui.chosen, ui.pick.square],
                                           [ui.sampling.n_samples, ui.sampling.temperature, ui.sampling.top_k,
                                            ui.sampling.seed])
            ui.paint = ui.inpaint.paint
        watch.follow_run(_wire_choices(demo, actions, ui), ui.run, ui.watch)
        _wire_actions(actions, ui)
    demo.queue(default_concurrency_limit=2, max_size=64)  # two users compute at once; the rest wait in line
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **launch_options):
    """Launch the app with its stylesheet, drag script and an upload size limit (prevent_thread_lock=True in tests)."""
    return demo.launch(server_name=host, server_port=port, css=CSS, js=DRAG_JS, max_file_size="64mb",
                       show_error=True, **launch_options)


def model_memory_bytes(text: str | None) -> int | None:
    """--model-memory as bytes, read by the library's size parser; None: the library's default."""
    if text is None:
        return None
    from igpt_core import parse_memory

    return parse_memory(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Open the iGPT completion demo in the browser.")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--runs-dir", default=None, help="folder holding the runs (default: $IGPT_RUNS_DIR or ./runs)")
    parser.add_argument("--model-memory", metavar="SIZE",
                        help="memory for loaded models: a size (4GB) or a fraction of RAM (0.5); default: the library's")
    args = parser.parse_args(argv)
    try:
        model_memory = model_memory_bytes(args.model_memory)
    except IgptError as err:  # one line, exit 2, before anything starts
        parser.error(str(err))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not os.environ.get("GRADIO_TEMP_DIR"):  # uploads and rendered images go here, and nowhere else
        temp = tempfile.mkdtemp(prefix="igpt-demo-")
        os.environ["GRADIO_TEMP_DIR"] = temp
        atexit.register(shutil.rmtree, temp, ignore_errors=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a plain `kill` also removes it
    runs_dir = runs_root(args.runs_dir)
    return_freed_memory()  # a server: released models and finished requests' decoders give their memory back
    demo = build_demo(runs_dir, model_memory)
    print(f"iGPT demo on http://{args.host}:{args.port} — runs from {runs_dir.resolve()}")
    serve(demo, args.host, args.port)


if __name__ == "__main__":
    main()
