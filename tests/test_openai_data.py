"""OpenAI's encoded datasets (openai:cifar10, openai:imagenet): small files written here in OpenAI's
layout (ids of 32×32 images, one-hot labels, kmeans_centers.npy), read back memory-mapped."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from igpt_core.data import Dataset, check_token_palette, load_dataset, open_dataset, openai_palette_centers
from igpt_core.errors import DatasetError
from igpt_core.palette import Palette

SIZES = {"tr": 5, "va": 3, "te": 4}


def openai_centers() -> np.ndarray:
    """512 distinct colours in [-1, 1], as kmeans_centers.npy holds them (a grid stands in for k-means)."""
    levels = np.linspace(-1, 1, 8, dtype=np.float32)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(512, 3)


def write_openai(root: Path, name: str = "cifar10", n_classes: int = 10, one_hot: bool = True) -> dict:
    """OpenAI's files for `name` under root (root/kmeans_centers.npy, root/name/name_{tr,va,te}{X,Y}.npy);
    returns {split code: (ids, labels)}."""
    rng = np.random.default_rng(7)
    (root / name).mkdir(parents=True, exist_ok=True)
    np.save(root / "kmeans_centers.npy", openai_centers())
    written = {}
    for code, n in SIZES.items():
        ids = rng.integers(0, 512, size=(n, 1024)).astype(np.uint16)
        labels = rng.integers(0, n_classes, size=n)
        np.save(root / name / f"{name}_{code}X.npy", ids)
        np.save(root / name / f"{name}_{code}Y.npy", np.eye(n_classes, dtype=np.float32)[labels] if one_hot else labels)
        written[code] = (ids, labels)
    return written


OPENAI_COLOURS = np.rint(127.5 * (openai_centers().astype(np.float64) + 1)).astype(np.uint8)  # as run.py


def colours_of(ids: np.ndarray) -> np.ndarray:
    """What rows of ids look like in OpenAI's colours, as (n, 32, 32, 3) uint8."""
    return OPENAI_COLOURS[ids].reshape(-1, 32, 32, 3)


def test_splits_map_to_openai_files_and_ids_stay_on_disk(tmp_path):
    written = write_openai(tmp_path / "openai")
    for split, code in (("train", "tr"), ("val", "va"), ("test", "te")):
        ds = load_dataset("openai:cifar10", split, data_dir=tmp_path)
        ids, labels = written[code]
        assert isinstance(ds.token_ids, np.memmap) and np.array_equal(ds.token_ids, ids)
        assert ds.labels.tolist() == labels.tolist() and ds.classes == [str(i) for i in range(10)]
        assert len(ds) == len(ids) and ds.resolution == 32
        assert np.array_equal(ds.palette.colors, OPENAI_COLOURS)
    # Images are decoded only for the rows asked for, in the order asked for.
    assert np.array_equal(ds.images[2], colours_of(ids[2:3])[0])
    assert np.array_equal(ds.images[[3, 0]], colours_of(ids[[3, 0]]))
    assert np.array_equal(np.asarray(ds.images), colours_of(ids))
    # What a run imported from OpenAI reads: quantising the decoded images gives the stored ids back.
    assert np.array_equal(Palette(openai_centers()).encode(ds.images, 32), ids)


def test_imagenet_and_labels_given_as_numbers(tmp_path):
    written = write_openai(tmp_path / "openai", "imagenet", n_classes=1000, one_hot=False)
    stream = open_dataset("openai:imagenet", "val", data_dir=tmp_path, resolution=16)
    ids, labels = written["va"]
    assert np.array_equal(stream.token_ids, ids) and stream.labels.tolist() == labels.tolist()
    assert stream.take([0, 1]).shape == (2, 16, 16, 3)  # images at the asked resolution, ids at their own


def test_missing_files_say_where_to_put_them(tmp_path):
    folder = tmp_path / "openai"
    with pytest.raises(DatasetError, match="--download") as err:
        load_dataset("openai:cifar10", "test", data_dir=tmp_path)
    message = str(err.value)
    for file in ("kmeans_centers.npy", "cifar10/cifar10_teX.npy", "cifar10/cifar10_teY.npy"):
        assert str(folder / file) in message
    assert "openaipublic.blob.core.windows.net/image-gpt" in message and "\n" not in message
    folder.mkdir()
    np.save(folder / "kmeans_centers.npy", openai_centers())
    with pytest.raises(DatasetError, match="--download") as err:
        load_dataset("openai:cifar10", "test", data_dir=tmp_path)
    assert str(folder / "cifar10" / "cifar10_teX.npy") in str(err.value) and "kmeans" not in str(err.value)


def test_damaged_files_are_named(tmp_path):
    write_openai(tmp_path / "openai")
    np.save(tmp_path / "openai" / "cifar10" / "cifar10_teX.npy", np.zeros((4, 1000), np.uint16))
    with pytest.raises(DatasetError, match=r"cifar10_teX\.npy holds uint16 \(4, 1000\)"):
        load_dataset("openai:cifar10", "test", data_dir=tmp_path)
    np.save(tmp_path / "openai" / "cifar10" / "cifar10_vaY.npy", np.eye(10, dtype=np.float32)[:2])
    with pytest.raises(DatasetError, match="2 labels for 3 images"):
        load_dataset("openai:cifar10", "val", data_dir=tmp_path)
    (tmp_path / "openai" / "kmeans_centers.npy").write_bytes(b"not numpy")
    with pytest.raises(DatasetError, match="kmeans_centers.npy could not be read"):
        openai_palette_centers(tmp_path / "openai")


def test_a_run_with_another_palette_is_refused(tmp_path):
    write_openai(tmp_path / "openai")
    ds = load_dataset("openai:cifar10", "test", data_dir=tmp_path)
    check_token_palette(ds, Palette(openai_centers()))  # OpenAI's colours: accepted
    other = openai_centers()[::-1].copy()  # the same colours under other ids
    with pytest.raises(DatasetError) as err:
        check_token_palette(ds, Palette(other))
    assert str(err.value).startswith("openai:cifar10 holds ids in OpenAI's 512-colour palette; this run's palette")
    assert "use `cifar10` instead" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="16 colours"):
        check_token_palette(ds, Palette(openai_centers()[:16]))
    images = Dataset("digits", "test", np.zeros((2, 8, 8, 3), np.uint8), None, None)
    check_token_palette(images, Palette(other))  # images have no ids to mismatch


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def openai_server(tmp_path, monkeypatch):
    """A local copy of OpenAI's bucket (datasets/, color-clusters/) on 127.0.0.1, set as IGPT_OPENAI_URL."""
    bucket = tmp_path / "bucket"
    written = write_openai(tmp_path / "made")
    (bucket / "datasets").mkdir(parents=True)
    (bucket / "color-clusters").mkdir()
    for path in (tmp_path / "made" / "cifar10").iterdir():
        path.rename(bucket / "datasets" / path.name)
    (tmp_path / "made" / "kmeans_centers.npy").rename(bucket / "color-clusters" / "kmeans_centers.npy")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=bucket))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("IGPT_OPENAI_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield bucket, written
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_fetches_only_the_split_asked_for(tmp_path, openai_server):
    bucket, written = openai_server
    target = tmp_path / "data"
    ds = load_dataset("openai:cifar10", "test", data_dir=target, download=True)
    assert np.array_equal(ds.token_ids, written["te"][0]) and ds.labels.tolist() == written["te"][1].tolist()
    got = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert got == ["openai/cifar10/cifar10_teX.npy", "openai/cifar10/cifar10_teY.npy", "openai/kmeans_centers.npy"]
    # A file the server lacks: one line naming the URL, and nothing half-written left behind.
    (bucket / "datasets" / "cifar10_vaY.npy").unlink()
    with pytest.raises(DatasetError, match=r"the download of http://127\.0\.0\.1:\d+/datasets/cifar10_vaY\.npy failed"):
        load_dataset("openai:cifar10", "val", data_dir=target, download=True)
    assert not (target / "openai" / "cifar10" / "cifar10_vaY.npy").exists()
    assert not [p for p in target.rglob(".*") if p.is_file()]
