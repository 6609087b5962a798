"""The paper's two probe figures (Chen et al. 2020, §4.1 and Figure 3) for any runs.

    (1) linear-probe accuracy by layer, one line per checkpoint;
    (2) each checkpoint's best-layer accuracy against its validation loss, one line per run (as
        iGPT-S, M and L are in Figure 3: better generative models learn better features).

A view over `probe_run`, not a second probe: the features, their cache (per checkpoint, so a stopped
call resumes at the first checkpoint not cached), the fits and the stored table are the probe's.
This module adds what the figures need besides: a plan with a time estimate measured on a first
batch (`paper_plan`), the validation loss of checkpoints that logged none (imported runs have no
training log), and the files (`make_paper`):

    runs/<run>/paper/<dataset>.csv     one row per (checkpoint, layer): accuracies, C, val loss, best layer
    runs/<run>/paper/<dataset>.png     both figures; figure 2 holds every run of the call
    runs/<run>/paper/val_loss.json     validation losses computed here, keyed by checkpoint and images
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import open_dataset, palette_ids
from ..device import pick_device
from ..errors import IgptError
from ..files import atomic_write, atomic_write_json, atomic_write_text, safe_name
from ..likelihood import score
from ..progress import progress_bar
from ..runs import Run, as_run
from .cache import checkpoint_cache, fingerprint
from .features import extract_features
from .fit import DEFAULT_CS
from .run import ProbeInputs, pick_layers, pick_steps, probe_inputs, probe_run

PAPER_FOLDER = "paper"  # in each run's folder
VAL_IMAGES = 256  # validation images scored per checkpoint when the run logged no validation loss
TIMING_IMAGES = 8  # the first batch the time estimate is measured on
BERT_MASKS = 4  # as `igpt probe`'s default
CSV_COLUMNS = ["run", "dataset", "step", "layer", "val_acc", "test_acc", "C", "val_loss", "best"]
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class RunPlan:
    """What `make_paper` will do for one run."""

    run: Run
    steps: list[int]
    layers: list[int]
    inputs: ProbeInputs
    pending: list[int]  # checkpoints whose features are not all cached
    losses: dict[int, float]  # validation losses already known (logged, or computed by an earlier call)
    loss_source: str  # where the validation losses come from, in words
    loss_ids: np.ndarray | None  # the images to score for missing losses (None: every loss is known)
    loss_key: str  # what identifies loss_ids in val_loss.json
    seconds_per_image: float | None = None  # measured feature time of one image (None: nothing to compute)

    @property
    def loss_todo(self) -> list[int]:
        return [step for step in self.steps if step not in self.losses]

    def seconds(self) -> float:
        """Estimated time of the feature extraction and val-loss scoring still to do (fits excluded)."""
        if not self.seconds_per_image:
            return 0.0
        n_images = sum(len(ids) for ids in self.inputs.ids.values())
        n_loss = 0 if self.loss_ids is None else len(self.loss_ids)
        return self.seconds_per_image * (len(self.pending) * n_images + len(self.loss_todo) * n_loss)


@dataclass
class PaperPlan:
    """Every run's plan, and the settings `make_paper` passes on to `probe_run`."""

    dataset: str
    runs: list[RunPlan]
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        """What will be computed (runs × checkpoints × layers × images) and the time estimate, in words."""
        lines = []
        for plan in self.runs:
            n = {split: len(plan.inputs.ids[split]) for split in SPLIT_NAMES}
            lines.append(f"{plan.run.name}: {len(plan.steps)} checkpoints × {len(plan.layers)} layers × "
                         f"{sum(n.values())} images ({', '.join(f'{k} {v}' for k, v in n.items())}); features to "
                         f"extract at {len(plan.pending)} of {len(plan.steps)} checkpoints (the rest are cached); "
                         f"validation loss {plan.loss_source}, {len(plan.loss_todo)} to compute")
            if plan.seconds_per_image:
                lines.append(f"  measured {plan.seconds_per_image:.3g} s per image on a first batch "
                             f"({self.options['device']}, {self.options['precision']})")
        total = sum(plan.seconds() for plan in self.runs)
        lines.append(f"estimate: {format_seconds(total)} for the features and losses on this machine, then the fits"
                     if total else "nothing to extract: every feature and loss is cached; only the fits remain")
        return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    """A duration for people: 42 s, 7.5 min, 3.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def paper_plan(runs, dataset: str | None = None, *, checkpoints="all", layers="all", max_train: int | None = None,
               precision: str = "auto", device: str = "auto", runs_dir=None, data_dir=None,
               loss_dataset: str | None = None, val_images: int = VAL_IMAGES, batch_size: int = 64,
               seed: int = 0) -> PaperPlan:
    """Check the request, load the probe data, and measure a first batch: what `make_paper` will do.

    runs: one or more run names. dataset: the labelled probe dataset (default: the first run's own).
    checkpoints, layers, max_train, precision: as `probe_run`'s. Validation losses come from a run's
    metrics log where it has one for every chosen checkpoint; else they are computed on the first
    `val_images` images of `loss_dataset`'s val split (default: the probe dataset), in fp32.
    """
    names = [runs] if isinstance(runs, (str, Run)) else list(runs)
    if not names:
        raise IgptError("name at least one run")
    if val_images < 1:
        raise IgptError(f"val_images must be at least 1, got {val_images}")
    opened = [as_run(name, runs_dir) for name in names]
    dataset = dataset or opened[0].info.get("dataset")
    if not dataset or str(dataset).startswith("imported:"):
        raise IgptError(f"run {opened[0].name!r} has no dataset of its own (it was imported): "
                        f"name the probe dataset, e.g. --dataset openai:cifar10")
    dev = pick_device(device)
    options = dict(max_train=max_train, device=str(dev), data_dir=data_dir, batch_size=batch_size,
                   seed=seed, precision=precision)
    plans = [_run_plan(run, dataset, checkpoints, layers, loss_dataset or dataset, val_images, options)
             for run in opened]
    for plan in plans:
        if plan.pending or plan.loss_todo:
            plan.seconds_per_image = _time_first_batch(plan, options)
    return PaperPlan(dataset, plans, options)


def _run_plan(run: Run, dataset: str, checkpoints, layers, loss_dataset: str, val_images: int,
              options: dict) -> RunPlan:
    steps, picked = pick_steps(run, checkpoints), pick_layers(run, layers)
    bert_masks = BERT_MASKS if run.model_config.objective == "bert" else 0
    inputs = probe_inputs(run, dataset, options["data_dir"], options["max_train"], options["seed"], bert_masks,
                          DEFAULT_CS, options["precision"])
    pending = []
    for step in steps:
        cache = checkpoint_cache(run, step, dataset, bert_masks, options["seed"], options["precision"])
        for split in SPLIT_NAMES:
            cached, _ = cache.read(split, inputs.hashes[split])
            if any(layer not in cached or len(cached[layer]) != len(inputs.ids[split]) for layer in picked):
                pending.append(step)
                break
    logged = {step: loss for step, loss in run.val_losses().items() if loss is not None and math.isfinite(loss)}
    if all(step in logged for step in steps):
        return RunPlan(run, steps, picked, inputs, pending, {s: logged[s] for s in steps},
                       "from the run's metrics log", None, "")
    ids = _loss_ids(run, loss_dataset, options["data_dir"], val_images)
    key = fingerprint(loss_dataset, ids.tobytes())[:16]
    stored = {row["step"]: row["nats_per_token"] for row in _read_losses(run)
              if row.get("images_key") == key and row.get("checkpoint") == _checkpoint_stamp(run, row["step"])}
    return RunPlan(run, steps, picked, inputs, pending, {s: stored[s] for s in steps if s in stored},
                   f"on {loss_dataset} val ({len(ids)} images, in nats per token)", ids, key)


def _loss_ids(run: Run, dataset: str, data_dir, n: int) -> np.ndarray:
    """The palette ids of the first n images of `dataset`'s val split, as the run reads them."""
    if data_dir is None and dataset == run.info.get("dataset"):
        data_dir = run.info.get("data_dir")
    seed = int((run.info.get("train_config") or {}).get("seed", 0))
    size = run.model_config.image_size
    stream = open_dataset(dataset, "val", data_dir=data_dir, seed=seed, resolution=size)
    return palette_ids(stream, run.palette, size, np.arange(min(n, len(stream))))


def _checkpoint_stamp(run: Run, step: int) -> str | None:
    """What identifies checkpoint `step`'s file (None if the run no longer has it)."""
    path = run.checkpoint_path(step)
    if not path.exists():
        return None
    stat = path.stat()
    return f"size={stat.st_size};mtime={stat.st_mtime_ns}"


def _losses_path(run: Run) -> Path:
    return run.path / PAPER_FOLDER / "val_loss.json"


def _read_losses(run: Run) -> list[dict]:
    """The validation losses computed by earlier calls; an unreadable file counts as empty."""
    try:
        rows = json.loads(_losses_path(run).read_text()).get("rows", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [row for row in rows if isinstance(row, dict) and {"step", "nats_per_token"} <= row.keys()]


def _time_first_batch(plan: RunPlan, options: dict) -> float:
    """Seconds per image of feature extraction, measured on a first batch of training images (after a
    one-image warm-up, which pays for the first call's one-time costs)."""
    step = (plan.pending or plan.loss_todo)[0]
    model = plan.run.load(step, device=options["device"])[0]
    ids = plan.inputs.ids["train"][:TIMING_IMAGES]
    bert_masks = BERT_MASKS if model.config.objective == "bert" else 0
    extract_features(model, ids[:1], plan.layers, bert_masks=bert_masks, precision=options["precision"])
    start = time.perf_counter()
    extract_features(model, ids, plan.layers, bert_masks=bert_masks, precision=options["precision"],
                     batch_size=options["batch_size"])
    return (time.perf_counter() - start) / len(ids)


# -- doing it ---------------------------------------------------------------------------------------------


@dataclass
class PaperResult:
    """What `make_paper` wrote: the CSV rows of each run, the files, and a note (e.g. no PNG drawn)."""

    dataset: str
    rows: dict[str, list[dict]]  # run name -> its CSV rows
    files: list[Path]
    note: str | None = None


def make_paper(plan: PaperPlan, *, progress: bool = True, workers: int | None = None) -> PaperResult:
    """Probe every run of the plan (`probe_run`: cached features are re-used), compute the missing
    validation losses, and write each run's CSV and PNG (see the module's docstring)."""
    options, rows = plan.options, {}
    for run_plan in plan.runs:
        run = run_plan.run
        table = probe_run(run, plan.dataset, checkpoints=run_plan.steps, layers=run_plan.layers,
                          data_dir=options["data_dir"], bert_masks=BERT_MASKS, max_train=options["max_train"],
                          progress=progress, seed=options["seed"], batch_size=options["batch_size"],
                          device=options["device"], workers=workers, precision=options["precision"])
        losses = _validation_losses(run_plan, options, progress)
        rows[run.name] = paper_rows(run.name, plan.dataset, table.rows, run_plan.steps, run_plan.layers, losses)
    files, note = [], None
    for run_plan in plan.runs:
        name, folder = run_plan.run.name, run_plan.run.path / PAPER_FOLDER
        stem = safe_name(plan.dataset, "_") or "dataset"
        atomic_write_text(folder / f"{stem}.csv", rows_to_csv(rows[name]))
        files.append(folder / f"{stem}.csv")
        if draw_paper(folder / f"{stem}.png", name, plan.dataset, rows):
            files.append(folder / f"{stem}.png")
        else:
            note = "no PNG drawn: matplotlib is not installed (pip install matplotlib); the CSVs hold every number"
    return PaperResult(plan.dataset, rows, files, note)


def _validation_losses(plan: RunPlan, options: dict, progress: bool) -> dict[int, float]:
    """Every chosen checkpoint's validation loss: the known ones, and the others scored now (in fp32,
    each stored as soon as it is known, so that a stopped call keeps them)."""
    losses, todo = dict(plan.losses), plan.loss_todo
    if not todo:
        return losses
    ids = torch.from_numpy(plan.loss_ids)
    bar = progress_bar(progress, total=len(todo), desc=f"val loss of {plan.run.name}", unit="ckpt")
    try:
        for step in todo:
            model = plan.run.load(step, device=options["device"])[0]
            losses[step] = float(score(model, ids, batch_size=options["batch_size"])["nats_per_token"])
            _store_loss(plan, step, losses[step])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return losses


def _store_loss(plan: RunPlan, step: int, loss: float) -> None:
    stamp = _checkpoint_stamp(plan.run, step)
    rows = [row for row in _read_losses(plan.run)
            if not (row["step"] == step and row.get("images_key") == plan.loss_key)]
    rows.append({"step": step, "nats_per_token": loss, "images": len(plan.loss_ids), "images_key": plan.loss_key,
                 "checkpoint": stamp, "source": plan.loss_source})
    atomic_write_json(_losses_path(plan.run), {"rows": sorted(rows, key=lambda r: (r["step"], r["images_key"]))})


def paper_rows(run_name: str, dataset: str, table_rows: list[dict], steps: list[int], layers: list[int],
               losses: dict[int, float]) -> list[dict]:
    """The CSV rows of one run: its probe table's rows at these checkpoints and layers, with the
    validation loss and `best` marking each checkpoint's best layer (on validation accuracy, as the
    paper chooses; ties go to the shallower layer, as `ProbeTable.best` does)."""
    wanted = sorted((r for r in table_rows if r["step"] in steps and r["layer"] in layers),
                    key=lambda r: (r["step"], r["layer"]))
    best = {}
    for row in wanted:
        if row["step"] not in best or row["val_acc"] > best[row["step"]]["val_acc"]:
            best[row["step"]] = row
    return [{"run": run_name, "dataset": dataset, "step": r["step"], "layer": r["layer"], "val_acc": r["val_acc"],
             "test_acc": r["test_acc"], "C": r["C"], "val_loss": losses.get(r["step"]), "best": best[r["step"]] is r}
            for r in wanted]


def rows_to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def draw_paper(path: Path, run_name: str, dataset: str, rows: dict[str, list[dict]]) -> bool:
    """Both figures side by side as a PNG at `path`: `run_name`'s accuracy by layer, one line per
    checkpoint, and every run's best-layer accuracy against validation loss. False (nothing written)
    where matplotlib is not installed: it is an optional dependency (the notebooks extra)."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_layer, by_loss = fig.subplots(1, 2)
    steps = sorted({r["step"] for r in rows[run_name]})
    for i, step in enumerate(steps):
        color = colormaps["viridis"](i / max(1, len(steps) - 1))
        mine = [r for r in rows[run_name] if r["step"] == step]
        by_layer.plot([r["layer"] for r in mine], [100 * r["test_acc"] for r in mine], "o-", ms=3, color=color,
                      label=f"step {step}")
        best = next(r for r in mine if r["best"])
        by_layer.plot([best["layer"]], [100 * best["test_acc"]], "*", ms=13, color=color)
    by_layer.set(xlabel="layer (0 = embeddings, last = final norm)", ylabel="linear probe test accuracy (%)",
                 title=f"{run_name} on {dataset}: accuracy by layer (★ best on val)")
    by_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_layer.legend(fontsize="small")
    for name, run_rows in rows.items():
        best = [r for r in run_rows if r["best"] and r["val_loss"] is not None]
        line, = by_loss.plot([r["val_loss"] for r in best], [100 * r["test_acc"] for r in best], "o-", label=name)
        for r in best:
            by_loss.annotate(str(r["step"]), (r["val_loss"], 100 * r["test_acc"]), fontsize="x-small",
                             xytext=(3, 3), textcoords="offset points", color=line.get_color())
    by_loss.set(xlabel="validation loss (nats per token)", ylabel="best-layer test accuracy (%)",
                title="better generative models learn better features")
    by_loss.legend(fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return True
