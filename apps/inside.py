"""The demo's "Inside the model" tab: click a pixel of the model's view and see what it is drawn from,
where the model looked, and what each layer would paint.

A thin shell over `igpt_core.explain` (one call per panel) and the drawing in `igpt_core.render`.
`build_tab` is called by apps/demo.py inside its `gr.Tabs()`, with the components the tab reads (the
run and checkpoint pickers, the inputs that choose the picture, the sampling sliders, the page's view
of the model's input) and a function that turns those inputs into (model, palette, ids).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import gradio as gr
import numpy as np

from igpt_core import explain, surprise_map
from igpt_core import parse_pixel
from igpt_core.render import (attention_panel, display_scale, distribution_bars, enlarge, grid,
                              heatmap, layer_strip, mark_pixel)

VIEW_SIDE = 256  # the clickable view is drawn about this many screen pixels wide
SHOWN_COLORS = 8  # colours listed in the distribution (top-k may keep fewer)
HELP = """**Click a pixel** of the model's view (or type its row and column) to see
**(1)** the distribution its colour is drawn from — the palette colours the model finds most likely, reshaped
live by the temperature and top-k sliders above, exactly as sampling would draw from them;
**(2)** where the model looked — the attention of the query that predicts this pixel, one map per layer
(mean over heads), then the heads of one layer; an autoregressive model sees only the pixels above and to
the left (the rest of its attention goes to the start token), a BERT model sees every other pixel;
**(3)** what each layer would paint — every layer's residual stream read out through the final norm and the
head (the "logit lens"), as the most likely colour of every pixel, with the probability of the true colour
of the clicked pixel."""


def chosen_pixel(text: str | None, side: int) -> tuple[int, int] | None:
    """"row, column" counted from 1 at the top left (`images.parse_pixel`) -> 0-based (row, col); empty -> None."""
    return parse_pixel(text, side) if (text or "").strip() else None


def pixel_numbers(model, palette, ids, t: int, temperature, top_k, true_id: int | None = None) -> dict:
    """What pixel t is drawn from, as plain data: `explain.describe` of `explain.next_pixel`, with the
    pixel (row, column from 1), the colours as RGB and the sampling settings."""
    top_k = int(top_k or 0) or None
    probabilities = explain.next_pixel(model, ids, t, temperature=float(temperature), top_k=top_k)
    numbers = explain.describe(probabilities, true_id, k=min(SHOWN_COLORS, top_k or SHOWN_COLORS))
    side = model.config.image_size
    numbers.update(pixel=[t // side + 1, t % side + 1], top_colors=palette.colors[numbers["top_ids"]].tolist(),
                   temperature=float(temperature), top_k=top_k)
    return numbers


def draw_bars(numbers: dict | None) -> np.ndarray | None:
    """`pixel_numbers` as bars, the true colour (if known) outlined."""
    if not numbers:
        return None
    true = numbers.get("true_id")
    top = numbers["top_ids"]
    return distribution_bars(np.array(numbers["top_colors"]), numbers["top_probabilities"],
                             top.index(true) if true in top else None, width=360)


class Inside:
    """The tab's actions. `with model_ids(name, step, *picture) as (model, palette, ids of the view):` pins
    the model in memory while an action runs."""

    def __init__(self, model_ids):
        self.model_ids = model_ids

    @contextlib.contextmanager
    def _focus(self, pixel_text, name, step, picture):
        """`with` it: (model, palette, ids, the model's view, the pixel (row, col) 0-based or None, its raster
        index)."""
        with self.model_ids(name, step, *picture) as (model, palette, ids):
            side = model.config.image_size
            pixel = chosen_pixel(pixel_text, side)
            view = palette.decode(ids[None], side)[0]
            yield model, palette, ids, view, pixel, None if pixel is None else pixel[0] * side + pixel[1]

    @staticmethod
    def _scale(side: int) -> int:
        return display_scale(side, VIEW_SIDE)

    def pick(self, evt: gr.SelectData, name, step, *picture) -> str:
        """A click on the view, at evt.index = [x, y] in the drawn image's pixels -> "row, column" (from 1)."""
        with self.model_ids(name, step, *picture) as (model, _, _):
            scale = self._scale(model.config.image_size)
        x, y = evt.index
        return f"{int(y) // scale + 1}, {int(x) // scale + 1}"

    def distribution(self, pixel_text, temperature, top_k, name, step, *picture):
        """(bars of the most likely colours, a line of numbers, the numbers as JSON) for the pixel."""
        with self._focus(pixel_text, name, step, picture) as (model, palette, ids, _, pixel, t):
            if pixel is None:
                return None, "Click a pixel of the model's view.", None
            numbers = pixel_numbers(model, palette, ids, t, temperature, top_k, true_id=int(ids[t]))
        n_colors = model.config.n_colors
        seen = "the pixels before it" if model.config.objective == "ar" else "every other pixel (it is masked)"
        text = (f"Pixel row {pixel[0] + 1}, column {pixel[1] + 1}, given {seen}: its true colour (outlined) has "
                f"**p = {numbers['true_probability']:.3f}**, rank **{numbers['true_rank']}** of {n_colors}; "
                f"entropy **{numbers['entropy']:.2f} nats** (at most log {n_colors} = {math.log(n_colors):.2f}). "
                f"Temperature {numbers['temperature']:g}"
                + (f", top-{numbers['top_k']}." if numbers["top_k"] else ", all colours."))
        return draw_bars(numbers), text, numbers

    def look(self, pixel_text, layer, name, step, *picture):
        """(the view with the pixel marked, attention per layer, heads of `layer`, the layer strip, its caption)."""
        with self._focus(pixel_text, name, step, picture) as (model, palette, ids, view, pixel, t):
            scale = self._scale(len(view))
            if pixel is None:
                return enlarge(view, scale), None, None, None, ""
            maps = explain.attention_maps(model, ids, t)
            labels = [f"layer {i + 1}" + ("" if maps.sos is None else f" (start token {float(maps.sos[i].mean()):.0%})")
                      for i in range(model.config.n_layer)]
            layers = attention_panel(view, maps.pixels.mean(1).numpy(), *pixel, labels)
            lens = explain.layer_predictions(model, ids)
            true_p = lens[:, t, int(ids[t])].exp().tolist()
            strip = layer_strip(palette.decode(lens.argmax(-1).numpy(), len(view)), true_p, *pixel)
            best = int(np.argmax(true_p))
            most = "the embeddings" if best == 0 else f"layer {best}"
            caption = (f"The true colour of the clicked pixel gets p = {true_p[0]:.2f} from the embeddings alone and "
                       f"{true_p[-1]:.2f} at the output; the most from {most}.")
            return (mark_pixel(enlarge(view, scale), *pixel, scale), layers, self._heads(view, maps, pixel, layer),
                    strip, caption)

    @staticmethod
    def _heads(view, maps: explain.Attention, pixel, layer) -> np.ndarray:
        layer = int(np.clip(int(layer or 1), 1, len(maps.pixels)))
        heads = maps.pixels[layer - 1].numpy()
        return attention_panel(view, heads, *pixel, [f"layer {layer}, head {h + 1}" for h in range(len(heads))])

    def heads(self, pixel_text, layer, name, step, *picture):
        """The attention of every head of one layer (counted from 1) for the pixel."""
        with self._focus(pixel_text, name, step, picture) as (model, _, ids, view, pixel, t):
            return None if pixel is None else self._heads(view, explain.attention_maps(model, ids, t), pixel, layer)

    def layer_slider(self, name, step, *picture):
        """The heads' layer picker for this model's depth, at its last layer."""
        with self.model_ids(name, step, *picture) as (model, _, _):
            n = model.config.n_layer
            return gr.Slider(minimum=1, maximum=n, value=n, step=1)

    def uncertainty(self, name, step, *picture):
        """The entropy of every pixel's distribution beside its surprise, over the model's view."""
        with self._focus(None, name, step, picture) as (model, palette, ids, view, _, _):
            entropy = explain.entropy_map(model, ids)
            nll = surprise_map(model, ids)
            most = math.log(model.config.n_colors)  # both on one fixed scale: 0 .. log(n_colors) nats
            picture = grid([[view, heatmap(entropy, vmax=most), heatmap(nll, vmax=most)]],
                           labels=["model's view", "uncertainty (entropy)", "surprise (-log p of the truth)"],
                           pixel=self._scale(len(view)))
            text = (f"Mean uncertainty **{entropy.mean():.2f} nats**, mean surprise **{nll.mean():.2f} nats** "
                    f"per pixel, both from dark (0) to bright (log {model.config.n_colors} = {most:.2f} nats, no "
                    f"idea). Uncertain and surprised = a guess that went wrong; certain and surprised = a confident "
                    f"mistake.")
            return picture, text


def build_tab(model_ids, choice: list, picture: list, sampling: list, user_errors) -> None:
    """The tab's components and events, built inside the caller's `gr.Tabs()`.

    choice: [run, step] pickers; picture: the inputs `model_ids` reads after them; sampling:
    [temperature, top_k] sliders; user_errors: the page's decorator that shows an IgptError as a
    message. The tab redraws when it is opened and when a pixel is chosen (not on every change of the
    picture elsewhere on the page, which would queue work behind the other tabs' events).
    """
    inside = Inside(model_ids)
    actions = SimpleNamespace(**{name: user_errors(getattr(inside, name)) for name in
                                 ("pick", "distribution", "look", "heads", "layer_slider", "uncertainty")})
    context = [*choice, *picture]
    with gr.Tab("Inside the model", id="inside") as tab:
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column(scale=2):
                clickable = gr.Image(label="The model's view — click a pixel", format="png", interactive=False,
                                     height=300, elem_id="inside-view", elem_classes="pixels")
                pixel = gr.Textbox(label="Pixel: row, column (from 1 at the top left)", elem_id="inside-pixel")
            with gr.Column(scale=3):
                bars = gr.Image(label="Next-colour distribution", format="png", interactive=False,
                                elem_id="inside-distribution")
                numbers_text = gr.Markdown(elem_id="inside-numbers")
                with gr.Accordion("The numbers (JSON)", open=False):
                    numbers = gr.JSON(elem_id="inside-json")
        gr.Markdown("**Where it looked**: the attention of each layer, mean over its heads (brighter = more weight; "
                    "each map scaled to its own maximum)")
        layers = gr.Image(show_label=False, format="png", interactive=False, elem_id="inside-attention",
                          elem_classes="pixels")
        layer = gr.Slider(1, 2, value=2, step=1, label="Heads of layer", elem_id="inside-layer")
        heads = gr.Image(show_label=False, format="png", interactive=False, elem_id="inside-heads", elem_classes="pixels")
        gr.Markdown("**What each layer would paint** (the logit lens): the most likely colour of every pixel read out "
                    "after the embeddings and after each block, with the probability of the clicked pixel's true colour")
        strip = gr.Image(show_label=False, format="png", interactive=False, elem_id="inside-strip", elem_classes="pixels")
        strip_text = gr.Markdown(elem_id="inside-strip-text")
        with gr.Row(equal_height=True):
            gr.Markdown("Where the model is unsure: the entropy of every pixel's distribution, beside the surprise map.")
            uncertainty_btn = gr.Button("Show the uncertainty map", variant="primary", scale=0, min_width=240,
                                        elem_id="inside-uncertainty-btn")
        uncertainty_text = gr.Markdown(elem_id="inside-uncertainty-text")
        uncertainty = gr.Image(show_label=False, format="png", interactive=False, elem_id="inside-uncertainty",
                               elem_classes="pixels")

    distribute = dict(fn=actions.distribution, inputs=[pixel, *sampling, *context], outputs=[bars, numbers_text, numbers],
                      show_progress="hidden")
    look = dict(fn=actions.look, inputs=[pixel, layer, *context], outputs=[clickable, layers, heads, strip, strip_text],
                show_progress="hidden")
    clickable.select(actions.pick, context, pixel, api_visibility="private")  # sets the pixel: its .change draws
    pixel.change(**distribute, api_name="inside_distribution", trigger_mode="always_last").then(
        **look, api_name="inside_look")
    tab.select(actions.layer_slider, context, layer, api_visibility="private", show_progress="hidden").then(
        **distribute, api_visibility="private").then(**look, api_visibility="private")
    for slider in sampling:  # the bars follow the sampling sliders live
        slider.change(**distribute, api_visibility="private", trigger_mode="always_last")
    layer.release(actions.heads, [pixel, layer, *context], heads, api_name="inside_heads", show_progress="hidden")
    uncertainty_btn.click(actions.uncertainty, context, [uncertainty, uncertainty_text], api_name="inside_uncertainty")


def watched(numbers: dict | None):
    """The Complete tab's "what the next pixel is drawn from": (bars, one line), or nothing yet."""
    if not numbers:
        return None, ""
    row, col = numbers["pixel"]
    settings = f"temperature {numbers['temperature']:g}" + (f", top-{numbers['top_k']}" if numbers["top_k"] else "")
    return draw_bars(numbers), (f"Sample 1 draws row {row}, column {col} from these colours: entropy "
                                f"**{numbers['entropy']:.2f} nats**, {settings}.")
