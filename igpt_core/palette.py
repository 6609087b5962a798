"""The colour palette: k colours found by k-means, and the image <-> palette-id mapping.

iGPT cannot afford one token per RGB sub-pixel, so each pixel becomes the id of its nearest palette
colour (the paper's "9-bit palette" has k = 512). Colours are kept the way OpenAI and Hugging Face
keep them: a (k, 3) float array in [-1, 1], pixel = x / 127.5 - 1, back to RGB by rint(127.5 (c + 1)).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import IgptError
from .files import atomic_write_text
from .images import resize

# The nearest-colour search cuts the RGB cube into cells of 2^bits values per channel, coarse to fine.
CELLS = (6, 4, 2)


class Palette:
    """k colours in [-1, 1]; `quantize` maps uint8 RGB to ids, `dequantize` maps ids back."""

    def __init__(self, clusters):
        clusters = np.asarray(clusters, dtype=np.float32)
        if clusters.ndim != 2 or clusters.shape[1] != 3 or len(clusters) < 2:
            raise IgptError(f"a palette needs a (k, 3) array of colours with k >= 2, got shape {clusters.shape}")
        if not np.isfinite(clusters).all():
            raise IgptError("the palette holds non-finite colours; re-fit it")
        self.clusters = clusters
        self._table = None  # nearest-colour id + 1 per packed 24-bit RGB value, filled as colours are seen
        # per level of CELLS: (candidates per cell (-1: not computed yet), their ids (cells, widest))
        self._cells = [(np.full(1 << 3 * (8 - bits), -1), np.zeros((1 << 3 * (8 - bits), 0), np.int16)) for bits in CELLS]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.clusters)

    def __repr__(self) -> str:
        return f"Palette({len(self)} colours)"

    def __eq__(self, other) -> bool:
        return isinstance(other, Palette) and np.array_equal(self.clusters, other.clusters)

    @property
    def colors(self) -> np.ndarray:
        """The palette as uint8 RGB, (k, 3)."""
        return np.clip(np.rint(127.5 * (self.clusters.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)

    # -- fitting -----------------------------------------------------------------------------------

    @classmethod
    def fit(cls, images: np.ndarray, k: int = 512, *, max_pixels: int = 200_000, seed: int = 0) -> Palette:
        """k-means over (a random sample of) the RGB pixels of uint8 images (..., 3).

        If the images hold k or fewer distinct colours, those colours are the palette (k-means
        would only re-find them) and the palette is padded with unused copies of the last colour.
        """
        from sklearn.cluster import KMeans  # imported here: fitting is rare, import is slow

        pixels = np.asarray(images, dtype=np.uint8).reshape(-1, 3)
        rng = np.random.default_rng(seed)
        if len(pixels) > max_pixels:
            pixels = pixels[rng.choice(len(pixels), max_pixels, replace=False)]
        unique = np.unique(pixels, axis=0)
        if len(unique) <= k:
            chosen = np.concatenate([unique, np.repeat(unique[-1:], k - len(unique), axis=0)])
            return cls(chosen / 127.5 - 1.0)
        from threadpoolctl import threadpool_limits

        kmeans = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100)
        # One thread: k-means sums in a thread-dependent order, and a palette must not depend on the
        # machine's thread count (torchrun's processes run with 1, a plain `igpt train` with all cores).
        with threadpool_limits(limits=1):
            kmeans.fit(pixels.astype(np.float32) / 127.5 - 1.0)
        # Sort by brightness so palettes print and plot in a sensible order.
        centers = kmeans.cluster_centers_[np.argsort(kmeans.cluster_centers_.sum(axis=1), kind="stable")]
        return cls(centers)

    # -- mapping -----------------------------------------------------------------------------------

    def quantize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., 3) -> int64 palette ids (...): the nearest colour by squared distance.

        A table over the packed 24-bit colour remembers the answer for every colour seen so far, so
        a batch costs one vectorised lookup plus distances for its new colours only (`_nearest`).
        Ties go to the lower id, as with argmin in Hugging Face's processor.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[-1:] != (3,):
            raise IgptError(f"quantize takes uint8 RGB arrays (..., 3), got {images.dtype} {images.shape}")
        packed = (images[..., 0].astype(np.int32) << 16) | (images[..., 1].astype(np.int32) << 8) | images[..., 2]
        with self._lock:  # apps quantise from several threads; the table is filled by one at a time
            if self._table is None:
                self._table = np.zeros(256**3, dtype=np.int16)  # 32 MB of id + 1 (0: not computed yet), zeroed lazily by the OS
            ids = self._table[packed]
            missing = ids == 0
            if missing.any():
                wanted = packed[missing]
                new = np.sort(wanted)
                new = new[np.r_[True, new[1:] != new[:-1]]]  # distinct (faster than np.unique's hashing)
                self._table[new] = self._nearest(new) + 1
                ids[missing] = self._table[wanted]
        return ids.astype(np.int64) - 1

    def _nearest(self, packed: np.ndarray) -> np.ndarray:
        """Nearest-colour ids of distinct packed 24-bit colours, by exact float64 distances.

        Comparing every colour with all k centres costs k distances each, and a first call on new
        photos meets ~200 new colours per image. Instead the RGB cube is cut into cells (`CELLS`):
        a centre can be the nearest to some colour of a cell only if its distance to the cell's box
        is at most the smallest, over centres, of their farthest distance from the box. Those few
        candidates are all that is compared, exactly. Pruning never changes the answer, ties
        included: candidate ids are kept ascending and argmin takes the first of equals.
        """
        rgb = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1)
        candidates, counts = self._candidates(rgb >> CELLS[-1])
        x = rgb / 127.5 - 1.0  # float64, as the centres below
        centers = self.clusters.T.astype(np.float64)  # (3, k): one channel at a time is faster than (n, w, 3) arrays
        out = candidates[:, 0].copy()  # right wherever a cell has a single candidate
        order = np.argsort(counts.astype(np.uint16), kind="stable")  # colours grouped by candidate count
        ends = np.searchsorted(counts[order], np.arange(1, counts.max() + 1), side="right")
        for width, (start, end) in enumerate(zip(ends[:-1], ends[1:]), start=2):
            for begin in range(start, end, (1 << 20) // width):  # ~1M distances at a time
                rows = order[begin : min(end, begin + (1 << 20) // width)]
                choice = candidates[rows, :width]  # (n, width) centre ids
                distance = sum(np.square(x[rows, channel, None] - centers[channel][choice]) for channel in range(3))
                out[rows] = choice[np.arange(len(rows)), distance.argmin(1)]
        return out

    def _candidates(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate centre ids for cells (n, 3) of the finest level: (n, widest) ids, ascending and
        first in each row (then -1), and how many each (n,). Each cell's list is computed once per
        palette from its parent cell's, which holds every candidate of its children; only cells
        met for the first time go through the coarser levels."""
        counts, ids = self._cells[-1]
        index = self._cell_index(cells, CELLS[-1])
        new = np.unique(index[counts[index] < 0])  # flat indices, turned back into cells below: faster than return_index
        if len(new):
            side = 1 << (8 - CELLS[-1])  # the finest cells of one channel
            self._add_cells(np.stack([new // (side * side), new // side % side, new % side], axis=1))
            counts, ids = self._cells[-1]
        return ids[index], counts[index]

    @staticmethod
    def _cell_index(cells: np.ndarray, bits: int) -> np.ndarray:
        """Finest-level cells (n, 3) -> the flat index of the level-`bits` cell holding each."""
        cell = cells >> (bits - CELLS[-1])
        return (cell[:, 0] << 2 * (8 - bits)) | (cell[:, 1] << (8 - bits)) | cell[:, 2]

    def _add_cells(self, cells: np.ndarray) -> None:
        """Compute the candidates of distinct finest-level cells (n, 3) not computed yet, level by level."""
        ids = np.arange(len(self.clusters), dtype=np.int16)[None]
        parent_of = np.zeros(len(cells), dtype=np.intp)  # row of each cell's parent in ids
        for level, bits in enumerate(CELLS):
            index = self._cell_index(cells, bits)
            known_counts, known_ids = self._cells[level]
            unseen = np.flatnonzero(known_counts[index] < 0)
            if len(unseen):  # cells met for the first time: their candidates, from their parents'
                todo, first = np.unique(index[unseen], return_index=True)
                first = unseen[first]  # one finest cell in each new cell
                corner = (cells[first] >> (bits - CELLS[-1])) << bits
                found, found_counts = self._box_candidates(corner, bits, ids[parent_of[first]])
                if found.shape[1] > known_ids.shape[1]:
                    known_ids = np.pad(known_ids, ((0, 0), (0, found.shape[1] - known_ids.shape[1])), constant_values=-1)
                known_ids[todo, : found.shape[1]] = found
                known_counts[todo] = found_counts
                self._cells[level] = (known_counts, known_ids)
            ids, parent_of = known_ids, index

    def _box_candidates(self, first: np.ndarray, bits: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of centre ids `pool` (m, w) (-1: none), those that can be nearest to a colour of the box of
        2^bits values per channel starting at `first` (m, 3). Float32, with a margin for its
        rounding: an extra candidate only costs a distance."""
        half = np.float32(((1 << bits) - 1) / 255.0)  # half the box's side in [-1, 1] units
        middle = ((first + ((1 << bits) - 1) / 2) / 127.5 - 1.0).astype(np.float32)  # (m, 3)
        near = far = 0
        for channel, center in enumerate(self.clusters.T):
            offset = np.abs(center[pool] - middle[:, channel, None])  # (m, w)
            near = near + np.square(np.maximum(offset - half, 0))  # to the box's nearest point
            far = far + np.square(offset + half)  # to its farthest corner
        far[pool < 0] = np.inf
        rows, cols = np.nonzero((near <= far.min(axis=1, keepdims=True) * (1 + 1e-5) + 1e-6) & (pool >= 0))
        counts = np.bincount(rows, minlength=len(pool))
        found = np.full((len(pool), counts.max()), -1, dtype=np.int16)
        found[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = pool[rows, cols]
        return found, counts

    def dequantize(self, ids) -> np.ndarray:
        """Palette ids (...) -> uint8 RGB (..., 3)."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IgptError(f"palette ids must lie in 0..{len(self) - 1}, got {ids.min()}..{ids.max()}")
        return self.colors[ids]

    def encode(self, images: np.ndarray, size: int) -> np.ndarray:
        """uint8 images (N, H, W, 3) -> ids (N, size²) in raster order, resizing as Hugging Face does."""
        images = resize(np.asarray(images), size)
        return self.quantize(images).reshape(len(images), size * size)

    def decode(self, ids, size: int) -> np.ndarray:
        """ids (N, size²) -> uint8 images (N, size, size, 3)."""
        return self.dequantize(ids).reshape(-1, size, size, 3)

    def view(self, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a model of side `size` sees of one uint8 (H, W, 3) image.

        Returns (the image resized to size × size, its palette ids (size²,) in raster order, and
        those ids drawn in the palette's colours: the model's view, which the apps show).
        """
        small = resize(np.asarray(image), size)
        ids = self.quantize(small).reshape(size * size)
        return small, ids, self.decode(ids[None], size)[0]

    # -- persistence -------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"clusters": self.clusters.tolist()})

    @classmethod
    def from_json(cls, text: str) -> Palette:
        try:
            return cls(json.loads(text)["clusters"])
        except (ValueError, KeyError, TypeError) as err:
            raise IgptError(f"the palette data is not valid ({err}); re-create the run") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        path = Path(path)
        if not path.exists():
            raise IgptError(f"no palette file at {path}")
        return cls.from_json(path.read_text())
