"""`probe_run`: linear probes of every requested (checkpoint, layer) of a run, with references.

The paper's probe (Chen et al. 2020, §2.4; docs/design.md §5): the feature of layer l is the mean over
positions of layer_norm(h^l) (`features.py`); a logistic regression is fitted on standardised
features of the training split, its regularisation C chosen on the validation split, and the test
accuracy of that C is reported (`fit.py`). For BERT models the features are averaged over a few
random masks and the unmasked input, as the paper does. Results go to runs/<run>/probes/<dataset>.json
(`table.py`).

Speed and reproducibility: every fit runs on one BLAS thread, several fits at once in worker
processes once all features are extracted. Under torchrun the processes split the images for
extraction and rank 0 gathers them, fits and writes, with the same results as one process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..data import SPLITS, check_token_palette, open_dataset, palette_ids
from ..device import pick_device
from ..errors import IgptError
from ..files import atomic_write_json
from ..model import IGPT
from ..progress import progress_bar
from ..runs import Run, as_run
from .cache import FeatureCache, FeatureSource, Ranks, checkpoint_cache, fingerprint
from .features import feature_precision
from .fit import DEFAULT_CS, fit_probes, warm_up_workers
from .table import ProbeTable, load_probe_results, results_path

# The raw-pixel reference fits on at most this many training images (a seeded subset): on CIFAR,
# L-BFGS over 45 000 × 3072 standardised pixels would take longer than probing the model itself.
RAW_PIXELS_MAX_TRAIN = 10_000


# -- data ---------------------------------------------------------------------------------------------------


def load_probe_data(run: Run, dataset: str, size: int, data_dir, max_train: int | None, seed: int):
    """{split: (uint8 images at the model's resolution, labels)}, class names, a note if resized, and
    {split: palette ids} for token datasets (OpenAI's encoded ones, checked against the run's palette
    by `check_token_palette`), else None: the probe then encodes the images with the run's palette.

    Splits are drawn with the run's own data seed, so for the run's own dataset the probe's val and
    test images are the ones pre-training held out.
    """
    info = run.info
    data_seed = int((info.get("train_config") or {}).get("seed", 0))
    if data_dir is None and dataset == info.get("dataset"):
        data_dir = info.get("data_dir")
    # Splits are opened, not read: with max_train only the sampled training images are read, so a
    # large dataset is never loaded whole. The val split, opened at its own size, tells about labels
    # and the native resolution.
    val = open_dataset(dataset, "val", data_dir=data_dir, seed=data_seed)
    if val.labels is None:
        raise IgptError(f"dataset {dataset!r} has no labels; probes need a labelled dataset such as digits")
    check_token_palette(val, run.palette)  # before any image is read: OpenAI's ids fit OpenAI's palette only
    native = val.resolution
    streams = {split: val if split == "val" and native == size  # already open at the model's size
               else open_dataset(dataset, split, data_dir=data_dir, seed=data_seed, resolution=size)
               for split in SPLITS}
    note = None
    if native != size:
        note = (f"{dataset} images are {native}×{native} but the model reads {size}×{size}: "
                f"resized them (bilinear) for the probe")
    out, token_ids = {}, ({} if val.token_ids is not None else None)
    for split, stream in streams.items():
        index = None  # all the images
        if split == "train" and max_train is not None and len(stream) > max_train:
            index = np.sort(np.random.default_rng(seed).choice(len(stream), max_train, replace=False))
            out[split] = (stream.take(index), stream.labels[index])
        else:
            out[split] = (stream.read(), stream.labels)
        if token_ids is not None:
            token_ids[split] = palette_ids(stream, run.palette, size, index)
    return out, val.classes, note, token_ids


# -- the command ------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """What one `probe_run` call probes, checked against the run."""

    steps: list[int]
    layers: list[int]
    concat: tuple[int, ...] | None
    bert_masks: int

    @property
    def extracted(self) -> list[int]:
        """The layers whose features are needed: the probed ones and the concatenated ones."""
        return sorted(set(self.layers) | set(self.concat or ()))


def pick_steps(run: Run, checkpoints) -> list[int]:
    """The run's checkpoint steps that `checkpoints` ("all", "last", a step or a list of them) names."""
    available = run.checkpoints()
    if not available:
        raise IgptError(f"run {run.name!r} has no checkpoints yet: train it with `igpt train --name {run.name}`")
    if isinstance(checkpoints, str):
        if checkpoints not in ("all", "last"):
            raise IgptError(f"checkpoints must be 'all', 'last' or a list of steps, got {checkpoints!r}")
        return available if checkpoints == "all" else available[-1:]
    steps = sorted({int(s) for s in ([checkpoints] if isinstance(checkpoints, int) else checkpoints)})
    absent = [s for s in steps if s not in available]
    if absent or not steps:
        raise IgptError(f"run {run.name!r} has no checkpoint at step {absent[0] if absent else '(none)'}; "
                        f"it has steps {available}")
    return steps


def pick_layers(run: Run, layers, what: str = "layer") -> list[int]:
    """The layer numbers (0..n_layer) that `layers` ("all", a layer or a list of them) names."""
    n = run.model_config.n_layer
    if isinstance(layers, str):
        if layers != "all":
            raise IgptError(f"layers must be 'all' or a list of layer numbers, got {layers!r}")
        return list(range(n + 1))
    picked = sorted({int(layer) for layer in ([layers] if isinstance(layers, int) else layers)})
    bad = [layer for layer in picked if not 0 <= layer <= n]
    if bad or not picked:
        raise IgptError(f"{what} {bad[0] if bad else '(none)'} is out of range: run {run.name!r} has layers "
                        f"0..{n} (0 = the embeddings, {n} = the final norm ln_f)")
    return picked


def _resolve_request(run: Run, checkpoints, layers, concat, bert_masks: int, max_train) -> _Request:
    joined = None
    if concat is not None:
        joined = tuple(pick_layers(run, [concat] if isinstance(concat, int) else list(concat), "concatenated layer"))
        if len(joined) < 2:
            raise IgptError(f"concat needs at least two different layers to join, got {list(joined)}")
    k = int(bert_masks) if run.model_config.objective == "bert" else 0
    if k < 0:
        raise IgptError(f"bert_masks must be >= 0, got {bert_masks}")
    if max_train is not None and max_train < 2:
        raise IgptError(f"max_train must be at least 2, got {max_train}")
    return _Request(pick_steps(run, checkpoints), pick_layers(run, layers), joined, k)


@dataclass
class ProbeInputs:
    """The probe's images (uint8), palette ids and labels per split, and what identifies them."""

    data: dict
    ids: dict
    labels: dict
    hashes: dict
    settings: dict
    note: str | None


def probe_inputs(run: Run, dataset: str, data_dir, max_train, seed: int, bert_masks: int, Cs,
                 precision: str) -> ProbeInputs:
    """What a probe of `run` on `dataset` reads (`load_probe_data`), as palette ids, with the hashes
    that key the feature cache and the settings that key the stored table."""
    size, palette = run.model_config.image_size, run.palette
    data, classes, note, token_ids = load_probe_data(run, dataset, size, data_dir, max_train, seed)
    ids = token_ids or {split: palette.encode(images, size) for split, (images, _) in data.items()}
    hashes = {split: fingerprint(dataset, split, images.tobytes(), labels.tobytes(), palette.to_json())
              for split, (images, labels) in data.items()}
    settings = {
        "data": fingerprint(sorted(hashes.items()))[:16],
        "n_train": len(ids["train"]), "n_val": len(ids["val"]), "n_test": len(ids["test"]),
        "resolution": size, "max_train": max_train, "bert_masks": bert_masks, "seed": seed,
        "Cs": sorted(float(c) for c in Cs), "classes": classes,
    }
    if precision != "fp32":  # tables made in fp32 before the setting existed keep matching
        settings["precision"] = precision
    return ProbeInputs(data, ids, {split: y for split, (_, y) in data.items()}, hashes, settings, note)


def _stored(run: Run, dataset: str, settings: dict, notes: list[str]) -> dict:
    """The stored table's rows, concatenation rows and references, if made with these settings."""
    path = results_path(run, dataset)
    try:
        stored = load_probe_results(run, dataset)
    except IgptError:
        stored = None
        notes.append(f"{path.name} was damaged; it was replaced by this call's results")
    if stored is not None and stored.settings != settings:
        if stored.rows:
            notes.append(f"the stored probe table of {dataset} was made with other settings; it was replaced")
        stored = None
    refs = stored.references if stored else {}
    return {
        "rows": {(r["step"], r["layer"]): r for r in (stored.rows if stored else [])},
        "concat": {(r["step"], tuple(r["layers"])): r for r in (stored.concat if stored else [])},
        "raw_pixels": refs.get("raw_pixels"),
        "random_init": {r["layer"]: r for r in refs.get("random_init", [])},
    }


def _raw_pixel_splits(inputs: ProbeInputs, seed: int) -> tuple:
    """(train_x, train_y, val_x, val_y, test_x, test_y) of flattened pixels, at most
    RAW_PIXELS_MAX_TRAIN training images (a seeded subset)."""
    flat = {split: images.reshape(len(images), -1).astype(np.float32) for split, (images, _) in inputs.data.items()}
    train_x, train_y = flat["train"], inputs.labels["train"]
    if len(train_x) > RAW_PIXELS_MAX_TRAIN:
        keep = np.sort(np.random.default_rng([seed, 2]).choice(len(train_x), RAW_PIXELS_MAX_TRAIN, replace=False))
        train_x, train_y = train_x[keep], train_y[keep]
    return train_x, train_y, flat["val"], inputs.labels["val"], flat["test"], inputs.labels["test"]


def _splits(feats: dict, labels: dict, layers) -> tuple:
    """fit_probe's six arguments for the features of `layers` (several: joined end to end)."""
    out = []
    for split in SPLITS:
        out += [np.concatenate([feats[split][layer] for layer in layers], axis=1), labels[split]]
    return tuple(out)


def probe_run(run_name, dataset: str | None = None, *, checkpoints="all", layers="all", concat=None, runs_dir=None,
              data_dir=None, bert_masks: int = 4, max_train: int | None = None, progress: bool = True, seed: int = 0,
              Cs=DEFAULT_CS, batch_size: int = 256, device: str = "auto", references: bool = True,
              on_progress=None, workers: int | None = None, precision: str = "auto") -> ProbeTable | None:
    """Linear-probe every requested (checkpoint, layer) of a run on a labelled dataset.

    dataset: default the run's own. checkpoints: "all", "last" or a list of steps. layers: "all" or
    a list of layer indices (0..n_layer; 0 reads the embeddings, n_layer is ln_f). concat: a list of
    layers whose features are also probed joined end to end, at each checkpoint (its own rows,
    `ProbeTable.concat`). bert_masks: for BERT runs, random masks averaged with the unmasked input
    (ignored for AR runs). max_train: probe on a seeded subset of the training split.

    Results are merged into runs/<run>/probes/<dataset>.json (re-probing replaces matching rows;
    a table made with different settings — images, masks, C grid — is replaced, not mixed) and
    returned as a ProbeTable holding all stored rows; `note` says if images had to be resized.
    References (stored once per settings): the same probe on raw pixels, and on a randomly
    initialised model of the same shape (torch.manual_seed(seed)) at the requested layers.
    Once the features are extracted, the fits run in `workers` processes (default: one per core);
    the numbers do not depend on `workers` or on thread settings. precision: "auto" (see
    `feature_precision`: bf16 for wide models where the hardware computes it natively), "fp32" or
    "bf16"; it is one of the table's settings. Each row stores the test confusion matrix of its probe.
    on_progress(done, total) is called after each fit (references included), e.g. for a progress bar in an app.
    Under torchrun every rank extracts its share of the images; rank 0 fits, writes and returns the
    table, the other ranks return None.
    """
    run = as_run(run_name, runs_dir)
    ranks = Ranks()
    request = _resolve_request(run, checkpoints, layers, concat, bert_masks, max_train)
    dataset = dataset or run.info["dataset"]
    device = pick_device(device)
    precision = feature_precision(precision, device, run.model_config.n_embd)
    inputs = probe_inputs(run, dataset, data_dir, max_train, seed, request.bert_masks, Cs, precision)
    notes = [inputs.note] if inputs.note else []
    stored = _stored(run, dataset, inputs.settings, notes) if ranks.rank == 0 else None
    random_todo = ranks.share([layer for layer in request.layers if layer not in stored["random_init"]]
                              if references and ranks.rank == 0 else [])
    progress = progress and ranks.rank == 0
    if ranks.rank == 0:
        warm_up_workers(workers)
    jobs = []  # (key, fit_probe's arrays): every fit waits until all features are extracted, so that the
    # fitting processes never compete for cores with torch's threads (which then wait spinning)
    for key, source, wanted in _sources(run, request, random_todo, inputs, dataset, seed, batch_size, device,
                                        precision, progress):
        feats = source.get(wanted, inputs.hashes, ranks)
        if feats is None:
            continue  # not rank 0: it only helps extract
        jobs += [((*key, layer), _splits(feats, inputs.labels, [layer]))
                 for layer in (wanted if key[0] == "random_init" else request.layers)]
        if request.concat and key[0] == "step":
            jobs.append(((*key, request.concat), _splits(feats, inputs.labels, request.concat)))
    if references and ranks.rank == 0 and stored["raw_pixels"] is None:
        jobs.insert(0, (("raw_pixels",), _raw_pixel_splits(inputs, seed)))  # the largest: first, for balance
    with _FitProgress(progress, len(jobs), f"probing {run.name} on {dataset}", on_progress) as tracker:
        classes = range(len(inputs.settings["classes"])) if inputs.settings["classes"] else None
        results = fit_probes(jobs, Cs=Cs, classes=classes, workers=workers, on_fit=tracker.update)
    if ranks.rank != 0:
        return None
    table = _merged_table(run, dataset, stored, results, inputs, notes)
    atomic_write_json(table.path, table.to_dict())
    return table


def _sources(run: Run, request: _Request, random_todo: list[int], inputs: ProbeInputs, dataset: str, seed: int,
             batch_size: int, device: torch.device, precision: str, progress: bool):
    """(fit key prefix, FeatureSource, layers to extract) for each checkpoint, then the random init."""
    def source(cache, load_model):
        return FeatureSource(cache, load_model, inputs.ids, inputs.labels, batch_size, progress)

    def checkpoint_model(step):  # loaded only if some of its features are missing
        return run.load(step, device=device)[0]

    for step in request.steps:
        cache = checkpoint_cache(run, step, dataset, request.bert_masks, seed, precision)
        yield ("step", step), source(cache, partial(checkpoint_model, step)), request.extracted
    if random_todo:
        config = run.model_config

        def random_model():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return IGPT(config).to(device).eval()

        key = fingerprint("random_init", config.to_dict(), seed)
        cache = FeatureCache(run, "random_init", key, dataset, request.bert_masks, seed, precision)
        yield ("random_init",), source(cache, random_model), random_todo


def _merged_table(run: Run, dataset: str, stored: dict, results: dict, inputs: ProbeInputs, notes: list[str]) -> ProbeTable:
    """The stored rows with this call's fits merged in (a fit replaces the stored row it redoes)."""
    val_losses = run.val_losses()
    rows, joined, random_init = dict(stored["rows"]), dict(stored["concat"]), dict(stored["random_init"])
    raw_pixels = stored["raw_pixels"]
    for key, result in results.items():
        scores = {name: result[name] for name in ("val_acc", "test_acc", "C", "confusion")}
        if key[0] == "step":
            step, what = key[1], key[2]
            loss = val_losses.get(step)
            loss = None if loss is None or not math.isfinite(loss) else float(loss)
            if isinstance(what, tuple):
                joined[(step, what)] = {"step": step, "val_loss": loss, "layers": list(what), **scores}
            else:
                rows[(step, what)] = {"step": step, "val_loss": loss, "layer": what, **scores}
        elif key[0] == "random_init":
            random_init[key[1]] = {"layer": key[1], **scores}
        else:
            raw_pixels = {**scores, "n_train": min(inputs.settings["n_train"], RAW_PIXELS_MAX_TRAIN)}
    return ProbeTable(
        dataset=dataset,
        rows=[rows[key] for key in sorted(rows)],
        references={"raw_pixels": raw_pixels, "random_init": [random_init[layer] for layer in sorted(random_init)]},
        objective=run.model_config.objective,
        n_layer=run.model_config.n_layer,
        path=results_path(run, dataset),
        note="; ".join(notes) or None,
        settings=inputs.settings,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        concat=[joined[key] for key in sorted(joined)],
        data_hashes=inputs.hashes,
    )


class _FitProgress:
    """The fits' progress: a tqdm bar (if `progress`) and the caller's on_progress(done, total)."""

    def __init__(self, progress: bool, total: int, desc: str, on_progress=None):
        self.total, self.done, self.on_progress = total, 0, on_progress
        self.bar = progress_bar(progress, total=total, desc=desc, unit="fit")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

    def update(self, key, result) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

