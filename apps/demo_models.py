"""The demo's models: local runs and OpenAI's released models in one picker, loaded once, each with a
gallery of pictures to start from (its dataset's validation images, or the built-in photos)."""

from __future__ import annotations

import functools
import inspect
import threading
from pathlib import Path

import gradio as gr
import numpy as np

from igpt_core import IgptError, load_dataset, open_run
from igpt_core import builtin_photos
from igpt_core import OPENAI_MODELS, find_imported, hub_offline, import_once, imported_label, in_hub_cache
from igpt_core import crop, resize
from igpt_core.render import display_scale, enlarge
from igpt_core import ModelCache, scan_runs

N_EXAMPLES = 12  # validation images shown in the gallery
EDITOR_SIDE = 1024  # uploads are shrunk to at most this a side (models see <= 64 pixels a side)
PHOTOS = "photos"  # gallery of the built-in photos: for imported runs, photo runs, or missing data


def user_errors(fn):
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


def _describe(summary: dict) -> str:
    """One line of facts about a run, shown beside its name in the picker. An imported run is named for
    what it is (its "label"), never as an igpt run of 0 steps."""
    name, size = summary["name"], summary.get("resolution")
    if "error" in summary:
        return f"{name} — unreadable: {summary['error']}"
    if summary.get("label"):
        return f"{name} — {summary['label']} · {size}×{size}" + _openai_steps(summary["steps"], " · ")
    bits = summary["best_val_bits_per_token"]
    return (f"{name} — {summary['dataset']} · {str(summary['objective']).upper()} · "
            f"{summary['preset'] or '—'} · {size}×{size} · {summary['steps']} steps · "
            + (f"val {bits:.2f} bits/token" if bits is not None else "no val loss yet"))


def _openai_steps(steps: int, before: str) -> str:
    """An imported run's last step, if it has one: OpenAI's own training steps (its TF checkpoints
    keep them); imports from Hugging Face hold a single checkpoint at step 0, which says nothing."""
    return f"{before}{steps:,} steps of OpenAI's training" if steps else ""


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


class Models:
    """The picker's actions, and the read-only caches of one app: models and palettes by checkpoint file
    (`runs.ModelCache`, bounded by `model_memory` bytes if given), gallery images by dataset."""

    def __init__(self, runs_dir, model_memory: int | None = None):
        self.runs_dir = Path(runs_dir)
        self.models = ModelCache() if model_memory is None else ModelCache(max_bytes=model_memory)
        self._examples: dict[tuple, tuple] = {}
        self._examples_lock = threading.Lock()
        self._import_lock = threading.Lock()  # two users choosing the same OpenAI model import it once

    # -- runs and models --

    def summaries(self) -> list[dict]:
        """Every run's summary; an unreadable one as its name and the library's one-line reason."""
        readable, problems = scan_runs(self.runs_dir)
        rows = [{**run.summary(), "label": imported_label(run)} for run in readable]
        rows += [{"name": name, "error": why} for name, why in problems.items()]
        return sorted(rows, key=lambda row: row["name"])

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

    @user_errors
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
        summary = {**run.summary(), "label": imported_label(run)}
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
        size, bits, steps = summary["resolution"], summary["best_val_bits_per_token"], run.checkpoints()
        pixels = f"{size}×{size} pixels in {summary['colors']} colours"
        if summary["label"]:
            source = str(summary["dataset"]).removeprefix("imported:")
            from_note = "" if source in summary["label"] else f" (from {source})"
            return (f"**{run.name}**: {summary['label']}{from_note}, autoregressive, {pixels}"
                    f"{_openai_steps(summary['steps'], ', ')}.  \nGallery: {origin}.")
        objective = {"ar": "autoregressive (next pixel)", "bert": "BERT (masked pixels)"}.get(summary["objective"],
                                                                                             summary["objective"])
        return (f"**{run.name}**: trained on **{summary['dataset']}**, {objective}, preset {summary['preset'] or '—'}, "
                f"{pixels}, {summary['steps']} training steps"
                + (f", validation {bits:.3f} bits/token" if bits is not None else "")
                + ("" if steps else " — **no checkpoint yet**: let training write one, then Refresh")
                + f".  \nGallery: {origin}.")
