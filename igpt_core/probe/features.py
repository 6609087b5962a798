"""Probe features: each layer's mean-pooled input norm for every image, and the cache that keeps them.

The paper's feature of layer l (Chen et al. 2020, §2.4) is the mean over positions of layer_norm(h^l):
the input norm of block l, or ln_f for l = n_layer, read through the model's public `IGPT.features`.

Features are cached per checkpoint and split, one array per layer in one .npz (with the split's
labels), keyed by a hash of everything that determines them (the checkpoint file, the exact images,
the BERT mask settings):

    runs/<run>/probes/features/step_0000300-<dataset>-<split>-<hash>.npz
    runs/<run>/probes/features/random_init-<dataset>-<split>-<hash>.npz

A later call re-uses every cached layer and computes only the missing ones — in one forward pass
that stops after the deepest missing layer — so probing "all" layers once and then a subset, or
a subset then more layers, never repeats work. Under torchrun the processes split the images and
rank 0 gathers them (`Ranks`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data import SPLITS
from ..distributed import init_from_env, patient_group
from ..errors import IgptError
from ..files import atomic_write, safe_name
from ..model import IGPT
from ..progress import progress_bar
from ..runs import Run

FEATURES_FORMAT = 1


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


def fingerprint(*parts) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def read_feature_cache(path: Path) -> dict[int, np.ndarray]:
    """Cached layers {layer: (N, d)}; an unreadable file counts as empty (it will be rewritten)."""
    if not path.exists():
        return {}
    try:
        with np.load(path) as f:
            return {int(name.split("_")[1]): f[name] for name in f.files if name.startswith("layer_")}
    except (OSError, ValueError, KeyError, IndexError, EOFError):
        return {}


def write_feature_cache(path: Path, layers: dict[int, np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp path
            np.savez(f, **{f"layer_{layer}": x for layer, x in sorted(layers.items())})

    atomic_write(path, write)


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
    """Features of one model (a checkpoint or the random init) for the probe splits, via the cache."""

    def __init__(self, run: Run, tag: str, key: str, load_model, ids: dict, dataset: str,
                 bert_masks: int, seed: int, batch_size: int, progress: bool):
        self.run, self.tag, self.key, self.load_model = run, tag, key, load_model
        self.ids, self.dataset = ids, dataset
        self.bert_masks, self.seed, self.batch_size, self.progress = bert_masks, seed, batch_size, progress

    def path(self, split: str, data_hash: str) -> Path:
        h = fingerprint(FEATURES_FORMAT, self.key, data_hash, self.bert_masks, self.seed)[:12]
        return self.run.path / "probes" / "features" / f"{self.tag}-{safe_name(self.dataset, '_') or 'dataset'}-{split}-{h}.npz"

    def get(self, layers: list[int], data_hashes: dict, ranks: Ranks) -> dict[str, dict[int, np.ndarray]] | None:
        """{split: {layer: (N, d)}} on rank 0 (None on the others, which only help extract)."""
        out, model = {}, None
        for split in SPLITS:
            path = self.path(split, data_hashes[split])
            n = len(self.ids[split])
            cached = {}
            if ranks.rank == 0:
                cached = {layer: x for layer, x in read_feature_cache(path).items() if x.shape[0] == n}
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
                    write_feature_cache(path, cached)
            out[split] = {layer: cached[layer] for layer in layers} if ranks.rank == 0 else None
        return out if ranks.rank == 0 else None


def checkpoint_key(run: Run, step: int) -> str:
    stat = run.checkpoint_path(step).stat()
    return f"step={step};size={stat.st_size};mtime={stat.st_mtime_ns}"

