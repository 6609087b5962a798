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

Speed and reproducibility: every fit runs on one BLAS thread (so its numbers do not depend on the
machine's thread settings), several fits at once in worker processes once all features are
extracted. Under torchrun the processes split the images for extraction and rank 0 gathers them,
fits and writes, with the same results as one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import SPLITS, open_dataset
from .training.distributed import init_from_env, patient_group
from .errors import IgptError
from .files import atomic_write, atomic_write_json, safe_name
from .model import IGPT
from .progress import progress_bar
from .runs import Run, as_run
from .device import pick_device

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
                     offset: int = 0, progress: bool = False, desc: str = "features") -> np.ndarray:
    """Probe features of `layers` for every image: float32 (len(layers), N, n_embd).

    `ids` (N, T) are palette ids (numpy or torch). Each batch is one call of `model.features`, which
    returns every requested layer from a single forward pass. For BERT models with bert_masks > 0,
    each image's features are the mean over the unmasked input and `bert_masks` random masks
    (p = model.config.mask_prob); the masks come from per-mask seeded streams drawn image by image,
    so they do not depend on batch_size. The masked copies ride in the same forward call as the
    unmasked one (the batch holds batch_size // (bert_masks + 1) images). AR models ignore bert_masks.
    `offset` is the index of ids[0] in a larger set (one process's share of it, under torchrun): the
    mask streams skip that many images, so the shares' features join into the whole set's.
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
    for rng in rngs:
        rng.bit_generator.advance(offset * T)  # one 64-bit draw per uniform double: skip `offset` images
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

# Every fit runs on one BLAS/OpenMP thread. At probe sizes a threaded product costs more than it
# saves (digits, 1294 × 128 features, the default C grid: 18.6 s on 2 threads, 1.05 s on 1), and
# the order of a threaded sum depends on the thread count, which changed L-BFGS's path and so the
# accuracies. Pinned, a fit gives the same numbers on every machine setting; the cores are used by
# fitting several layers at once in separate processes instead (`fit_probes`).
FIT_THREADS = 1


def fit_probe(train_x, train_y, val_x, val_y, test_x, test_y, *, Cs=DEFAULT_CS, max_iter: int = 1000) -> dict:
    """Logistic regression on standardised features; C chosen by validation accuracy.

    The scaler is fitted on the training features only. Each C (ascending) is fitted on the training
    split with L-BFGS, warm-starting from the previous C; the C with the best validation accuracy
    (the smallest such C on ties) is reported with its validation and test accuracy. The model is
    not refitted on train + val, so the validation accuracy is an honest estimate for the chosen C's
    model and the test split is touched once per C only to read off the reported number.
    Runs on FIT_THREADS BLAS/OpenMP threads whatever the process's settings, so the result does not
    depend on them.

    Returns {"C", "val_acc", "test_acc", "train_acc", "val_accs": {C: acc}, "iterations": {C: L-BFGS
    iterations}, "converged"} ("converged": whether the chosen C's fit converged within max_iter).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))
    if len(np.unique(train_y)) < 2:
        raise IgptError("the probe's training split holds a single class: use more training images (max_train)")
    if not Cs:
        raise IgptError("fit_probe needs at least one value of C")
    with threadpool_limits(limits=FIT_THREADS):
        scaler = StandardScaler().fit(np.asarray(train_x, dtype=np.float64))
        tx, vx, sx = (scaler.transform(np.asarray(x, dtype=np.float64)) for x in (train_x, val_x, test_x))
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)
        best, val_accs, iterations, converged = None, {}, {}, True
        for C in sorted(float(c) for c in Cs):
            clf.set_params(C=C)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(tx, train_y)
            this_converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            val_acc = float((clf.predict(vx) == val_y).mean())
            val_accs[C], iterations[C] = val_acc, int(clf.n_iter_.max())
            if best is None or val_acc > best["val_acc"]:
                best = {
                    "C": C,
                    "val_acc": val_acc,
                    "test_acc": float((clf.predict(sx) == test_y).mean()),
                    "train_acc": float((clf.predict(tx) == train_y).mean()),
                }
                converged = this_converged
    return {**best, "val_accs": val_accs, "iterations": iterations, "converged": converged}


def fit_workers() -> int:
    """Processes `fit_probes` uses by default: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fit_probes(jobs, *, Cs=DEFAULT_CS, workers: int | None = None, on_fit=None) -> dict:
    """`fit_probe` on many feature sets: {key: result} for jobs [(key, (train_x, train_y, val_x,
    val_y, test_x, test_y)), ...], fitted in `workers` processes (default: one per core).

    Each fit is single-threaded (FIT_THREADS), so the results do not depend on `workers`: on two
    cores, two single-threaded fits at once take about half the time of one after the other, where
    one fit on two BLAS threads took 18× longer. Workers are started with forkserver (spawn where
    that does not exist), never forked from this process: a fork of a process that has run torch's
    thread pool can deadlock. on_fit(key, result) is called in the caller's thread as each fit ends.
    """
    jobs = list(jobs)
    workers = min(fit_workers() if workers is None else int(workers), len(jobs))
    results = {}

    def finish(key, result):
        results[key] = result
        if on_fit is not None:
            on_fit(key, result)

    if workers <= 1:
        for key, arrays in jobs:
            finish(key, fit_probe(*arrays, Cs=Cs))
        return results
    with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_stop_with_parent) as pool:
        pending = {pool.submit(_fit_job, arrays, tuple(Cs)): key for key, arrays in jobs}
        try:
            for future in as_completed(pending):
                finish(pending[future], future.result())
        except BaseException:
            for future in pending:
                future.cancel()  # the running fits end with their processes, at most one fit later
            raise
    return results


def _fit_job(arrays, Cs) -> dict:
    """What a fit_probes worker process runs (a module-level function, so it can be pickled)."""
    return fit_probe(*arrays, Cs=Cs)


def _stop_with_parent() -> None:
    """In a worker: exit when the process that started it is gone (killed, say), instead of
    waiting for work forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch():
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _worker_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The server imports torch (with this module) and scikit-learn once; each worker is forked from it.
    context.set_forkserver_preload([__name__, "sklearn.linear_model", "sklearn.preprocessing"])
    return context


def warm_up_workers(workers: int | None = None) -> None:
    """Start the process that fit_probes' workers are forked from, so that its imports (torch,
    scikit-learn: seconds) happen while the caller still extracts features. Nothing to do for one
    worker, or where there is no forkserver."""
    if (fit_workers() if workers is None else workers) > 1 and _worker_context().get_start_method() == "forkserver":
        import multiprocessing.forkserver

        multiprocessing.forkserver.ensure_running()


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
    # Probes of several layers' features joined end to end (the paper's best ImageNet probe, 72.0%,
    # joins five layers of iGPT-XL): {"step", "val_loss", "layers": [...], "val_acc", "test_acc", "C"}.
    concat: list[dict] = field(default_factory=list)

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
            "concat": self.concat,
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


def results_path(run: Run, dataset: str) -> Path:
    return run.path / "probes" / f"{safe_name(dataset, '_') or 'dataset'}.json"


def _is_acc(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _are_concat_rows(rows, n_layer: int) -> bool:
    return isinstance(rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("layers"), list)
        and all(isinstance(layer, int) and 0 <= layer <= n_layer for layer in r["layers"])
        and _is_acc(r.get("val_acc")) and _is_acc(r.get("test_acc"))
        for r in rows
    )


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
    concat = value.get("concat", [])
    if not _are_concat_rows(concat, n_layer):
        raise damaged("'concat' is malformed")
    return ProbeTable(dataset=str(value["dataset"]), rows=value["rows"], references=refs, objective=value["objective"],
                      n_layer=n_layer, path=path, settings=value.get("settings") or {}, created=value.get("created"),
                      concat=concat)


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
    # Splits are opened, not read: with max_train only the sampled training images are read, so a
    # large dataset is never loaded whole. The val split, opened at its own size, tells about labels
    # and the native resolution.
    val = open_dataset(dataset, "val", data_dir=data_dir, seed=data_seed)
    if val.labels is None:
        raise IgptError(f"dataset {dataset!r} has no labels; probes need a labelled dataset such as digits")
    native = val.resolution
    streams = {split: val if split == "val" and native == size  # already open at the model's size
               else open_dataset(dataset, split, data_dir=data_dir, seed=data_seed, resolution=size)
               for split in SPLITS}
    note = None
    if native != size:
        note = (f"{dataset} images are {native}×{native} but the model reads {size}×{size}: "
                f"resized them (bilinear) for the probe")
    out = {}
    for split, stream in streams.items():
        if split == "train" and max_train is not None and len(stream) > max_train:
            index = np.sort(np.random.default_rng(seed).choice(len(stream), max_train, replace=False))
            out[split] = (stream.take(index), stream.labels[index])
        else:
            out[split] = (stream.read(), stream.labels)
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


class _Ranks:
    """The processes extracting features together: this one alone, or every rank under torchrun.

    Each rank extracts a contiguous share of the images; rank 0 gathers the shares, keeps the cache,
    fits and writes. Collectives use the patient gloo group: the others may wait on rank 0 while it
    reads caches or fits in-process.
    """

    def __init__(self):
        self.rank, self.world = init_from_env()
        self.group = patient_group() if self.world > 1 else None

    def share(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def part(self, n: int, rank: int | None = None) -> slice:
        """The images of `rank` (default: this one) among n: ranks' shares differ by one at most."""
        rank = self.rank if rank is None else rank
        return slice(n * rank // self.world, n * (rank + 1) // self.world)

    def gather(self, feats: np.ndarray, n: int) -> np.ndarray | None:
        """Every rank's (L, share, d) features joined in image order on rank 0; None elsewhere."""
        if self.world == 1:
            return feats
        size = -(-n // self.world)  # the largest share; gloo gathers equal-sized tensors
        padded = torch.zeros((feats.shape[0], size, feats.shape[2]), dtype=torch.float32)
        padded[:, : feats.shape[1]] = torch.from_numpy(feats)
        bucket = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, bucket, dst=0, group=self.group)
        if self.rank != 0:
            return None
        shares = [self.part(n, rank) for rank in range(self.world)]
        return np.concatenate([t[:, : s.stop - s.start].numpy() for t, s in zip(bucket, shares)], axis=1)


class _FeatureSource:
    """Features of one model (a checkpoint or the random init) for the probe splits, via the cache."""

    def __init__(self, run: Run, tag: str, key: str, load_model, ids: dict, dataset: str,
                 bert_masks: int, seed: int, batch_size: int, progress: bool):
        self.run, self.tag, self.key, self.load_model = run, tag, key, load_model
        self.ids, self.dataset = ids, dataset
        self.bert_masks, self.seed, self.batch_size, self.progress = bert_masks, seed, batch_size, progress

    def path(self, split: str, data_hash: str) -> Path:
        h = _fingerprint(FEATURES_FORMAT, self.key, data_hash, self.bert_masks, self.seed)[:12]
        return self.run.path / "probes" / "features" / f"{self.tag}-{safe_name(self.dataset, '_') or 'dataset'}-{split}-{h}.npz"

    def get(self, layers: list[int], data_hashes: dict, ranks: _Ranks) -> dict[str, dict[int, np.ndarray]] | None:
        """{split: {layer: (N, d)}} on rank 0 (None on the others, which only help extract)."""
        out, model = {}, None
        for split in SPLITS:
            path = self.path(split, data_hashes[split])
            n = len(self.ids[split])
            cached = {}
            if ranks.rank == 0:
                cached = {layer: x for layer, x in _read_cache(path).items() if x.shape[0] == n}
            missing = ranks.share([layer for layer in layers if layer not in cached])
            if missing:
                if model is None:
                    model = self.load_model()
                share = ranks.part(n)
                feats = extract_features(model, self.ids[split][share], missing, bert_masks=self.bert_masks,
                                         seed=self.seed, offset=share.start, batch_size=self.batch_size,
                                         progress=self.progress, desc=f"{self.tag} {split}")
                feats = ranks.gather(feats, n)
                if ranks.rank == 0:
                    cached.update({layer: feats[i] for i, layer in enumerate(missing)})
                    _write_cache(path, cached)
            out[split] = {layer: cached[layer] for layer in layers} if ranks.rank == 0 else None
        return out if ranks.rank == 0 else None


def _checkpoint_key(run: Run, step: int) -> str:
    stat = run.checkpoint_path(step).stat()
    return f"step={step};size={stat.st_size};mtime={stat.st_mtime_ns}"


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


def _pick_steps(run: Run, checkpoints) -> list[int]:
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


def _pick_layers(run: Run, layers, what: str = "layer") -> list[int]:
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
        joined = tuple(_pick_layers(run, [concat] if isinstance(concat, int) else list(concat), "concatenated layer"))
        if len(joined) < 2:
            raise IgptError(f"concat needs at least two different layers to join, got {list(joined)}")
    k = int(bert_masks) if run.model_config.objective == "bert" else 0
    if k < 0:
        raise IgptError(f"bert_masks must be >= 0, got {bert_masks}")
    if max_train is not None and max_train < 2:
        raise IgptError(f"max_train must be at least 2, got {max_train}")
    return _Request(_pick_steps(run, checkpoints), _pick_layers(run, layers), joined, k)


@dataclass
class _Inputs:
    """The probe's images (uint8), palette ids and labels per split, and what identifies them."""

    data: dict
    ids: dict
    labels: dict
    hashes: dict
    settings: dict
    note: str | None


def _probe_inputs(run: Run, dataset: str, data_dir, max_train, seed: int, bert_masks: int, Cs) -> _Inputs:
    size, palette = run.model_config.image_size, run.palette
    data, classes, note = _load_probe_data(run, dataset, size, data_dir, max_train, seed)
    ids = {split: palette.encode(images, size) for split, (images, _) in data.items()}
    hashes = {split: _fingerprint(dataset, split, images.tobytes(), labels.tobytes(), palette.to_json())
              for split, (images, labels) in data.items()}
    settings = {
        "data": _fingerprint(sorted(hashes.items()))[:16],
        "n_train": len(ids["train"]), "n_val": len(ids["val"]), "n_test": len(ids["test"]),
        "resolution": size, "max_train": max_train, "bert_masks": bert_masks, "seed": seed,
        "Cs": sorted(float(c) for c in Cs), "classes": classes,
    }
    return _Inputs(data, ids, {split: y for split, (_, y) in data.items()}, hashes, settings, note)


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


def _raw_pixel_splits(inputs: _Inputs, seed: int) -> tuple:
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
              on_progress=None, workers: int | None = None) -> ProbeTable | None:
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
    the numbers do not depend on `workers` or on thread settings.
    on_progress(done, total) is called after each fit (references included), e.g. for a progress bar in an app.
    Under torchrun every rank extracts its share of the images; rank 0 fits, writes and returns the
    table, the other ranks return None.
    """
    run = as_run(run_name, runs_dir)
    ranks = _Ranks()
    request = _resolve_request(run, checkpoints, layers, concat, bert_masks, max_train)
    dataset = dataset or run.info["dataset"]
    inputs = _probe_inputs(run, dataset, data_dir, max_train, seed, request.bert_masks, Cs)
    notes = [inputs.note] if inputs.note else []
    stored = _stored(run, dataset, inputs.settings, notes) if ranks.rank == 0 else None
    random_todo = ranks.share([layer for layer in request.layers if layer not in stored["random_init"]]
                              if references and ranks.rank == 0 else [])
    progress = progress and ranks.rank == 0
    if ranks.rank == 0:
        warm_up_workers(workers)
    jobs = []  # (key, fit_probe's arrays): every fit waits until all features are extracted, so that the
    # fitting processes never compete for cores with torch's threads (which then wait spinning)
    for key, source, wanted in _sources(run, request, random_todo, inputs, dataset, seed, batch_size, device, progress):
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
        results = fit_probes(jobs, Cs=Cs, workers=workers, on_fit=tracker.update)
    if ranks.rank != 0:
        return None
    table = _merged_table(run, dataset, stored, results, inputs, notes)
    atomic_write_json(table.path, table.to_dict())
    return table


def _sources(run: Run, request: _Request, random_todo: list[int], inputs: _Inputs, dataset: str, seed: int,
             batch_size: int, device: str, progress: bool):
    """(fit key prefix, _FeatureSource, layers to extract) for each checkpoint, then the random init."""
    dev = pick_device(device)
    common = dict(ids=inputs.ids, dataset=dataset, bert_masks=request.bert_masks, seed=seed, batch_size=batch_size,
                  progress=progress)
    for step in request.steps:
        yield ("step", step), _FeatureSource(run, f"step_{step:07d}", _checkpoint_key(run, step),
                                             lambda step=step: run.load(step, device=dev)[0], **common), \
            request.extracted
    if random_todo:
        config = run.model_config

        def random_model():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return IGPT(config).to(dev).eval()

        key = _fingerprint("random_init", config.to_dict(), seed)
        yield ("random_init",), _FeatureSource(run, "random_init", key, random_model, **common), random_todo


def _merged_table(run: Run, dataset: str, stored: dict, results: dict, inputs: _Inputs, notes: list[str]) -> ProbeTable:
    """The stored rows with this call's fits merged in (a fit replaces the stored row it redoes)."""
    val_losses = run.val_losses()
    rows, joined, random_init = dict(stored["rows"]), dict(stored["concat"]), dict(stored["random_init"])
    raw_pixels = stored["raw_pixels"]
    for key, result in results.items():
        scores = {"val_acc": result["val_acc"], "test_acc": result["test_acc"], "C": result["C"]}
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
