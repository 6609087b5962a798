"""Linear probes: how linearly separable are the classes in each layer's features, at each checkpoint?

The paper's probe (Chen et al. 2020, §2.4; docs/design.md §5): the feature of layer l is the mean over
positions of layer_norm(h^l) — the input norm of block l, or ln_f for l = n_layer — read through
the model's public `IGPT.features`; a logistic regression (L-BFGS, as scikit-learn does it) is fitted
on standardised features of the training split, its regularisation C chosen on the validation
split, and the test accuracy of that C is reported. For BERT models the features are averaged over
a few random masks and the unmasked input, as the paper does.

    runs/<run>/probes/
        <dataset>.json                                    the probe table (see `probe_run`)
        features/step_0000300-<dataset>-<split>-<hash>.npz   cached features, one array per layer
        features/random_init-<dataset>-<split>-<hash>.npz    the same for the random-init reference

Features are cached per checkpoint and split, one array per layer in one .npz, keyed by a hash of
everything that determines them (the checkpoint file, the exact images, the BERT mask settings).
A later call re-uses every cached layer and computes only the missing ones — in one forward pass
that stops after the deepest missing layer — so probing "all" layers once and then a subset, or
a subset then more layers, never repeats work.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import SPLITS, load_dataset
from .errors import IgptError
from .files import atomic_write, atomic_write_json
from .model import IGPT
from .progress import progress_bar
from .runs import Run, as_run
from .train import pick_device

FEATURES_FORMAT = 1
RESULTS_FORMAT = 1
# Regularisation strengths tried, ascending (each fit warm-starts from the previous one). Features
# are standardised, so one grid serves every width; the best C is chosen on the validation split.
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
# The raw-pixel reference fits on at most this many training images (a seeded subset): on CIFAR,
# L-BFGS over 45 000 × 3072 standardised pixels would take longer than probing the model itself.
RAW_PIXELS_MAX_TRAIN = 10_000


# -- features -----------------------------------------------------------------------------------------


@torch.inference_mode()
def extract_features(model: IGPT, ids, layers, *, batch_size: int = 256, bert_masks: int = 0, seed: int = 0,
                     progress: bool = False, desc: str = "features") -> np.ndarray:
    """Probe features of `layers` for every image: float32 (len(layers), N, n_embd).

    `ids` (N, T) are palette ids (numpy or torch). Each batch is one call of `model.features`, which
    returns every requested layer from a single forward pass. For BERT models with bert_masks > 0,
    each image's features are the mean over the unmasked input and `bert_masks` random masks
    (p = model.config.mask_prob); the masks come from per-mask seeded streams drawn image by image,
    so they do not depend on batch_size. The masked copies ride in the same forward call as the
    unmasked one (the batch holds batch_size // (bert_masks + 1) images). AR models ignore bert_masks.
    """
    layers = [int(layer) for layer in layers]
    n = model.config.n_layer
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad or not layers:
        raise IgptError(f"layer {bad[0] if bad else '(none)'} is out of range: this model has layers 0..{n}")
    ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if ids.ndim != 2:
        raise IgptError(f"ids must be (N, T) palette ids, got shape {tuple(ids.shape)}")
    N, T = ids.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    k = bert_masks if model.config.objective == "bert" else 0
    if k < 0:
        raise IgptError(f"bert_masks must be >= 0, got {bert_masks}")
    rngs = [np.random.default_rng([seed, m]) for m in range(k)]
    per_call = max(1, batch_size // (k + 1))
    out = np.empty((len(layers), N, model.config.n_embd), dtype=np.float32)
    bar = progress_bar(progress, total=N, desc=desc, unit="img", leave=False)
    try:
        for start in range(0, N, per_call):
            batch = ids[start : start + per_call].to(device)
            b = len(batch)
            if k:
                masks = [np.zeros((b, T), dtype=bool)] + [rng.random((b, T)) < model.config.mask_prob for rng in rngs]
                mask = torch.from_numpy(np.concatenate(masks)).to(device)
                feats = model.features(batch.repeat(k + 1, 1), layers, mask)  # (L, (k+1)·b, d)
                feats = feats.view(len(layers), k + 1, b, -1).mean(dim=1)
            else:
                feats = model.features(batch, layers)
            out[:, start : start + b] = feats.float().cpu().numpy()
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out


# -- the probe ------------------------------------------------------------------------------------------


def fit_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, Cs=DEFAULT_CS, max_iter: int = 1000) -> dict:
    """Logistic regression on standardised features; C chosen by validation accuracy.

    The scaler is fitted on the training features only. Each C (ascending) is fitted on the training
    split with L-BFGS, warm-starting from the previous C; the C with the best validation accuracy
    (the smallest such C on ties) is reported with its validation and test accuracy. The model is
    not refitted on train + val, so the validation accuracy is an honest estimate for the chosen C's
    model and the test split is touched once per C only to read off the reported number.

    Returns {"C", "val_acc", "test_acc", "train_acc", "val_accs": {C: acc}, "converged"}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))
    if len(np.unique(train_y)) < 2:
        raise IgptError("the probe's training split holds a single class: use more training images (max_train)")
    if not Cs:
        raise IgptError("fit_probe needs at least one value of C")
    scaler = StandardScaler().fit(np.asarray(train_x, dtype=np.float64))
    tx, vx, sx = (scaler.transform(np.asarray(x, dtype=np.float64)) for x in (train_x, val_x, test_x))
    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)
    best, val_accs, converged = None, {}, True
    for C in sorted(float(c) for c in Cs):
        clf.set_params(C=C)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(tx, train_y)
        this_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        val_acc = float((clf.predict(vx) == val_y).mean())
        val_accs[C] = val_acc
        if best is None or val_acc > best["val_acc"]:
            best = {
                "C": C,
                "val_acc": val_acc,
                "test_acc": float((clf.predict(sx) == test_y).mean()),
                "train_acc": float((clf.predict(tx) == train_y).mean()),
            }
            converged = this_converged
    return {**best, "val_accs": val_accs, "converged": converged}


# -- results --------------------------------------------------------------------------------------------


@dataclass
class ProbeTable:
    """The stored probe results of one run on one dataset, after the latest `probe_run`."""

    dataset: str
    rows: list[dict]  # {"step", "val_loss", "layer", "val_acc", "test_acc", "C"}, sorted by (step, layer)
    references: dict  # {"raw_pixels": {...} | None, "random_init": [{"layer", ...}]}
    objective: str
    n_layer: int
    path: Path
    note: str | None = None  # e.g. that images were resized: callers print it as a warning
    settings: dict = field(default_factory=dict)
    created: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def steps(self) -> list[int]:
        """The probed checkpoints, ascending."""
        return sorted({r["step"] for r in self.rows})

    def best(self, step: int | None = None) -> dict | None:
        """The row with the best validation accuracy (of one checkpoint, if `step` is given).

        Chosen on validation, never on test accuracy, as the paper does; ties go to the earlier
        checkpoint, then the shallower layer.
        """
        rows = [r for r in self.rows if step is None or r["step"] == step]
        return max(rows, key=lambda r: (r["val_acc"], -r["step"], -r["layer"]), default=None)

    def best_by_step(self) -> list[dict]:
        """Each checkpoint's best-layer row, by step."""
        return [self.best(step) for step in self.steps]

    def loss_accuracy_rho(self, metric: str = "test_acc") -> float | None:
        """Spearman ρ between the checkpoints' validation loss and their best layer's accuracy.

        The paper's "better generative models learn better features" (§4.1, Figure 3) is a negative ρ.
        Checkpoints without a stored val loss are left out; None with fewer than 3 of them.
        """
        rows = [r for r in self.best_by_step() if r.get("val_loss") is not None]
        return spearman([r["val_loss"] for r in rows], [r[metric] for r in rows])

    def to_dict(self) -> dict:
        return {
            "format": RESULTS_FORMAT,
            "dataset": self.dataset,
            "objective": self.objective,
            "n_layer": self.n_layer,
            "settings": self.settings,
            "rows": self.rows,
            "references": self.references,
            "created": self.created,
        }


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks, so ties share a rank); None with
    fewer than 3 points or when either side has no spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        return None
    rx, ry = _average_ranks(x), _average_ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _safe(name: str) -> str:
    """A dataset name as a file-name part: "folder:/a/b" -> "folder_a_b"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "dataset"


def results_path(run: Run, dataset: str) -> Path:
    return run.path / "probes" / f"{_safe(dataset)}.json"


def _is_acc(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def load_probe_results(run, dataset: str | None = None, *, runs_dir=None) -> ProbeTable | None:
    """The stored probe table of `run` (a Run or a run name) on `dataset` (default: the run's own),
    or None if it was never probed. A damaged file, or one of a newer format than this igpt reads,
    raises IgptError naming the file."""
    run = as_run(run, runs_dir)
    dataset = dataset or run.info.get("dataset")
    path = results_path(run, dataset)
    if not path.exists():
        return None

    def damaged(why: str):
        return IgptError(f"the probe results {path} are damaged ({why}); delete the file and run "
                         f"`igpt probe {run.name} --dataset {dataset}` again")

    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise damaged(f"not readable JSON: {err}") from None
    if not isinstance(value, dict):
        raise damaged("not a JSON object")
    fmt = value.get("format", RESULTS_FORMAT)
    if not isinstance(fmt, int) or fmt > RESULTS_FORMAT:
        raise IgptError(f"the probe results {path} have format {fmt!r}, newer than this igpt reads "
                        f"({RESULTS_FORMAT}); update igpt")
    for key in ("dataset", "rows", "references", "objective", "n_layer"):
        if key not in value:
            raise damaged(f"missing {key!r}")
    if not isinstance(value["rows"], list):
        raise damaged("'rows' is not a list")
    n_layer = value["n_layer"]
    if not isinstance(n_layer, int):
        raise damaged("'n_layer' is not a whole number")
    for i, row in enumerate(value["rows"]):
        if not isinstance(row, dict):
            raise damaged(f"row {i} is not an object")
        missing = [k for k in ("step", "layer", "val_acc", "test_acc", "C", "val_loss") if k not in row]
        if missing:
            raise damaged(f"row {i} lacks {missing}")
        if not isinstance(row["step"], int) or not isinstance(row["layer"], int) or not 0 <= row["layer"] <= n_layer:
            raise damaged(f"row {i} has a bad step or layer")
        if not (_is_acc(row["val_acc"]) and _is_acc(row["test_acc"])):
            raise damaged(f"row {i} has accuracies outside [0, 1]")
        if row["val_loss"] is not None and not isinstance(row["val_loss"], (int, float)):
            raise damaged(f"row {i} has a non-numeric val_loss")
    refs = value["references"]
    if not isinstance(refs, dict):
        raise damaged("'references' is not an object")
    raw = refs.get("raw_pixels")
    if raw is not None and not (isinstance(raw, dict) and _is_acc(raw.get("val_acc")) and _is_acc(raw.get("test_acc"))):
        raise damaged("'references.raw_pixels' is malformed")
    rand = refs.get("random_init", [])
    if not isinstance(rand, list) or not all(
        isinstance(r, dict) and isinstance(r.get("layer"), int) and _is_acc(r.get("val_acc")) and _is_acc(r.get("test_acc"))
        for r in rand
    ):
        raise damaged("'references.random_init' is malformed")
    return ProbeTable(dataset=str(value["dataset"]), rows=value["rows"], references=refs, objective=value["objective"],
                      n_layer=n_layer, path=path, settings=value.get("settings") or {}, created=value.get("created"))


# -- data and the feature cache ----------------------------------------------------------------------------


def _load_probe_data(run: Run, dataset: str, size: int, data_dir, max_train: int | None, seed: int):
    """{split: (uint8 images at the model's resolution, labels)}, class names, and a note if resized.

    Splits are drawn with the run's own data seed, so for the run's own dataset the probe's val and
    test images are the ones pre-training held out.
    """
    info = run.info
    data_seed = int((info.get("train_config") or {}).get("seed", 0))
    if data_dir is None and dataset == info.get("dataset"):
        data_dir = info.get("data_dir")
    # The val split first: it is the smallest, and tells us about labels and native resolution.
    val = load_dataset(dataset, "val", data_dir=data_dir, seed=data_seed)
    if val.labels is None:
        raise IgptError(f"dataset {dataset!r} has no labels; probes need a labelled dataset such as digits")
    note = None
    if val.resolution != size:
        note = (f"{dataset} images are {val.resolution}×{val.resolution} but the model reads {size}×{size}: "
                f"resized them (bilinear) for the probe")
        val = load_dataset(dataset, "val", data_dir=data_dir, seed=data_seed, resolution=size)
    splits = {"val": val}
    for split in ("train", "test"):
        splits[split] = load_dataset(dataset, split, data_dir=data_dir, seed=data_seed, resolution=size)
    out = {}
    for split in SPLITS:
        d = splits[split]
        images, labels = d.images, d.labels
        if split == "train" and max_train is not None and len(images) > max_train:
            if max_train < 2:
                raise IgptError(f"max_train must be at least 2, got {max_train}")
            index = np.sort(np.random.default_rng(seed).choice(len(images), max_train, replace=False))
            images, labels = images[index], labels[index]
        out[split] = (images, labels)
    return out, val.classes, note


def _fingerprint(*parts) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _read_cache(path: Path) -> dict[int, np.ndarray]:
    """Cached layers {layer: (N, d)}; an unreadable file counts as empty (it will be rewritten)."""
    if not path.exists():
        return {}
    try:
        with np.load(path) as f:
            return {int(name.split("_")[1]): f[name] for name in f.files if name.startswith("layer_")}
    except (OSError, ValueError, KeyError, IndexError, EOFError):
        return {}


def _write_cache(path: Path, layers: dict[int, np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp path
            np.savez(f, **{f"layer_{layer}": x for layer, x in sorted(layers.items())})

    atomic_write(path, write)


class _FeatureSource:
    """Features of one model (a checkpoint or the random init) for the probe splits, via the cache."""

    def __init__(self, run: Run, tag: str, key: str, load_model, data: dict, ids: dict, dataset: str,
                 bert_masks: int, seed: int, batch_size: int, progress: bool):
        self.run, self.tag, self.key, self.load_model = run, tag, key, load_model
        self.data, self.ids, self.dataset = data, ids, dataset
        self.bert_masks, self.seed, self.batch_size, self.progress = bert_masks, seed, batch_size, progress
        self._model = None

    def path(self, split: str, data_hash: str) -> Path:
        h = _fingerprint(FEATURES_FORMAT, self.key, data_hash, self.bert_masks, self.seed)[:12]
        return self.run.path / "probes" / "features" / f"{self.tag}-{_safe(self.dataset)}-{split}-{h}.npz"

    def get(self, layers: list[int], data_hashes: dict) -> dict[str, dict[int, np.ndarray]]:
        out = {}
        for split in SPLITS:
            path = self.path(split, data_hashes[split])
            cached = _read_cache(path)
            n = len(self.ids[split])
            cached = {layer: x for layer, x in cached.items() if x.shape[0] == n}
            missing = [layer for layer in layers if layer not in cached]
            if missing:
                if self._model is None:
                    self._model = self.load_model()
                feats = extract_features(self._model, self.ids[split], missing, bert_masks=self.bert_masks,
                                         seed=self.seed, batch_size=self.batch_size, progress=self.progress,
                                         desc=f"{self.tag} {split}")
                cached.update({layer: feats[i] for i, layer in enumerate(missing)})
                _write_cache(path, cached)
            out[split] = {layer: cached[layer] for layer in layers}
        self._model = None
        return out


def _checkpoint_key(run: Run, step: int) -> str:
    stat = run.checkpoint_path(step).stat()
    return f"step={step};size={stat.st_size};mtime={stat.st_mtime_ns}"


# -- the command ------------------------------------------------------------------------------------------


def probe_run(run_name, dataset: str | None = None, *, checkpoints="all", layers="all", runs_dir=None, data_dir=None,
              bert_masks: int = 4, max_train: int | None = None, progress: bool = True, seed: int = 0,
              Cs=DEFAULT_CS, batch_size: int = 256, device: str = "auto", references: bool = True,
              on_progress=None) -> ProbeTable:
    """Linear-probe every requested (checkpoint, layer) of a run on a labelled dataset.

    dataset: default the run's own. checkpoints: "all", "last" or a list of steps. layers: "all" or
    a list of layer indices (0..n_layer; 0 reads the embeddings, n_layer is ln_f). bert_masks: for
    BERT runs, random masks averaged with the unmasked input (ignored for AR runs). max_train: probe
    on a seeded subset of the training split.

    Results are merged into runs/<run>/probes/<dataset>.json (re-probing replaces matching rows;
    a table made with different settings — images, masks, C grid — is replaced, not mixed) and
    returned as a ProbeTable holding all stored rows; `note` says if images had to be resized.
    References (stored once per settings): the same probe on raw pixels, and on a randomly
    initialised model of the same shape (torch.manual_seed(seed)) at the requested layers.
    on_progress(done, total) is called after each (checkpoint, layer) fit, e.g. for a progress bar in an app.
    """
    run = as_run(run_name, runs_dir)
    info = run.info
    config = run.model_config
    n = config.n_layer
    dataset = dataset or info["dataset"]
    available = run.checkpoints()
    if not available:
        raise IgptError(f"run {run.name!r} has no checkpoints yet: train it with `igpt train --name {run.name}`")
    if isinstance(checkpoints, str):
        if checkpoints not in ("all", "last"):
            raise IgptError(f"checkpoints must be 'all', 'last' or a list of steps, got {checkpoints!r}")
        steps = available if checkpoints == "all" else available[-1:]
    else:
        steps = sorted({int(s) for s in ([checkpoints] if isinstance(checkpoints, int) else checkpoints)})
        absent = [s for s in steps if s not in available]
        if absent or not steps:
            raise IgptError(f"run {run.name!r} has no checkpoint at step {absent[0] if absent else '(none)'}; "
                            f"it has steps {available}")
    if isinstance(layers, str):
        if layers != "all":
            raise IgptError(f"layers must be 'all' or a list of layer numbers, got {layers!r}")
        layer_list = list(range(n + 1))
    else:
        layer_list = sorted({int(layer) for layer in ([layers] if isinstance(layers, int) else layers)})
        bad = [layer for layer in layer_list if not 0 <= layer <= n]
        if bad or not layer_list:
            raise IgptError(f"layer {bad[0] if bad else '(none)'} is out of range: run {run.name!r} has layers "
                            f"0..{n} (0 = the embeddings, {n} = the final norm ln_f)")
    k = int(bert_masks) if config.objective == "bert" else 0
    if k < 0:
        raise IgptError(f"bert_masks must be >= 0, got {bert_masks}")
    if max_train is not None and max_train < 2:
        raise IgptError(f"max_train must be at least 2, got {max_train}")

    size = config.image_size
    palette = run.palette
    data, classes, note = _load_probe_data(run, dataset, size, data_dir, max_train, seed)
    ids = {split: palette.encode(images, size) for split, (images, _) in data.items()}
    labels = {split: y for split, (_, y) in data.items()}
    data_hashes = {split: _fingerprint(dataset, split, images.tobytes(), data[split][1].tobytes(), palette.to_json())
                   for split, (images, _) in data.items()}
    settings = {
        "data": _fingerprint(sorted(data_hashes.items()))[:16],
        "n_train": len(ids["train"]), "n_val": len(ids["val"]), "n_test": len(ids["test"]),
        "resolution": size, "max_train": max_train, "bert_masks": k, "seed": seed,
        "Cs": sorted(float(c) for c in Cs), "classes": classes,
    }

    # What is stored already, and whether it is comparable with this call.
    path = results_path(run, dataset)
    notes = [note] if note else []
    try:
        stored = load_probe_results(run, dataset)
    except IgptError:
        stored = None
        notes.append(f"{path.name} was damaged; it was replaced by this call's results")
    if stored is not None and stored.settings != settings:
        if stored.rows:
            notes.append(f"the stored probe table of {dataset} was made with other settings; it was replaced")
        stored = None
    rows = {(r["step"], r["layer"]): r for r in (stored.rows if stored else [])}
    refs = (stored.references if stored else None) or {"raw_pixels": None, "random_init": []}
    refs.setdefault("raw_pixels", None)
    refs.setdefault("random_init", [])

    dev = pick_device(device)
    common = dict(data=data, ids=ids, dataset=dataset, bert_masks=k, seed=seed, batch_size=batch_size,
                  progress=progress)
    val_losses = run.val_losses()
    n_fits = len(steps) * len(layer_list)
    fit_bar = progress_bar(progress, total=n_fits, desc=f"probing {run.name} on {dataset}", unit="fit")

    def fit(feats, layer):
        return fit_probe(feats["train"][layer], labels["train"], feats["val"][layer], labels["val"],
                         feats["test"][layer], labels["test"], Cs=Cs)

    done = 0
    try:
        for step in steps:
            source = _FeatureSource(run, f"step_{step:07d}", _checkpoint_key(run, step),
                                    lambda step=step: run.load(step, device=dev)[0], **common)
            feats = source.get(layer_list, data_hashes)
            for layer in layer_list:
                result = fit(feats, layer)
                val_loss = val_losses.get(step)
                rows[(step, layer)] = {
                    "step": step, "val_loss": None if val_loss is None or not math.isfinite(val_loss) else float(val_loss),
                    "layer": layer, "val_acc": result["val_acc"], "test_acc": result["test_acc"], "C": result["C"],
                }
                if fit_bar is not None:
                    fit_bar.update(1)
                done += 1
                if on_progress is not None:
                    on_progress(done, n_fits)
        if references:
            if refs["raw_pixels"] is None:
                flat = {split: images.reshape(len(images), -1).astype(np.float32) for split, (images, _) in data.items()}
                train_x, train_y = flat["train"], labels["train"]
                if len(train_x) > RAW_PIXELS_MAX_TRAIN:
                    keep = np.sort(np.random.default_rng([seed, 2]).choice(len(train_x), RAW_PIXELS_MAX_TRAIN,
                                                                           replace=False))
                    train_x, train_y = train_x[keep], train_y[keep]
                result = fit_probe(train_x, train_y, flat["val"], labels["val"], flat["test"], labels["test"], Cs=Cs)
                refs["raw_pixels"] = {"val_acc": result["val_acc"], "test_acc": result["test_acc"], "C": result["C"],
                                      "n_train": len(train_x)}
            have = {r["layer"] for r in refs["random_init"]}
            todo = [layer for layer in layer_list if layer not in have]
            if todo:
                def random_model():
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        return IGPT(config).to(dev).eval()

                key = _fingerprint("random_init", config.to_dict(), seed)
                source = _FeatureSource(run, "random_init", key, random_model, **common)
                feats = source.get(todo, data_hashes)
                for layer in todo:
                    result = fit(feats, layer)
                    refs["random_init"].append({"layer": layer, "val_acc": result["val_acc"],
                                                "test_acc": result["test_acc"], "C": result["C"]})
                refs["random_init"].sort(key=lambda r: r["layer"])
    finally:
        if fit_bar is not None:
            fit_bar.close()

    table = ProbeTable(
        dataset=dataset,
        rows=[rows[key] for key in sorted(rows)],
        references=refs,
        objective=config.objective,
        n_layer=n,
        path=path,
        note="; ".join(notes) or None,
        settings=settings,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_write_json(path, table.to_dict())
    return table
