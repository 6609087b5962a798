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
# The table of answers is filled a finest cell at a time: 2^(3 * CELLS[-1]) colours (64), side by side.
CELLS = (6, 4, 2)


def _table_positions() -> np.ndarray:
    """(3, 256): where each channel value puts a colour in the table, OR-ed over the channels.

    The table is laid out cell by cell so that filling a finest cell is one row of 64 entries: the
    flat index of the colour's finest cell in the high 18 bits, its place inside the cell in the low 6.
    """
    fine, value = CELLS[-1], np.arange(256)
    cell, inside = value >> fine, value & ((1 << fine) - 1)
    return np.stack([(cell << (3 * fine + 2 * (8 - fine))) | (inside << 2 * fine),
                     (cell << (3 * fine + 8 - fine)) | (inside << fine),
                     (cell << 3 * fine) | inside]).astype(np.int32)


_POSITIONS = _table_positions()


class Palette:
    """k colours in [-1, 1]; `quantize` maps uint8 RGB to ids, `dequantize` maps ids back."""

    def __init__(self, clusters):
        clusters = np.asarray(clusters, dtype=np.float32)
        if clusters.ndim != 2 or clusters.shape[1] != 3 or len(clusters) < 2:
            raise IgptError(f"a palette needs a (k, 3) array of colours with k >= 2, got shape {clusters.shape}")
        if not np.isfinite(clusters).all():
            raise IgptError("the palette holds non-finite colours; re-fit it")
        self.clusters = clusters
        self._table = None  # nearest-colour id + 1 per 24-bit colour (laid out by _POSITIONS), filled a cell at a time
        # per coarse level of CELLS: (candidates per cell (-1: not computed yet), their ids (cells, widest))
        self._cells = [(np.full(1 << 3 * (8 - bits), -1), np.zeros((1 << 3 * (8 - bits), 0), np.int16)) for bits in CELLS[:-1]]
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

        A table over all 2^24 colours remembers the answer for every colour seen so far, and for
        its neighbours: a new colour's whole finest cell of the RGB cube is answered at once
        (`_fill`), because photos meet their neighbours soon after. A batch then costs one
        vectorised lookup plus the cells it meets for the first time.
        Ties go to the lower id, as with argmin in Hugging Face's processor.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[-1:] != (3,):
            raise IgptError(f"quantize takes uint8 RGB arrays (..., 3), got {images.dtype} {images.shape}")
        rgb = images.reshape(-1, 3)
        # mode="clip" only skips take's bounds checks: every index here is in range by construction
        position = np.take(_POSITIONS[0], rgb[:, 0], mode="clip")
        position |= np.take(_POSITIONS[1], rgb[:, 1], mode="clip")
        position |= np.take(_POSITIONS[2], rgb[:, 2], mode="clip")
        with self._lock:  # apps quantise from several threads; the table is filled by one at a time
            if self._table is None:
                self._table = np.zeros(256**3, dtype=np.int16)  # 32 MB of id + 1 (0: not computed yet), zeroed lazily by the OS
            ids = np.take(self._table, position, mode="clip")
            missing = ids == 0
            if missing.any():
                wanted = position[missing]
                cells = np.sort(wanted >> 3 * CELLS[-1])
                self._fill(cells[np.r_[True, cells[1:] != cells[:-1]]])  # distinct (faster than np.unique's hashing)
                ids[missing] = np.take(self._table, wanted, mode="clip")
        return (ids.astype(np.int64) - 1).reshape(images.shape[:-1])

    def _fill(self, flat: np.ndarray) -> None:
        """Write the nearest-colour ids of every colour of distinct finest cells (flat indices) not
        filled yet, by exact float64 distances.

        Comparing every colour with all k centres costs k distances each. Instead each cell keeps
        only the centres that can be nearest to one of its colours (`_cell_candidates`). Many cells
        have one (half of those the bundled photos meet, with 512 random colours), and their
        colours need no distance at all; the others compare their few candidates exactly, colour
        by colour. Pruning never changes the answer, ties included: candidate ids are kept
        ascending and only a strictly smaller distance wins.
        """
        fine = CELLS[-1]
        side = 1 << (8 - fine)  # finest cells along one channel
        cells = np.stack([flat // (side * side), flat // side % side, flat % side], axis=1)
        candidates, counts = self._cell_candidates(cells)
        cell_rows = self._table.reshape(len(self._table) >> 3 * fine, -1)  # a view: one row per finest cell
        single = counts == 1
        cell_rows[flat[single]] = candidates[single, :1] + 1
        order = np.argsort(counts.astype(np.uint16), kind="stable")  # cells grouped by candidate count
        ends = np.searchsorted(counts[order], np.arange(1, counts.max() + 1), side="right")
        for width, (start, end) in enumerate(zip(ends[:-1], ends[1:]), start=2):
            for begin in range(start, end, 4096):  # a few MB of distances at a time
                group = order[begin : min(end, begin + 4096)]
                cell_rows[flat[group]] = self._nearest_in_cells(cells[group], candidates[group, :width]).T + 1

    def _nearest_in_cells(self, cells: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """For finest cells (n, 3) and their candidate ids (n, w), ascending: the nearest of them to
        each colour of each cell, (cell's colours, n) in table order."""
        side, n = 1 << CELLS[-1], len(cells)
        ids = np.ascontiguousarray(choice.T)  # (w, n): cells are the last axis (long inner loops), rows broadcast fast
        centers = self.clusters.astype(np.float64)
        # Squared distances are sums over channels, so each channel's (w, values, n) part is computed
        # once and a cell's colours add them up, red + green first, then blue: the order of a
        # per-colour sum, so the same float64 numbers.
        values = (cells.T[:, None, :] * side + np.arange(side)[None, :, None]) / 127.5 - 1.0  # (3, values, n)
        along = [np.square(values[c][None] - centers[ids, c][:, None, :]) for c in range(3)]
        red_green = np.empty((side, side, n))
        best, distance = np.empty((2, side * side, side, n))
        closer = np.empty((side**3, n), dtype=bool)
        nearest = np.repeat(ids[:1], side**3, axis=0)
        change = np.empty_like(nearest)
        for j in range(len(ids)):
            np.add(along[0][j][:, None], along[1][j][None], out=red_green)
            np.add(red_green.reshape(-1, 1, n), along[2][j][None], out=best if j == 0 else distance)
            if j:
                np.less(distance.reshape(-1, n), best.reshape(-1, n), out=closer)  # equals keep the earlier, lower id
                # nearest = where(closer, ids[j], nearest), in arithmetic: several times faster than where
                np.subtract(ids[j], nearest, out=change)
                np.multiply(change, closer, out=change)
                nearest += change
                if j < len(ids) - 1:
                    np.minimum(best, distance, out=best)
        return nearest

    def _cell_candidates(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate centre ids of distinct finest cells (n, 3): (n, widest) ids, ascending and first
        in each row (then -1), and how many each (n,).

        A cell's list comes from its parent cell's, which holds every candidate of its children.
        The coarser levels' lists are kept (a coarse cell has many children); the finest are used
        once, when their cell is filled.
        """
        ids = np.arange(len(self.clusters), dtype=np.int16)[None]
        parent_of = np.zeros(len(cells), dtype=np.intp)  # row of each cell's parent in ids
        for level, bits in enumerate(CELLS[:-1]):
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
        return self._box_candidates(cells << CELLS[-1], CELLS[-1], ids[parent_of])

    @staticmethod
    def _cell_index(cells: np.ndarray, bits: int) -> np.ndarray:
        """Finest-level cells (n, 3) -> the flat index of the level-`bits` cell holding each."""
        cell = cells >> (bits - CELLS[-1])
        return (cell[:, 0] << 2 * (8 - bits)) | (cell[:, 1] << (8 - bits)) | cell[:, 2]

    def _box_candidates(self, first: np.ndarray, bits: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of centre ids `pool` (m, w) (ascending, then -1; at least one per row), those that can be
        nearest to a colour of the box of 2^bits values per channel starting at `first` (m, 3), in
        the same layout, and how many each.

        A centre can be the nearest to some colour of a box only if its distance to the box is at
        most the smallest, over centres, of their distance to the box's farthest corner. The
        centre with that smallest distance passes, so every box keeps one. Float32, with a margin
        for its rounding: an extra candidate only costs a distance.
        """
        rows, cols = np.nonzero(pool >= 0)  # row by row: the rows are padded to the widest
        ids = pool[rows, cols]
        half = np.float32(((1 << bits) - 1) / 255.0)  # half the box's side in [-1, 1] units
        middle = ((first.T + ((1 << bits) - 1) / 2) / 127.5 - 1.0).astype(np.float32)  # (3, m)
        near = far = 0
        for channel, center in enumerate(self.clusters.T):
            offset = np.abs(center[ids] - middle[channel][rows])
            near = near + np.square(np.maximum(offset - half, 0))  # to the box's nearest point
            far = far + np.square(offset + half)  # to its farthest corner
        counts = np.bincount(rows, minlength=len(pool))
        bound = np.minimum.reduceat(far, np.cumsum(counts) - counts) * (1 + 1e-5) + 1e-6
        keep = near <= bound[rows]
        rows, ids = rows[keep], ids[keep]
        counts = np.bincount(rows, minlength=len(pool))
        found = np.full((len(pool), counts.max()), -1, dtype=np.int16)
        found[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = ids
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
