"""The probe features' cache: each model's features on each split, kept so that nothing runs twice.

Features are cached per checkpoint and split, one array per layer in one .npz with the split's
labels, keyed by a hash of everything that determines them (the checkpoint file, the exact images,
the BERT mask settings, and the precision when it is not fp32):

    runs/<run>/probes/features/step_0000300-<dataset>-<split>-<hash>.npz
    runs/<run>/probes/features/random_init-<dataset>-<split>-<hash>.npz

A later call re-uses every cached layer and computes only the missing ones — in one forward pass
that stops after the deepest missing layer — so probing "all" layers once and then a subset, or
a subset then more layers, never repeats work. `cached_features` reads them back for analysis code
(CKA, projections) without running the model. Under torchrun the processes split the images and
rank 0 gathers them (`Ranks`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data import SPLITS
from ..distributed import init_from_env, patient_group
from ..files import atomic_write, safe_name
from ..runs import Run, as_run
from .features import extract_features
from .table import load_probe_results

FEATURES_FORMAT = 1


def fingerprint(*parts) -> str:
    """A SHA-1 hex digest of `parts` (bytes as they are, anything else as sorted JSON)."""
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def checkpoint_key(run: Run, step: int) -> str:
    """What identifies a checkpoint's file: rewriting the checkpoint makes its cached features stale."""
    stat = run.checkpoint_path(step).stat()
    return f"step={step};size={stat.st_size};mtime={stat.st_mtime_ns}"


@dataclass(frozen=True)
class FeatureCache:
    """Where the features of one model (a checkpoint, or the random init) on one dataset are kept."""

    run: Run
    tag: str  # "step_0000300" or "random_init": the files' names start with it
    key: str  # what identifies the model (checkpoint_key, or the random init's config and seed)
    dataset: str
    bert_masks: int
    seed: int
    precision: str = "fp32"  # "fp32" or "bf16", as resolved

    def path(self, split: str, data_hash: str) -> Path:
        # fp32 is left out of the hash, so that caches written before the precision existed stay valid
        extra = [] if self.precision == "fp32" else [self.precision]
        h = fingerprint(FEATURES_FORMAT, self.key, data_hash, self.bert_masks, self.seed, *extra)[:12]
        name = f"{self.tag}-{safe_name(self.dataset, '_') or 'dataset'}-{split}-{h}.npz"
        return self.run.path / "probes" / "features" / name

    def read(self, split: str, data_hash: str, layers=None) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """Cached layers {layer: (N, d)} (only those in `layers`, if given: the others are not read)
        and the labels (None in files written before labels were kept); an unreadable file counts as
        empty (it will be rewritten)."""
        path = self.path(split, data_hash)
        if not path.exists():
            return {}, None
        try:
            with np.load(path) as f:
                stored = {int(name.split("_")[1]): name for name in f.files if name.startswith("layer_")}
                arrays = {layer: f[name] for layer, name in stored.items() if layers is None or layer in layers}
                return arrays, (f["labels"] if "labels" in f.files else None)
        except (OSError, ValueError, KeyError, IndexError, EOFError):
            return {}, None

    def write(self, split: str, data_hash: str, layers: dict[int, np.ndarray], labels: np.ndarray) -> None:
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp path
                np.savez(f, labels=labels, **{f"layer_{layer}": x for layer, x in sorted(layers.items())})

        atomic_write(self.path(split, data_hash), write)


def checkpoint_cache(run: Run, step: int, dataset: str, bert_masks: int, seed: int,
                     precision: str = "fp32") -> FeatureCache:
    """Where the probe features of checkpoint `step` on `dataset` are kept, for these probe settings."""
    return FeatureCache(run, f"step_{step:07d}", checkpoint_key(run, step), dataset, bert_masks, seed, precision)


def cached_features(run, dataset: str | None, step: int, split: str = "test", *, layers=None,
                    runs_dir=None) -> tuple[dict[int, np.ndarray], np.ndarray] | None:
    """The probe features of checkpoint `step` on one split of `dataset` (default: the run's own), as
    the latest `probe_run` left them in the cache: ({layer: float32 (N, n_embd)}, labels (N,)).
    `layers`: read only these (a big model's cache holds gigabytes; None reads all).

    Nothing runs the model: None when that checkpoint and split were not probed with the stored
    table's settings (or were probed before the cache kept labels): run `igpt probe` first.
    """
    run = as_run(run, runs_dir)
    table = load_probe_results(run, dataset)
    if table is None or split not in table.data_hashes or step not in run.checkpoints():
        return None
    settings = table.settings
    cache = checkpoint_cache(run, step, table.dataset, settings.get("bert_masks", 0), settings.get("seed", 0),
                             settings.get("precision", "fp32"))
    found, labels = cache.read(split, table.data_hashes[split], layers)
    if not found or labels is None or (layers is not None and set(layers) - set(found)):
        return None
    return dict(sorted(found.items())), labels


class Ranks:
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


class FeatureSource:
    """Features of one model for the probe splits: from its cache, extracting only what is missing."""

    def __init__(self, cache: FeatureCache, load_model, ids: dict, labels: dict, batch_size: int, progress: bool):
        self.cache, self.load_model = cache, load_model
        self.ids, self.labels, self.batch_size, self.progress = ids, labels, batch_size, progress

    def get(self, layers: list[int], data_hashes: dict, ranks: Ranks) -> dict[str, dict[int, np.ndarray]] | None:
        """{split: {layer: (N, d)}} on rank 0 (None on the others, which only help extract)."""
        out, model = {}, None
        for split in SPLITS:
            n = len(self.ids[split])
            cached, labels = {}, None
            if ranks.rank == 0:
                cached, labels = self.cache.read(split, data_hashes[split])
                cached = {layer: x for layer, x in cached.items() if x.shape[0] == n}
            missing = ranks.share([layer for layer in layers if layer not in cached])
            if missing:
                if model is None:
                    model = self.load_model()
                share = ranks.part(n)
                feats = extract_features(model, self.ids[split][share], missing, bert_masks=self.cache.bert_masks,
                                         seed=self.cache.seed, offset=share.start, batch_size=self.batch_size,
                                         precision=self.cache.precision, progress=self.progress,
                                         desc=f"{self.cache.tag} {split}")
                feats = ranks.gather(feats, n)
                if ranks.rank == 0:
                    cached.update({layer: feats[i] for i, layer in enumerate(missing)})
            if ranks.rank == 0 and (missing or labels is None):  # files from before labels were kept gain them
                self.cache.write(split, data_hashes[split], cached, self.labels[split])
            out[split] = {layer: cached[layer] for layer in layers} if ranks.rank == 0 else None
        return out if ranks.rank == 0 else None
