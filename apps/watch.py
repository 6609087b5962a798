"""The demo's "Watch it learn" tab: the same square completed by every checkpoint of a run, with the same
seed, side by side, and what one clicked pixel is drawn from at each checkpoint; a Play button steps
through the checkpoints.

A thin shell over `sample.complete_each` and `explain.next_pixel_each` (one library call per action)
and the drawing in `igpt_core.render`. What was computed is kept in the user's `gr.State`, so that
moving the checkpoint slider, or playing, only shows pictures and never runs a model again.
`build_tab` is called by apps/demo.py inside its `gr.Tabs()` with the page's actions (`Demo`: `run`,
`models`, `prepare`) and the components the tab reads; `follow_run` resets the tab when the model changes.
"""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np

from igpt_core import IgptError, bits_per_token, explain
from igpt_core.render import caption, display_scale, distribution_bars, enlarge, grid, mark_pixel, stack
from igpt_core import complete_each

if __package__:  # imported as the package igpt_apps
    from .demo_models import user_errors
    from .inside import SHOWN_COLORS, chosen_pixel
else:  # run by path (python apps/demo.py): this folder is on sys.path
    from demo_models import user_errors
    from inside import SHOWN_COLORS, chosen_pixel

PLAY_SECONDS = 1.0  # how long Play shows each checkpoint
VIEW_SIDE = 256  # the clickable view is drawn about this many screen pixels wide
PANEL_SIDE = 96  # each sample of a checkpoint's panel is drawn about this wide
BARS_WIDTH = 260
BARS_PER_ROW = 4  # checkpoints per row in the picture of every checkpoint's distribution
HELP = """**Watch it learn.** The square chosen above is completed by **every checkpoint** of the chosen run, with
the same seed: every checkpoint draws from the same random numbers, so where two panels differ, training made
the difference. Each panel is labelled with its training step and, where the run recorded it, its validation
loss in bits per palette token (a token is a whole pixel; the palette is lossy, so this is not the bits/dim
of models on raw pixels). **Click a pixel** of the model's view to see what it is drawn from at each checkpoint, given the true
pixels before it (AR) or every other pixel (BERT), its true colour outlined. **Play** steps through the
checkpoints; the slider picks one."""


def checkpoint_models(cache, run, steps):
    """(step, model) of each checkpoint in `steps`, taken from the page's shared model cache only when
    asked for: the one place this tab gets models, each pinned in memory while the caller uses it."""
    for step in steps:
        with cache.lease(run, step) as (model, _, step):  # pinned while the caller works with it
            yield step, model


def checkpoint_label(step: int, val_loss: float | None) -> str:
    """"step 262000 · val 3.01 bits/token", or just the step when the run has no validation loss there."""
    return f"step {step}" + ("" if val_loss is None else f" · val {bits_per_token(val_loss):.2f} bits/token")


def checkpoint_slider(n_checkpoints: int, index: int) -> gr.Slider:
    """The checkpoint slider over 1..n_checkpoints at `index` (a Gradio slider needs two ends: a run with
    a single checkpoint gets 1..2, held still)."""
    return gr.Slider(minimum=1, maximum=max(n_checkpoints, 2), value=index, interactive=n_checkpoints > 1)


def fresh(name: str, picture: str = "") -> dict:
    """What the tab has computed for one run and picture: by step, its completion panel and its pixel's
    distribution. `picture` tells the model's views apart (a digest of their ids)."""
    return {"run": name, "picture": picture, "steps": [], "labels": {}, "panels": {}, "bars": {}, "texts": {}}


class Watch:
    """The tab's actions over the page's actions (`Demo`): `run`, `models` (the shared cache), `prepare`."""

    def __init__(self, page):
        self.page = page

    def _subject(self, name, picture):
        """(run, its checkpoints, palette, side, ids of the model's view, the view) of the chosen square."""
        run = self.page.run(name)
        steps = run.checkpoints()
        if not steps:
            raise IgptError(f"run {run.name!r} has no checkpoints yet: let training write one, then Refresh models")
        palette, side = self.page.models.palette(run), run.model_config.image_size
        _, ids, view, _ = self.page.prepare(palette, side, *picture)
        return run, steps, palette, side, ids, view

    @staticmethod
    def _state(name, steps, ids, state, val_losses) -> dict:
        """The user's state if it is of this run, its checkpoints and this picture; else a fresh one."""
        picture = hashlib.sha1(np.asarray(ids).tobytes()).hexdigest()
        same = state and (state["run"], state["picture"], state["steps"]) == (name, picture, steps)
        state = state if same else fresh(name, picture)
        state["steps"] = steps
        state["labels"] = {step: checkpoint_label(step, val_losses.get(step)) for step in steps}
        return state

    def complete(self, name, keep_rows, n_samples, temperature, top_k, seed, state, *picture):
        """Complete the square with every checkpoint, streamed one checkpoint at a time:
        (panels with their labels, status line, state, slider, stage text, stage panel, stage bars)."""
        run, steps, palette, side, ids, _ = self._subject(name, picture)
        state = self._state(name, steps, ids, state, run.val_losses())
        state["panels"] = {}
        scale = display_scale(side, PANEL_SIDE)
        done = []
        models = checkpoint_models(self.page.models, run, steps)
        for step, out in complete_each(models, ids, int(keep_rows), int(n_samples), seed=int(seed or 0),
                                       temperature=float(temperature), top_k=int(top_k or 0) or None):
            samples = list(palette.decode(out, side))
            state["panels"][step] = grid([samples[i : i + 2] for i in range(0, len(samples), 2)], pixel=scale)
            done.append(step)
            status = (f"Completed by {len(done)} of {len(steps)} checkpoints (seed {int(seed or 0)}, "
                      f"{int(keep_rows)} rows kept)" + (": done." if len(done) == len(steps) else "…"))
            index = steps.index(step) + 1
            yield self.gallery(state), status, state, checkpoint_slider(len(steps), index), *self.show(index, state)

    def distribution(self, pixel_text, temperature, top_k, name, index, state, *picture):
        """What the clicked pixel is drawn from at every checkpoint: (view with the pixel marked, every
        checkpoint's bars in one picture, state, slider, stage text, stage panel, stage bars)."""
        run, steps, palette, side, ids, view = self._subject(name, picture)
        scale = display_scale(side, VIEW_SIDE)
        pixel = chosen_pixel(pixel_text, side)
        if pixel is None:
            return enlarge(view, scale), None, state, *(gr.skip(),) * 5
        state = self._state(name, steps, ids, state, run.val_losses())
        t, true_id, top_k = pixel[0] * side + pixel[1], int(ids[pixel[0] * side + pixel[1]]), int(top_k or 0) or None
        cells = []
        models = checkpoint_models(self.page.models, run, steps)
        for step, probabilities in explain.next_pixel_each(models, ids, t, float(temperature), top_k):
            numbers = explain.describe(probabilities, true_id, k=min(SHOWN_COLORS, top_k or SHOWN_COLORS))
            top = numbers["top_ids"]
            bars = distribution_bars(palette.colors[top], numbers["top_probabilities"],
                                     top.index(true_id) if true_id in top else None, width=BARS_WIDTH)
            state["bars"][step] = bars
            state["texts"][step] = (f"row {pixel[0] + 1}, column {pixel[1] + 1}: the true colour has "
                                    f"p = {numbers['true_probability']:.3f} (rank {numbers['true_rank']}), "
                                    f"entropy {numbers['entropy']:.2f} nats")
            cells.append(stack([caption(f"{state['labels'][step]} · p = {numbers['true_probability']:.2f}",
                                        BARS_WIDTH), bars], pad=2))
        rows = [stack(cells[i : i + BARS_PER_ROW], across=True) for i in range(0, len(cells), BARS_PER_ROW)]
        marked = mark_pixel(enlarge(view, scale), *pixel, scale)
        index = min(max(int(index or 1), 1), len(steps))  # the checkpoint shown stays where the slider is
        return (marked, stack(rows, pad=0), state, self.gallery(state), checkpoint_slider(len(steps), index),
                *self.show(index, state))

    @staticmethod
    def gallery(state) -> list:
        """The panels completed so far, each with its checkpoint's label."""
        return [(state["panels"][step], state["labels"][step]) for step in state["steps"] if step in state["panels"]]

    @staticmethod
    def show(index, state):
        """Checkpoint `index` (from 1) of what was computed: (its line, its panel, its pixel's bars)."""
        steps = (state or {}).get("steps") or []
        if not steps:
            return "", None, None
        index = min(max(int(index or 1), 1), len(steps))
        step = steps[index - 1]
        text = f"**Checkpoint {index} of {len(steps)}: {state['labels'][step]}**"
        if step in state["texts"]:
            text += f"  \n{state['texts'][step]}"
        return text, state["panels"].get(step), state["bars"].get(step)

    def play(self, index, state):
        """Step the slider through the checkpoints, one every PLAY_SECONDS (from the first, if at the last)."""
        steps = (state or {}).get("steps") or []
        if not steps:
            raise IgptError("press Complete with every checkpoint, or click a pixel of the view, first: "
                            "Play shows what they computed")
        start = 1 if int(index or 1) >= len(steps) else int(index or 1)
        for i in range(start, len(steps) + 1):
            if i > start:
                time.sleep(PLAY_SECONDS)
            yield gr.Slider(value=i), *self.show(i, state)

    def choose_run(self, name):
        """Another model was chosen: forget what was computed; the rows slider fits its size."""
        try:
            side = self.page.run(name).model_config.image_size
        except IgptError:
            return (gr.skip(),) * 10
        return (fresh(name or ""), [], "", gr.Slider(minimum=0, maximum=side, value=side // 2),
                checkpoint_slider(1, 1), "", None, None, None, None)

    def view(self, name, *picture):
        """The model's view of the chosen square, to click a pixel on; nothing while there is none (no
        model or picture chosen yet: the tab's help says what to do)."""
        try:
            _, _, _, side, _, view = self._subject(name, picture)
        except IgptError:
            return None
        return enlarge(view, display_scale(side, VIEW_SIDE))

    def pick(self, evt: gr.SelectData, name) -> str:
        """A click at evt.index = [x, y] of the drawn view -> "row, column" (from 1)."""
        scale = display_scale(self.page.run(name).model_config.image_size, VIEW_SIDE)
        x, y = evt.index
        return f"{int(y) // scale + 1}, {int(x) // scale + 1}"


def stopped(status: str | None):
    """The status line after Stop (or an error) while completing: says how far it got."""
    if not status or not status.endswith("…"):
        return gr.skip()
    return status.removesuffix("…") + ": stopped; the panels show the checkpoints done so far."


# -- the tab ----------------------------------------------------------------------------------------------


def _layout() -> SimpleNamespace:
    gr.Markdown(HELP)
    with gr.Row(equal_height=True):
        keep_rows = gr.Slider(0, 8, value=4, step=1, label="Rows to keep (from the top)", scale=3,
                              elem_id="watch-keep-rows")
        button = gr.Button("Complete with every checkpoint", variant="primary", scale=2, elem_id="watch-btn")
    status = gr.Markdown(elem_id="watch-status")
    panels = gr.Gallery(label="Every checkpoint, same seed (samples of one checkpoint in each panel)",
                        columns=6, height=240, object_fit="contain", allow_preview=False, format="png",
                        elem_id="watch-panels", elem_classes="pixels")
    with gr.Row(equal_height=True):
        checkpoint = gr.Slider(1, 2, value=1, step=1, label="Checkpoint", scale=4, elem_id="watch-checkpoint")
        play = gr.Button("▶ Play", scale=1, min_width=100, elem_id="watch-play")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=100, elem_id="watch-stop")
    stage_text = gr.Markdown(elem_id="watch-stage-text")
    with gr.Row():
        stage_panel = gr.Image(label="This checkpoint's completions", format="png", interactive=False, height=260,
                               elem_id="watch-stage", elem_classes="pixels")
        stage_bars = gr.Image(label="This checkpoint's next-colour distribution", format="png", interactive=False,
                              height=260, elem_id="watch-stage-bars")
        with gr.Column():
            view = gr.Image(label="The model's view — click a pixel", format="png", interactive=False, height=260,
                            elem_id="watch-view", elem_classes="pixels")
            pixel = gr.Textbox(label="Pixel: row, column (from 1 at the top left)", elem_id="watch-pixel")
    gr.Markdown("**The clicked pixel's distribution at every checkpoint** (p = the probability of its true colour)")
    every = gr.Image(show_label=False, format="png", interactive=False, elem_id="watch-distributions")
    state = gr.State(None)  # what was computed, by step: panels, bars, labels (`fresh`)
    return SimpleNamespace(keep_rows=keep_rows, button=button, status=status, panels=panels, checkpoint=checkpoint,
                           play=play, stop=stop, stage_text=stage_text, stage_panel=stage_panel,
                           stage_bars=stage_bars, view=view, pixel=pixel, every=every, state=state)


def build_tab(page, run, picture: list, sampling: list) -> SimpleNamespace:
    """The tab, wired. `page`: the page's actions; `run`: the model picker; `picture`: the inputs that
    choose the square (paint editor, picture state, square); `sampling`: samples, temperature, top-k, seed."""
    watch = Watch(page)
    act = SimpleNamespace(**{name: user_errors(getattr(watch, name))
                             for name in ("complete", "distribution", "play", "pick")})
    n_samples, temperature, top_k, seed = sampling
    with gr.Tab("Watch it learn", id="watch") as tab:
        ui = _layout()
    stage = [ui.checkpoint, ui.stage_text, ui.stage_panel, ui.stage_bars]
    completing = ui.button.click(act.complete, [run, ui.keep_rows, n_samples, temperature, top_k, seed, ui.state,
                                                *picture],
                                 [ui.panels, ui.status, ui.state, *stage], api_name="watch_complete",
                                 show_progress="minimal", show_progress_on=ui.panels)
    distribute = dict(fn=act.distribution,
                      inputs=[ui.pixel, temperature, top_k, run, ui.checkpoint, ui.state, *picture],
                      outputs=[ui.view, ui.every, ui.state, ui.panels, *stage], show_progress="hidden")
    ui.pixel.change(**distribute, api_name="watch_distribution", trigger_mode="always_last")
    ui.view.select(act.pick, run, ui.pixel, api_visibility="private")  # sets the pixel: its .change computes
    tab.select(watch.view, [run, *picture], ui.view, api_visibility="private", show_progress="hidden")
    ui.checkpoint.input(watch.show, [ui.checkpoint, ui.state], stage[1:], api_name="watch_show",
                        show_progress="hidden", trigger_mode="always_last")
    playing = ui.play.click(act.play, [ui.checkpoint, ui.state], stage, api_name="watch_play", show_progress="hidden")
    ui.stop.click(None, cancels=[completing, playing])
    completing.failure(stopped, ui.status, ui.status, api_visibility="private", show_progress="hidden")
    ui.watch = watch
    return ui


def follow_run(chosen, run, ui: SimpleNamespace) -> None:
    """After the page's model picker has chosen (and, for OpenAI's, imported) a model: clear the tab."""
    chosen.success(ui.watch.choose_run, run, [ui.state, ui.panels, ui.status, ui.keep_rows, ui.checkpoint,
                                              ui.stage_text, ui.stage_panel, ui.stage_bars, ui.view, ui.every],
                   api_visibility="private")
