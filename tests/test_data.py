"""Tests for igpt_core.data (the package): every source is exercised on tiny files written here in the real format.

Nothing touches the network: an autouse fixture makes urllib fail loudly, and the download tests
replace it with fakes that serve bytes made in the test, or with urllib itself talking to a local
HTTP server started by the test (`local_server`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from igpt_core import data
from igpt_core.data import DATASETS, Dataset, default_data_dir, load_dataset
from igpt_core.data import bundled as bundled_source
from igpt_core.data import cifar as cifar_source
from igpt_core.data import idx as idx_source
from igpt_core.data import stl10 as stl10_source
from igpt_core.data.registry import SOURCES, register
from igpt_core.data.splits import split_indices
from igpt_core.errors import DatasetError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
KNOWN_YX, KNOWN_RGB = (2, 5), (200, 100, 50)


REAL_URLOPEN = urllib.request.urlopen


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------ CIFAR helpers


def cifar_rows(ids) -> np.ndarray:
    """Channel-first CIFAR rows (1024 R, 1024 G, 1024 B): pixel (0, 0) has R = id, and one known pixel."""
    rows = np.zeros((len(ids), 3072), dtype=np.uint8)
    y, x = KNOWN_YX
    for r, image_id in enumerate(ids):
        rows[r, 0] = image_id  # R at (0, 0)
        for c, value in enumerate(KNOWN_RGB):
            rows[r, c * 1024 + y * 32 + x] = value
    return rows


def write_pickle(path: Path, obj, *, old_numpy: bool = False) -> None:
    blob = pickle.dumps(obj, protocol=2)
    if old_numpy:
        # Files written under numpy 1.x (like the official ones) name numpy.core, not numpy._core.
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in blob
    path.write_bytes(blob)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 3) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        ids = list(range(1 + b * per_batch, 1 + (b + 1) * per_batch))
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": [i % 10 for i in ids],
            b"data": cifar_rows(ids),
            b"filenames": [f"img_{i}.png".encode() for i in ids],
        }
        write_pickle(folder / f"data_batch_{b + 1}", batch, old_numpy=(b == 0))
    test_ids = list(range(101, 101 + n_test))
    write_pickle(folder / "test_batch", {b"labels": [i % 10 for i in test_ids], b"data": cifar_rows(test_ids)})
    write_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return folder


def make_cifar100(root: Path, n_train: int = 20, n_test: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, ids in (("train", range(1, 1 + n_train)), ("test", range(101, 101 + n_test))):
        ids = list(ids)
        write_pickle(
            folder / name,
            {
                b"fine_labels": [(i * 7) % 100 for i in ids],
                b"coarse_labels": [i % 20 for i in ids],
                b"data": cifar_rows(ids),
            },
        )
    names = [f"class{k:02d}".encode() for k in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    return folder


# -------------------------------------------------------------------------------------- CIFAR


def test_cifar10_test_split_layout_labels_and_classes(tmp_path):
    make_cifar10(tmp_path)
    ds = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert ds.images.shape == (3, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.resolution == 32 and len(ds) == 3
    y, x = KNOWN_YX
    assert (ds.images[:, y, x] == KNOWN_RGB).all()  # channel order R, G, B at the right (y, x)
    assert (ds.images[:, x, y] == 0).all()  # not transposed spatially
    assert ds.images[:, 0, 0, 0].tolist() == [101, 102, 103]  # official order kept
    assert ds.images.reshape(3, -1).sum(axis=1).tolist() == [101 + 350, 102 + 350, 103 + 350]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [1, 2, 3]
    assert ds.classes == CIFAR10_NAMES
    assert ds.name == "cifar10" and ds.split == "test"


def test_cifar10_val_is_10_percent_of_train_disjoint_and_seeded(tmp_path):
    make_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    val = load_dataset("cifar10", "val", data_dir=tmp_path)
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert len(train_ids) == 18 and len(val_ids) == 2
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(1, 21))
    for ds in (train, val):  # each label travels with its own image
        assert ds.labels.tolist() == [i % 10 for i in ds.images[:, 0, 0, 0].tolist()]
    again = load_dataset("cifar10", "val", data_dir=tmp_path)
    assert np.array_equal(again.images, val.images)
    other_vals = {tuple(load_dataset("cifar10", "val", data_dir=tmp_path, seed=s).images[:, 0, 0, 0]) for s in range(6)}
    assert len(other_vals) > 1  # the seed changes the split


def test_cifar100_uses_fine_labels(tmp_path):
    make_cifar100(tmp_path)
    test = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert test.images.shape == (4, 32, 32, 3)
    assert test.labels.tolist() == [(i * 7) % 100 for i in range(101, 105)]
    assert len(test.classes) == 100 and test.classes[7] == "class07"
    train = load_dataset("cifar100", "train", data_dir=tmp_path)
    val = load_dataset("cifar100", "val", data_dir=tmp_path)
    assert (len(train), len(val)) == (18, 2)
    ids = train.images[:, 0, 0, 0].tolist() + val.images[:, 0, 0, 0].tolist()
    assert sorted(ids) == list(range(1, 21))
    assert train.labels.tolist() == [(i * 7) % 100 for i in train.images[:, 0, 0, 0].tolist()]


def test_cifar_resolution_resizes(tmp_path):
    make_cifar10(tmp_path)
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, resolution=16)
    assert ds.images.shape == (3, 16, 16, 3) and ds.resolution == 16 and ds.images.dtype == np.uint8


def test_cifar_missing_files_named(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    message = str(err.value)
    assert str(folder / "data_batch_3") in message
    assert str(folder / "data_batch_2") not in message  # only what is actually missing
    assert "download=True" in message


def test_cifar_malformed_batch(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])  # truncated
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    write_pickle(folder / "test_batch", {b"labels": [1], b"data": np.zeros((1, 100), np.uint8)})
    with pytest.raises(DatasetError, match="3072"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def python2_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch pickled the way Python 2's cPickle wrote the official files (str → SHORT_BINSTRING)."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    return (
        b"\x80\x02}(" + string(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        + b"(K\x01" + integer(len(rows)) + integer(rows.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(rows.tobytes()) + b"tb"
        + string(b"labels") + b"](" + b"".join(integer(v) for v in labels) + b"eu."
    )


def test_cifar_python2_pickle(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(python2_batch(cifar_rows([7, 8]), [3, 9]))
    ds = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert ds.images[:, 0, 0, 0].tolist() == [7, 8] and ds.labels.tolist() == [3, 9]
    assert (ds.images[:, KNOWN_YX[0], KNOWN_YX[1]] == KNOWN_RGB).all()


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(str(marker)), b"labels": []}))
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


# -------------------------------------------------------------------------------- IDX helpers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def mnist_images(ids) -> np.ndarray:
    images = np.zeros((len(ids), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = ids
    images[:, 3, 7] = 255
    return images


def make_idx(root: Path, folder_name: str, *, gz: bool, n_train: int = 20, n_test: int = 5) -> Path:
    folder = root / folder_name
    folder.mkdir(parents=True)
    sets = {"train": list(range(1, 1 + n_train)), "t10k": list(range(101, 101 + n_test))}
    for prefix, ids in sets.items():
        files = {
            f"{prefix}-images-idx3-ubyte": idx_bytes(mnist_images(ids), 0x803),
            f"{prefix}-labels-idx1-ubyte": idx_bytes(np.array(ids) % 10, 0x801),
        }
        for name, blob in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
    return folder


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name, folder, gz, classes", [
    ("mnist", "mnist", False, [str(d) for d in range(10)]),
    ("fashion-mnist", "fashion-mnist", True, FASHION_NAMES),
])
def test_idx_datasets(tmp_path, name, folder, gz, classes):
    make_idx(tmp_path, folder, gz=gz)
    test = load_dataset(name, "test", data_dir=tmp_path)
    assert test.images.shape == (5, 28, 28, 3) and test.images.dtype == np.uint8
    assert (test.images[..., 0] == test.images[..., 1]).all() and (test.images[..., 1] == test.images[..., 2]).all()
    assert test.images[:, 0, 0, 0].tolist() == [101, 102, 103, 104, 105]
    assert (test.images[:, 3, 7] == 255).all() and (test.images[:, 7, 3] == 0).all()
    assert test.labels.tolist() == [1, 2, 3, 4, 5] and test.classes == classes
    train = load_dataset(name, "train", data_dir=tmp_path)
    val = load_dataset(name, "val", data_dir=tmp_path)
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert (len(train_ids), len(val_ids)) == (18, 2)
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(1, 21))
    assert train.labels.tolist() == [i % 10 for i in train_ids]
    assert load_dataset(name, "test", data_dir=tmp_path, resolution=32).images.shape == (5, 32, 32, 3)


def test_idx_bad_magic_names_file(tmp_path):
    folder = make_idx(tmp_path, "mnist", gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(mnist_images([1, 2]), 0x804))
    with pytest.raises(DatasetError, match="magic") as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_idx_truncated_names_file(tmp_path):
    folder = make_idx(tmp_path, "mnist", gz=True)
    path = folder / "t10k-images-idx3-ubyte.gz"
    blob = idx_bytes(mnist_images([1, 2, 3]), 0x803)
    path.write_bytes(gzip.compress(blob[:-100]))  # header says 3 images, data is shorter
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert str(path) in str(err.value)
    path.write_bytes(gzip.compress(blob)[:-20])  # the gzip stream itself cut short
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_idx_images_and_labels_must_agree(tmp_path):
    folder = make_idx(tmp_path, "mnist", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2]), 0x801))
    with pytest.raises(DatasetError, match="2 labels"):
        load_dataset("mnist", "test", data_dir=tmp_path)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("cifar100", "cifar-100-python/train"),
    ("mnist", "mnist/train-images-idx3-ubyte"),
    ("fashion-mnist", "fashion-mnist/t10k-labels-idx1-ubyte"),
])
def test_missing_dataset_files(tmp_path, name, expected):
    with pytest.raises(DatasetError) as err:
        load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / expected) in message
    assert "download=True" in message and "--download" in message
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------- folder


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def banded(colour, height=20, width=40) -> np.ndarray:
    """A wide image: white bands left and right, `colour` in the centred square."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left = (width - height) // 2
    image[:, left : left + height] = colour
    return image


def test_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "pets"
    colours = {}
    for k in range(5):
        colours[f"cats/c{k}.png"] = (40 + 20 * k, 0, 0)
        colours[f"dogs/d{k}.{'bmp' if k % 2 else 'PNG'}"] = (0, 40 + 20 * k, 0)
    for rel, colour in colours.items():
        save(root / rel, banded(colour))
    (root / "dogs" / "notes.txt").write_text("not an image, ignored")
    (root / "cats" / ".hidden.png").write_bytes(b"ignored: hidden")
    splits = {s: load_dataset(f"folder:{root}", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [7, 1, 2]  # 20% test, 10% of the rest val
    seen = []
    for ds in splits.values():
        assert ds.classes == ["cats", "dogs"] and ds.images.dtype == np.uint8
        assert ds.images.shape[1:] == (32, 32, 3)
        for image, label in zip(ds.images, ds.labels):
            colour = tuple(int(v) for v in image[0, 0])
            assert (image == colour).all()  # the white bands were cropped away
            assert label == (0 if colour[0] else 1)
            seen.append(colour)
    assert sorted(seen) == sorted(colours.values())  # disjoint and complete
    again = load_dataset(f"folder:{root}", "test")
    assert np.array_equal(again.images, splits["test"].images)
    small = load_dataset(f"folder:{root}", "train", resolution=8)
    assert small.images.shape == (7, 8, 8, 3) and small.resolution == 8


def test_flat_folder_is_unlabelled(tmp_path):
    for k in range(6):
        save(tmp_path / f"img{k}.png", np.full((10, 10, 3), 30 * k, dtype=np.uint8))
    train = load_dataset(f"folder:{tmp_path}", "train")
    assert train.labels is None and train.classes is None
    sizes = [len(load_dataset(f"folder:{tmp_path}", s)) for s in ("train", "val", "test")]
    assert sizes == [4, 1, 1]


def test_folder_corrupt_image_is_named(tmp_path):
    save(tmp_path / "a" / "good.png", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "a" / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError) as err:
        load_dataset(f"folder:{tmp_path}")
    assert str(bad) in str(err.value) and "remove or fix" in str(err.value).lower()


def test_a_folder_split_reads_only_its_own_images(tmp_path):
    for k in range(9):
        save(tmp_path / f"img{k}.png", np.full((10, 10, 3), 20 * k, dtype=np.uint8))
    (tmp_path / "img9.png").write_bytes(b"not a png")  # lands in exactly one split
    loaded, refused = {}, []
    for split in ("train", "val", "test"):
        try:
            loaded[split] = len(load_dataset(f"folder:{tmp_path}", split))
        except DatasetError as err:
            assert "img9.png" in str(err)
            refused.append(split)
    sizes = {"train": 7, "val": 1, "test": 2}  # of 10 images: 20% test, 10% of the rest val
    assert len(refused) == 1 and loaded == {split: n for split, n in sizes.items() if split not in refused}


def test_folder_empty_or_missing(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "readme.txt").write_text("only text here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DatasetError, match="no folder"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_folder_loose_images_beside_classes(tmp_path):
    save(tmp_path / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "stray.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="stray.png"):
        load_dataset(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------- built-in sources


def test_digits_splits_cover_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    splits = {s: load_dataset("digits", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1294, 144, 359]
    keyed = []
    for ds in splits.values():
        assert ds.images.shape[1:] == (8, 8, 3) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert ds.classes == [str(d) for d in range(10)]
        assert (ds.images[..., 0] == ds.images[..., 2]).all()
        keyed += [(im[..., 0].tobytes(), int(lab)) for im, lab in zip(ds.images, ds.labels)]
    full = [(im.tobytes(), int(lab)) for im, lab in zip(expected, digits.target)]
    assert sorted(keyed) == sorted(full)  # every digit exactly once, with its own label
    assert expected.max() == 255
    assert np.array_equal(load_dataset("digits", "val").images, splits["val"].images)
    assert not np.array_equal(load_dataset("digits", "val", seed=1).images, splits["val"].images)
    assert load_dataset("digits", "test", resolution=32).images.shape == (359, 32, 32, 3)


def test_digits_moved_places_each_digit_somewhere_on_a_bigger_canvas():
    splits = {s: load_dataset("digits-moved", s) for s in ("train", "val", "test")}
    corners, sides = set(), set()
    for split, ds in splits.items():
        assert ds.images.shape[1:] == (16, 16, 3) and ds.images.dtype == np.uint8
        assert (ds.images[..., 0] == ds.images[..., 2]).all()
        # Same split seed, same number of digits: each split holds the same digits as `digits`, moved.
        assert np.array_equal(ds.labels, load_dataset("digits", split).labels)
        for image in ds.images[..., 0]:
            rows, cols = np.nonzero(image.any(axis=1))[0], np.nonzero(image.any(axis=0))[0]
            assert rows.size and rows[-1] - rows[0] < 12 and cols[-1] - cols[0] < 12  # a digit of side <= 12
            corners.add((rows[0], cols[0]))
            sides.add(rows[-1] - rows[0])
    assert len(corners) > 50 and len(sides) >= 4  # digits really move and change size
    # The placement is fixed (the same dataset everywhere); the split seed only reshuffles the digits.
    assert np.array_equal(load_dataset("digits-moved", "val").images, splits["val"].images)
    assert not np.array_equal(load_dataset("digits-moved", "val", seed=1).images, splits["val"].images)


def test_photos_real():
    train = load_dataset("photos", "train")
    assert train.images.shape == (4096, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels is None and train.classes is None
    assert np.array_equal(load_dataset("photos", "train").images, train.images)
    val, test = load_dataset("photos", "val"), load_dataset("photos", "test")
    assert len(val) == len(test) == 512
    assert not np.array_equal(load_dataset("photos", "val", seed=1).images, val.images)
    train_crops = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in train_crops for im in val.images)
    assert not any(im.tobytes() in train_crops for im in test.images)
    assert train.images.std() > 20  # natural images, not blank
    assert load_dataset("photos", "test", resolution=16).images.shape == (512, 16, 16, 3)


def test_photos_split_by_photo(monkeypatch):
    # Give every photo its own flat colour: each crop then tells which photo it came from.
    names = [n for split in bundled_source.PHOTO_SPLITS.values() for n in split]
    assert len(names) == len(set(names))
    colour = {name: (10 * k + 5, 200 - 10 * k, 7 * k) for k, name in enumerate(names)}
    fake = {name: np.full((300 + 50 * k, 450, 3), colour[name], np.uint8) for k, name in enumerate(names)}
    monkeypatch.setattr(bundled_source, "_bundled_photos", lambda: fake)
    for split in ("train", "val", "test"):
        ds = load_dataset("photos", split, seed=3)
        found = {tuple(int(v) for v in im[0, 0]) for im in ds.images}
        assert found == {colour[n] for n in bundled_source.PHOTO_SPLITS[split]}


# ------------------------------------------------------------------------- names, splits, misc


def test_unknown_name_lists_known():
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar")
    message = str(err.value)
    assert "'cifar'" in message
    for name in DATASETS:
        assert name in message
    assert "folder:PATH" in DATASETS
    assert list(SOURCES) == list(DATASETS)  # the listing is the registry
    assert all(source.description and callable(source.load) for source in SOURCES.values())


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="cifar10"):
        register("cifar10", "a second CIFAR-10")(lambda request: None)
    assert "a second" not in DATASETS["cifar10"]


def test_unknown_split():
    with pytest.raises(DatasetError, match="train, val, test"):
        load_dataset("digits", "validation")


def test_bad_resolution_or_seed():
    with pytest.raises(DatasetError, match="resolution"):
        load_dataset("digits", resolution=0)
    with pytest.raises(DatasetError, match="seed"):
        load_dataset("digits", seed=-1)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IGPT_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("IGPT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / "data"
    make_cifar10(tmp_path / "data")
    assert len(load_dataset("cifar10", "test")) == 3  # found without data_dir


def test_dataset_rejects_bad_arrays():
    with pytest.raises(DatasetError):
        Dataset("x", "train", np.zeros((2, 8, 6, 3), np.uint8), None, None)
    ds = Dataset("x", "train", np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    assert len(ds) == 2 and ds.resolution == 8


def test_split_indices_partition():
    for n in (1, 7, 10, 1797):
        parts = [split_indices(n, s, 5, test_percent=20) for s in ("train", "val", "test")]
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(n))
        assert len(parts[2]) == round(n * 0.2 + 1e-9) and len(parts[1]) == round((n - len(parts[2])) * 0.1 + 1e-9)


# ----------------------------------------------------------------------------------- download


def test_download_network_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", REAL_URLOPEN)
    spec = replace(idx_source.IDX_SPECS["mnist"], base_url=f"http://127.0.0.1:{free_port()}/")  # nothing listens: refused
    monkeypatch.setitem(idx_source.IDX_SPECS, "mnist", spec)
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", data_dir=tmp_path, download=True)
    message = str(err.value)
    assert f"the download of {spec.base_url}train-images-idx3-ubyte.gz failed" in message and "refused" in message
    assert str(tmp_path / "mnist") in message and "\n" not in message  # where to place the files by hand
    assert files_under(tmp_path) == []


def cifar_server(monkeypatch, serve_files, archive: bytes, md5: str):
    """A local stand-in for CIFAR-10's site serving `archive` under the real file name, with `md5` published."""
    monkeypatch.setattr(urllib.request, "urlopen", REAL_URLOPEN)
    spec = cifar_source.CIFAR_SPECS["cifar10"]
    name = spec.url.rsplit("/", 1)[1]
    server = serve_files({f"/{name}": archive})
    monkeypatch.setitem(cifar_source.CIFAR_SPECS, "cifar10", replace(spec, url=f"{server.url}/{name}", md5=md5))
    return server, name


def test_download_corrupt_bytes_leaves_nothing(tmp_path, monkeypatch, serve_files):
    page = b"<html>not the archive</html>" * 1000  # what a captive portal or a moved site sends
    server, name = cifar_server(monkeypatch, serve_files, page, md5=cifar_source.CIFAR_SPECS["cifar10"].md5)
    with pytest.raises(DatasetError, match="corrupted") as err:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert server.requests == [(f"/{name}", None)]
    assert str(tmp_path) in str(err.value)
    assert files_under(tmp_path) == []


@pytest.fixture
def fashion_server(tmp_path, monkeypatch, serve_files):
    """start(cut=None) -> (server, {file name: bytes}): a local stand-in for Fashion-MNIST's site (gzipped
    IDX files, their md5s published in the spec), reached with the real urllib."""
    served = {p.name: p.read_bytes() for p in make_idx(tmp_path / "made", "fashion-mnist", gz=True).iterdir()}
    monkeypatch.setattr(urllib.request, "urlopen", REAL_URLOPEN)

    def start(cut: str | None = None):
        server = serve_files({f"/{name}": blob for name, blob in served.items()}, cut=cut and f"/{cut}")
        spec = idx_source.IDX_SPECS["fashion-mnist"]  # its md5s in the order the files are fetched
        spec = replace(spec, base_url=server.url + "/", md5={name: hashlib.md5(served[name]).hexdigest() for name in spec.md5})
        monkeypatch.setitem(idx_source.IDX_SPECS, "fashion-mnist", spec)
        return server, served

    return start


CUT = "train-images-idx3-ubyte.gz"  # the largest file, and the first fetched


def test_a_cut_download_resumes_and_is_md5_checked(tmp_path, fashion_server):
    server, served = fashion_server(cut=CUT)
    target = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "test", data_dir=target, download=True)
    half = len(served[CUT]) // 2
    assert f"the download of {server.url}/{CUT} stopped after {half} of {2 * half} bytes" in str(err.value)
    assert "run the same command again to resume it" in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in files_under(target)] == [CUT + ".part"]  # nothing under a real name

    ds = load_dataset("fashion-mnist", "test", data_dir=target, download=True)
    assert ds.images[:, 0, 0, 0].tolist() == [101, 102, 103, 104, 105]
    assert (f"/{CUT}", f"bytes={half}-") in server.requests and server.fetched(f"/{CUT}") == 2  # resumed
    assert sorted(p.name for p in files_under(target)) == sorted(served)
    assert all((target / "fashion-mnist" / name).read_bytes() == blob for name, blob in served.items())
    asked = len(server.requests)
    load_dataset("fashion-mnist", "test", data_dir=target, download=True)
    assert len(server.requests) == asked  # present files are not fetched again


def test_a_resumed_file_failing_its_md5_is_removed(tmp_path, fashion_server):
    """The md5 covers the whole file, the bytes kept from before the cut too."""
    server, served = fashion_server(cut=CUT)
    target = tmp_path / "data"
    with pytest.raises(DatasetError, match="stopped after"):
        load_dataset("fashion-mnist", "test", data_dir=target, download=True)
    part = target / "fashion-mnist" / (CUT + ".part")
    damaged = bytearray(part.read_bytes())
    damaged[0] ^= 0xFF
    part.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", "test", data_dir=target, download=True)
    message = str(err.value)
    assert f"the download of {server.url}/{CUT} is corrupted (md5 " in message and "\n" not in message
    assert f"expected {hashlib.md5(served[CUT]).hexdigest()}) and was removed" in message
    assert str(target / "fashion-mnist") in message  # where to place the files by hand
    assert files_under(target) == []
    ds = load_dataset("fashion-mnist", "test", data_dir=target, download=True)  # the same command again
    assert len(ds) == 5 and (target / "fashion-mnist" / CUT).read_bytes() == served[CUT]


def make_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def test_download_cifar_archive_extracted(tmp_path, monkeypatch, serve_files):
    folder = make_cifar10(tmp_path / "server")
    archive = make_tar({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in folder.iterdir()})
    spec = cifar_source.CIFAR_SPECS["cifar10"]
    server, name = cifar_server(monkeypatch, serve_files, archive, md5=hashlib.md5(archive).hexdigest())
    target = tmp_path / "data"
    ds = load_dataset("cifar10", "test", data_dir=target, download=True)
    assert ds.images[:, 0, 0, 0].tolist() == [101, 102, 103] and ds.classes == CIFAR10_NAMES
    assert (target / "cifar-10-python.tar.gz").read_bytes() == archive
    assert sorted(p.name for p in (target / "cifar-10-batches-py").iterdir()) == sorted(spec.files)
    assert not any(p.name.startswith(".") for p in target.iterdir())  # no temp folders left
    load_dataset("cifar10", "test", data_dir=target, download=True)
    assert server.fetched(f"/{name}") == 1  # present files are not fetched again


def test_download_rejects_escaping_tar_members(tmp_path, monkeypatch, serve_files):
    archive = make_tar({"cifar-10-batches-py/batches.meta": b"x", "../../escaped": b"evil"})
    cifar_server(monkeypatch, serve_files, archive, md5=hashlib.md5(archive).hexdigest())
    target = tmp_path / "deep" / "data"
    with pytest.raises(DatasetError, match="escaped"):
        load_dataset("cifar10", data_dir=target, download=True)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    assert [p.name for p in files_under(tmp_path / "deep")] == ["cifar-10-python.tar.gz"]


# ------------------------------------------------------------------------------------- STL-10


def stl_images(ids, side=96) -> np.ndarray:
    """(N, side, side, 3) images: R at (0, 0) = id, and the known pixel at row 2, column 5."""
    images = np.zeros((len(ids), side, side, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = ids
    images[:, KNOWN_YX[0], KNOWN_YX[1]] = KNOWN_RGB
    return images


def write_stl_images(path: Path, images: np.ndarray) -> None:
    # The official layout: per image 3 channels, each 96×96 stored column by column -> (N, C, x, y).
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())


def make_stl10(root: Path, n_train=20, n_test=10, n_unlabeled=30) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, ids in {"train": range(1, 1 + n_train), "test": range(101, 101 + n_test)}.items():
        write_stl_images(folder / f"{split}_X.bin", stl_images(list(ids)))
        (folder / f"{split}_y.bin").write_bytes(np.array([1 + i % 10 for i in ids], dtype=np.uint8).tobytes())
    write_stl_images(folder / "unlabeled_X.bin", stl_images([200 + i for i in range(n_unlabeled)]))
    return folder


def test_stl10_layout_labels_splits_and_resize(tmp_path):
    make_stl10(tmp_path)
    test = load_dataset("stl10", "test", data_dir=tmp_path)
    assert test.images.shape == (10, 96, 96, 3) and test.images[:, 0, 0, 0].tolist() == list(range(101, 111))
    assert (test.images[:, 2, 5] == KNOWN_RGB).all() and (test.images[:, 5, 2] == 0).all()  # column-major undone
    assert test.labels.tolist() == [i % 10 for i in range(101, 111)]  # files count classes from 1
    assert test.classes[:3] == ["airplane", "bird", "car"] and len(test.classes) == 10
    train, val = (load_dataset("stl10", s, data_dir=tmp_path) for s in ("train", "val"))
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert (len(train_ids), len(val_ids)) == (18, 2) and set(train_ids) | set(val_ids) == set(range(1, 21))
    assert train.labels.tolist() == [i % 10 for i in train_ids]
    small = load_dataset("stl10", "test", data_dir=tmp_path, resolution=32)
    assert small.images.shape == (10, 32, 32, 3)


def test_stl10_unlabeled_for_pretraining(tmp_path):
    make_stl10(tmp_path)
    train = load_dataset("stl10-unlabeled", "train", data_dir=tmp_path, resolution=16)
    val = load_dataset("stl10-unlabeled", "val", data_dir=tmp_path, resolution=16)
    test = load_dataset("stl10-unlabeled", "test", data_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (27, 3, 10) and train.resolution == 16
    assert train.labels is None and train.classes is None and test.labels is None
    full = data.open_dataset("stl10-unlabeled", "train", data_dir=tmp_path)
    assert full.resolution == 96
    ids = sorted(full.take(np.arange(len(full)))[:, 0, 0, 0].tolist() + load_dataset(
        "stl10-unlabeled", "val", data_dir=tmp_path).images[:, 0, 0, 0].tolist())
    assert ids == [200 + i for i in range(30)]


def test_stl10_images_are_read_from_disk_when_asked(tmp_path):
    folder = make_stl10(tmp_path)
    stream = data.open_dataset("stl10-unlabeled", "train", data_dir=tmp_path)
    first = stream.take([0])[0, 0, 0, 0]
    with open(folder / "unlabeled_X.bin", "r+b") as f:  # change image 0's first byte in place, after opening
        f.write(bytes([7]))
    assert first != 7 and stream.take([0])[0, 0, 0, 0] == 7  # the file is mapped, not a copy in memory


@pytest.mark.parametrize("file, cut, expected", [
    ("train_X.bin", 1000, "not a whole number of 3×96×96 images"),
    ("train_y.bin", 1, "19 labels but"),
    ("test_X.bin", 27648, "9 images"),
])
def test_stl10_truncated_files_named(tmp_path, file, cut, expected):
    folder = make_stl10(tmp_path)
    path = folder / file
    path.write_bytes(path.read_bytes()[:-cut])
    split = "test" if file.startswith("test") else "train"
    with pytest.raises(DatasetError, match=expected) as err:
        load_dataset("stl10", split, data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_stl10_bad_labels_and_missing_files(tmp_path):
    folder = make_stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes(10))  # class 0 does not exist: the files count from 1
    with pytest.raises(DatasetError, match="not 1..10") as err:
        load_dataset("stl10", "test", data_dir=tmp_path)
    assert str(folder / "test_y.bin") in str(err.value)
    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(DatasetError, match="--download") as err:
        load_dataset("stl10-unlabeled", data_dir=tmp_path)
    assert str(folder / "unlabeled_X.bin") in str(err.value)


def test_download_stl10_archive_extracted(tmp_path, monkeypatch, serve_files):
    source = make_stl10(tmp_path / "made")
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        tar.add(source, arcname="stl10_binary")
    server = serve_files({"/stl10_binary.tar.gz": blob.getvalue()})  # a local stand-in for Stanford's site
    monkeypatch.setattr(urllib.request, "urlopen", REAL_URLOPEN)
    monkeypatch.setattr(stl10_source, "STL10_URL", f"{server.url}/stl10_binary.tar.gz")
    monkeypatch.setattr(stl10_source, "STL10_MD5", hashlib.md5(blob.getvalue()).hexdigest())
    root = tmp_path / "data"
    test = load_dataset("stl10", "test", data_dir=root, download=True)
    assert test.images[:, 0, 0, 0].tolist() == list(range(101, 111))
    assert not list(root.glob(".extract-*")) and (root / "stl10_binary.tar.gz").is_file()


# --------------------------------------------------------------------------------- ImageNet


def imagenet_rows(ids, side) -> np.ndarray:
    """Channel-first rows (s² R, s² G, s² B) as distributed: R at (0, 0) = id % 256, and the known pixel."""
    rows = np.zeros((len(ids), 3 * side * side), dtype=np.uint8)
    rows[:, 0] = np.asarray(ids) % 256
    y, x = KNOWN_YX
    for c, value in enumerate(KNOWN_RGB):
        rows[:, c * side * side + y * side + x] = value
    return rows


def make_imagenet(root: Path, side=32, per_batch=2, n_test=3) -> Path:
    folder = root / f"imagenet{side}"
    folder.mkdir(parents=True)
    for b in range(10):
        ids = list(range(1 + b * per_batch, 1 + (b + 1) * per_batch))
        save = np.savez_compressed if b % 2 else np.savez  # both forms occur; .npz is read either way
        save(folder / f"train_data_batch_{b + 1}.npz", data=imagenet_rows(ids, side),
             labels=[1 + i * 37 % 1000 for i in ids], mean=np.zeros(3 * side * side))
    ids = list(range(101, 101 + n_test))
    np.savez(folder / "val_data.npz", data=imagenet_rows(ids, side), labels=[1000, 1, 2])
    return folder


@pytest.mark.parametrize("side", [32, 64])
def test_imagenet_layout_labels_and_splits(tmp_path, side):
    make_imagenet(tmp_path, side)
    name = f"imagenet{side}"
    test = load_dataset(name, "test", data_dir=tmp_path)
    assert test.images.shape == (3, side, side, 3) and test.images[:, 0, 0, 0].tolist() == [101, 102, 103]
    assert (test.images[:, 2, 5] == KNOWN_RGB).all()
    assert test.labels.tolist() == [999, 0, 1] and len(test.classes) == 1000 and test.classes[0] == "1"
    train, val = (load_dataset(name, s, data_dir=tmp_path) for s in ("train", "val"))
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert (len(train_ids), len(val_ids)) == (18, 2) and set(train_ids) | set(val_ids) == set(range(1, 21))
    assert train.labels.tolist() == [i * 37 % 1000 for i in train_ids]
    stream = data.open_dataset(name, "train", data_dir=tmp_path, resolution=8)
    batches = list(stream.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 3] and batches[0].shape[1:] == (8, 8, 3)


def test_imagenet_wrong_shape_or_truncated_names_file(tmp_path):
    folder = make_imagenet(tmp_path)
    path = folder / "train_data_batch_3.npz"
    np.savez(path, data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=[1, 2])  # a 64² file among the 32² ones
    with pytest.raises(DatasetError, match="expected \\(N, 3072\\)") as err:
        load_dataset("imagenet32", "train", data_dir=tmp_path)
    assert str(path) in str(err.value)
    path = folder / "val_data.npz"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset("imagenet32", "test", data_dir=tmp_path)
    assert str(path) in str(err.value)
    np.savez(path, data=imagenet_rows([1, 2], 32), labels=[1, 2, 3])
    with pytest.raises(DatasetError, match="2 images but 3 labels") as err:
        load_dataset("imagenet32", "test", data_dir=tmp_path)


def test_imagenet_missing_files_say_where_and_no_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet64", "train", data_dir=tmp_path)
    assert str(tmp_path / "imagenet64" / "train_data_batch_1.npz") in str(err.value)
    assert "image-net.org" in str(err.value)
    with pytest.raises(DatasetError, match="cannot be downloaded") as err:
        load_dataset("imagenet32", "train", data_dir=tmp_path, download=True)
    assert str(tmp_path / "imagenet32") in str(err.value) and files_under(tmp_path) == []


def test_cli_lists_and_shows_the_paper_datasets(tmp_path, capsys):
    from igpt_core.cli import main

    with pytest.raises(SystemExit):
        main(["data", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    for name in ("stl10,", "stl10-unlabeled", "imagenet32", "imagenet64", "hf:NAME", "shards:DIR"):
        assert name in listed
    make_stl10(tmp_path)
    out = tmp_path / "grid.png"
    main(["data", "stl10-unlabeled", "--data-dir", str(tmp_path), "--out", str(out), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["images"] == 27 and shown["resolution"] == 96 and not shown["labelled"] and out.is_file()
