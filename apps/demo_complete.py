"""The demo's Complete, Inpaint and Surprise actions: one library call each (`complete_stream`,
`inpaint_stream`, `surprise_map`), drawn as the paper's figures while the stream goes."""

from __future__ import annotations

import contextlib
import time

import gradio as gr
import numpy as np

from igpt_core import IgptError, complete_stream, inpaint_stream, surprise_map
from igpt_core import bits_per_token, likelihood_kind
from igpt_core.render import completion_grid, display_scale, hide_rows, surprise_picture

if __package__:  # imported as the package igpt_apps
    from . import inside
    from .demo_models import user_errors
else:  # run by path (python apps/demo.py): this folder is on sys.path
    import inside
    from demo_models import user_errors

PENDING = (128, 128, 128)  # pixels not generated yet: the grey of render.hide_rows


def stopped(verb: str, progress: str | None):
    """The progress line after Stop (or an error): unchanged unless a stream was under way. The grid
    is an output too, left as it is: so that this event, not the cancelled one, sets its status
    (a cancel that raced the stream's last frame left the grid marked "Error")."""
    if not progress or not progress.startswith(("Generating", "Filling")):
        return gr.skip(), gr.skip()
    where = progress.split(" (")[0].replace("Generating ", "").replace("Filling — ", "")
    return f"Stopped at {where}: the grid shows the pixels {verb} so far.", gr.skip()


class Completion:
    """The actions that run the model (a mixin of the page's Demo: uses its `using` and `prepare`)."""

    @user_errors
    def complete(self, name, step, editor, picture, square, keep_rows, n_samples, temperature, top_k, seed, update,
                 watch=False, int8=False):
        """Stream completions from the top `keep_rows` rows: (grid, progress text, what sample 1's next
        pixel is drawn from if `watch` and the model is AR, else None) at least once per row."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            keep_rows = int(keep_rows)
            original, ids, view, _ = self.prepare(palette, size, editor, picture, square)
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
                drawn_from["numbers"] = inside.pixel_numbers(model, palette, out[0], start + filled,
                                                                         temperature, top_k)
            yield out, filled, done

    @user_errors
    def inpaint(self, name, step, editor, picture, square, n_samples, temperature, top_k, seed):
        """Stream fills of the pixels painted in the editor: (grid, progress text)."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            original, ids, view, hidden = self.prepare(palette, size, editor, picture, square)
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
            _, ids, _, _ = self.prepare(palette, model.config.image_size, editor, picture, *region)
            yield model, palette, ids

    @user_errors
    def surprise(self, name, step, editor, picture, square):
        """Per-pixel surprise (negative log-likelihood) of the model's view, as a heat map."""
        with self.using(name, step) as (model, palette, step):
            size = model.config.image_size
            _, ids, view, _ = self.prepare(palette, size, editor, picture, square)
            nll = surprise_map(model, ids)
        worst = np.unravel_index(int(nll.argmax()), nll.shape)
        picture = surprise_picture(view, nll, pixel=display_scale(size, 256))
        text = (f"Mean surprise **{nll.mean():.3f} nats per pixel** ({bits_per_token(nll.mean()):.3f} bits/token; "
                f"the palette is lossy, so not comparable with bits/dim on raw pixels), "
                f"{likelihood_kind(model.config)} likelihood. "
                f"Bright = the model did not expect that colour there; the most surprising pixel is at row "
                f"{worst[0] + 1}, column {worst[1] + 1} ({nll.max():.2f} nats).")
        return picture, text
