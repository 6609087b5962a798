"""`igpt tokenize`: a dataset's palette ids written once as shards (format: shards.py).

`tokenize` walks a dataset split by split (`data.open_dataset` reads it in batches, so it may be
larger than memory), maps every image to palette ids at one resolution, and writes the shards in a
folder built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import SPLITS, open_dataset
from .errors import DatasetError
from .files import building_folder
from .palette import Palette
from .progress import progress_bar
from .data.shards import FORMAT, VERSION, Shards, open_shards, palette_fingerprint

SHARD_BYTES = 256 << 20  # ~256 MB a shard: few files for ImageNet, and each one easy to copy
PALETTE_SAMPLE = 10_000  # training images sampled to fit a palette (Palette.fit then samples their pixels)


def fit_palette(dataset: str, n_colors: int, *, data_dir=None, seed: int = 0, resolution: int | None = None) -> Palette:
    """k-means palette on up to PALETTE_SAMPLE training images drawn with `seed` (reads only those)."""
    stream = open_dataset(dataset, "train", data_dir=data_dir, seed=seed, resolution=resolution)
    count = min(len(stream), PALETTE_SAMPLE)
    picks = np.sort(np.random.default_rng(seed).choice(len(stream), size=count, replace=False))
    return Palette.fit(stream.take(picks), n_colors, seed=seed)


def tokenize(dataset: str, palette: Palette, out: str | Path, *, resolution: int | None = None,
             splits=SPLITS, data_dir=None, seed: int = 0, download: bool = False, shard_images: int | None = None,
             overwrite: bool = False, progress: bool = True) -> Shards:
    """Write the palette ids of `splits` of `dataset` as shards in folder `out` (see the module's doc)."""
    out = Path(out).expanduser()
    splits = tuple(dict.fromkeys(splits))  # each once, in the order given
    if not splits:
        raise DatasetError(f"no splits to tokenise: name some of {', '.join(SPLITS)}")
    if len(palette) > 1 << 16:
        raise DatasetError(f"a palette of {len(palette)} colours does not fit uint16 ids (at most 65536)")
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    streams = {s: open_dataset(dataset, s, data_dir=data_dir, seed=seed, resolution=resolution, download=download)
               for s in splits}
    size = resolution or streams[splits[0]].resolution
    tokens = size * size
    shard_images = shard_images or max(1, SHARD_BYTES // (2 * tokens))
    index = {"format": FORMAT, "version": VERSION, "dataset": dataset, "seed": seed, "resolution": size,
             "tokens_per_image": tokens, "n_colors": len(palette), "palette_fingerprint": palette_fingerprint(palette),
             "classes": streams[splits[0]].classes, "splits": {}}
    bar = progress_bar(progress, total=sum(len(s) for s in streams.values()), desc=f"tokenising {dataset}", unit="image")
    with building_folder(out, replace=overwrite) as tmp:
        for split in splits:  # popped: a finished split's stream (and a source file it caches) is let go
            index["splits"][split] = _write_split(tmp, split, streams.pop(split), palette, size, shard_images, bar)
        palette.save(tmp / "palette.json")
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
    if bar is not None:
        bar.close()
    return open_shards(out)


def _write_split(folder: Path, split: str, stream, palette: Palette, size: int, shard_images: int, bar) -> dict:
    """Write one split's shards (and labels) into folder; returns its entry of index.json."""
    counts = np.zeros(len(palette), dtype=np.int64)
    shards, shard, filled = [], None, 0
    for images in stream.batches(min(1024, shard_images)):
        ids = palette.encode(images, size).astype(np.uint16)
        counts += np.bincount(ids.ravel(), minlength=len(palette))
        while len(ids):
            if shard is None or filled == len(shard):
                name = f"{split}-{len(shards):05d}.npy"
                n = min(shard_images, len(stream) - sum(entry["images"] for entry in shards))
                shard = np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.uint16, shape=(n, size * size))
                shards.append({"file": name, "images": n})
                filled = 0
            take = min(len(ids), len(shard) - filled)
            shard[filled : filled + take] = ids[:take]
            filled, ids = filled + take, ids[take:]
            if filled == len(shard):
                shard.flush()
        if bar is not None:
            bar.update(len(images))
    if shard is not None:
        shard.flush()
    labels = None
    if stream.labels is not None:
        labels = f"{split}-labels.npy"
        np.save(folder / labels, stream.labels.astype(np.int64))
    return {"images": len(stream), "shards": shards, "labels": labels, "color_counts": counts.tolist()}


