"""Tokenised shards: a dataset's palette ids on disk, read through memory maps, for data larger than memory.

`tokenize` walks a dataset split by split (`data.open_dataset` reads it in batches), maps every image
to palette ids at one resolution, and writes a folder (built under a temporary name, then renamed,
so a folder that exists is complete):

    DIR/index.json        what the ids are: resolution, palette fingerprint, dataset, classes, and
                          per split its size, shard files, labels file and colour counts
    DIR/palette.json      the palette the ids refer to
    DIR/train-00000.npy   uint16 (n, resolution²) palette ids in raster order, one row per image
    DIR/train-labels.npy  int64 (N,) class labels, when the dataset has them

`open_shards` reads the folder back; `ShardSplit[indices]` reads just those rows from the memory-mapped
shards, so training holds one batch of ids in memory, not the dataset (`igpt train --dataset shards:DIR`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import SHARDS_PREFIX, SPLITS, _parse_name, open_dataset
from .errors import DatasetError
from .palette import Palette

FORMAT, VERSION = "igpt-shards", 1
SHARD_BYTES = 256 << 20  # ~256 MB a shard: few files for ImageNet, and each one easy to copy
PALETTE_SAMPLE = 10_000  # training images sampled to fit a palette (Palette.fit then samples their pixels)


def palette_fingerprint(palette: Palette) -> str:
    """A short hash of the palette's colours: ids from two palettes mean different colours."""
    return hashlib.sha256(np.ascontiguousarray(palette.clusters, dtype="<f4").tobytes()).hexdigest()[:16]


def shards_path(dataset: str) -> Path | None:
    """The folder of a `shards:DIR` dataset name, or None for other names."""
    if not str(dataset).strip().lower().startswith(SHARDS_PREFIX):
        return None
    return _parse_name(dataset)[1]


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(s) for s in streams.values()), desc=f"tokenising {dataset}", unit="image",
                       dynamic_ncols=True)
        index = {"format": FORMAT, "version": VERSION, "dataset": dataset, "seed": seed, "resolution": size,
                 "tokens_per_image": tokens, "n_colors": len(palette), "palette_fingerprint": palette_fingerprint(palette),
                 "classes": next(iter(streams.values())).classes, "splits": {}}
        for split in splits:  # popped: a finished split's stream (and a source file it caches) is let go
            index["splits"][split] = _write_split(tmp, split, streams.pop(split), palette, size, shard_images, bar)
        if bar is not None:
            bar.close()
        palette.save(tmp / "palette.json")
        (tmp / "index.json").write_text(json.dumps(index, indent=1))  # last: marks the folder complete
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


@dataclass
class ShardSplit:
    """One split of a shards folder: ids read row by row from memory-mapped uint16 files."""

    name: str
    arrays: list[np.ndarray]  # np.memmap (n_i, T) uint16, one per shard
    labels: np.ndarray | None  # int64 (N,), memory-mapped too
    color_counts: np.ndarray  # how often each palette id occurs in the split

    def __post_init__(self):
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, indices) -> torch.Tensor:
        """Rows at `indices` (any order) as an int64 tensor (n, T): what the in-memory ids would give."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"rows {indices.min()}..{indices.max()} asked of the {len(self)} of split {self.name}")
        out = np.empty((len(indices), self.arrays[0].shape[1] if self.arrays else 0), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = self.arrays[shard][indices[rows] - self.starts[shard]]
        return torch.from_numpy(out)


@dataclass
class Shards:
    """A folder written by `tokenize`."""

    path: Path
    index: dict
    palette: Palette

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    @property
    def classes(self) -> list[str] | None:
        return self.index["classes"]

    def check_palette(self, palette: Palette, who: str) -> None:
        """Refuse ids made with another palette than `who`'s (they would mean other colours)."""
        if palette_fingerprint(palette) != self.index["palette_fingerprint"]:
            raise DatasetError(
                f"the shards in {self.path} were tokenised with palette {self.index['palette_fingerprint']} "
                f"({self.index['n_colors']} colours) but {who} uses palette {palette_fingerprint(palette)} "
                f"({len(palette)} colours): tokenise again with --palette set to it, or use the matching shards")

    def split(self, name: str) -> ShardSplit:
        entry = self.index["splits"].get(name)
        if entry is None:
            raise DatasetError(f"{self.path} has no {name} split (it has {', '.join(self.index['splits'])}): "
                               f"tokenise again with {name} among --splits")
        arrays = [self._open(entry_["file"], np.uint16, (entry_["images"], self.index["tokens_per_image"]))
                  for entry_ in entry["shards"]]
        labels = self._open(entry["labels"], np.int64, (entry["images"],)) if entry["labels"] else None
        return ShardSplit(name, arrays, labels, np.asarray(entry["color_counts"], dtype=np.int64))

    def _open(self, file: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        path = self.path / file
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            raise DatasetError(f"{path} could not be read ({err}); it may be truncated: tokenise again") from None
        if array.dtype != dtype or array.shape != shape:
            raise DatasetError(f"{path} holds {array.dtype} {array.shape}, but {self.path / 'index.json'} says "
                               f"{np.dtype(dtype)} {shape}: the folder is damaged; tokenise again")
        return array


def open_shards(path: str | Path) -> Shards:
    """Read a shards folder's index and palette (the ids stay on disk until a split is read)."""
    path = Path(path).expanduser()
    index_file = path / "index.json"
    if not index_file.is_file():
        raise DatasetError(f"no shards at {path} (no index.json): write them with `igpt tokenize DATASET --out {path}`")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise DatasetError(f"{index_file} is not valid JSON ({err}): tokenise again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DatasetError(f"{index_file} is not an index of igpt shards (format {FORMAT} version {VERSION})")
    palette = Palette.load(path / "palette.json")
    shards = Shards(path, index, palette)
    shards.check_palette(palette, f"its own {path / 'palette.json'}")
    return shards
