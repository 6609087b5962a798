"""Tokenised shards: a dataset's palette ids on disk, read through memory maps, for data larger than memory.

`igpt tokenize` (tokenizer.py) writes a folder (built under a temporary name, then renamed, so a
folder that exists is complete):

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError
from ..palette import Palette
from .core import ImageRows
from .registry import Request, register

SHARDS_PREFIX = "shards:"
FORMAT, VERSION = "igpt-shards", 1


def palette_fingerprint(palette: Palette) -> str:
    """A short hash of the palette's colours: ids from two palettes mean different colours."""
    return hashlib.sha256(np.ascontiguousarray(palette.clusters, dtype="<f4").tobytes()).hexdigest()[:16]


def shards_path(dataset: str) -> Path | None:
    """The folder of a `shards:DIR` dataset name, or None for other names."""
    text = str(dataset).strip()
    if not text.lower().startswith(SHARDS_PREFIX):
        return None
    if not text[len(SHARDS_PREFIX) :]:
        raise DatasetError("shards: needs the folder written by `igpt tokenize`, e.g. shards:data/imagenet32-512")
    return Path(text[len(SHARDS_PREFIX) :]).expanduser()


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


@register("shards:DIR", "palette ids written by `igpt tokenize`, in their palette's colours (training streams them from disk)",
          prefix="shards:", example="the folder written by `igpt tokenize`, e.g. shards:data/imagenet32-512")
def _load_shards(request: Request):
    """Tokenised shards as images: each id shown as its palette colour, so every command can read them.
    Re-encoding with the same palette gives the same ids back; other palettes see a quantised image."""
    shards = open_shards(Path(request.argument).expanduser())
    split = shards.split(request.split)
    side = shards.resolution

    def part(array):
        return len(array), lambda local: shards.palette.decode(np.asarray(array[local]), side)

    labels = None if split.labels is None else np.asarray(split.labels)
    return ImageRows([part(array) for array in split.arrays], side), labels, shards.classes
