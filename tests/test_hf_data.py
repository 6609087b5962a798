"""Tests for `hf:` datasets: small datasets built with the `datasets` library in the test's tmp folder,
loaded from a save_to_disk folder and from a datasets cache laid out as the hub leaves it (offline)."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, SplitDict, SplitInfo
from PIL import Image as PILImage

from igpt_core.data import load_dataset, open_dataset
from igpt_core.errors import DatasetError

CLASSES = ["cat", "dog", "fish"]


def pictures(ids, side=12) -> list:
    """Square RGB pictures whose pixel (0, 0) has R = id."""
    out = []
    for i in ids:
        array = np.full((side, side, 3), 40, dtype=np.uint8)
        array[0, 0, 0] = i
        out.append(PILImage.fromarray(array))
    return out


def table(ids, **extra) -> Dataset:
    features = {"img": Image(), "label": ClassLabel(names=CLASSES), **{k: v for k, (v, _) in extra.items()}}
    columns = {"img": pictures(ids), "label": [i % 3 for i in ids], **{k: c for k, (_, c) in extra.items()}}
    return Dataset.from_dict(columns, features=Features(features))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "saved"
    DatasetDict(train=table(range(1, 21)), test=table(range(101, 106))).save_to_disk(str(path))
    return path


def test_saved_folder_splits_labels_and_classes(saved):
    test = load_dataset(f"hf:{saved}", "test")
    assert test.images.shape == (5, 12, 12, 3) and test.images[:, 0, 0, 0].tolist() == [101, 102, 103, 104, 105]
    assert test.labels.tolist() == [i % 3 for i in range(101, 106)] and test.classes == CLASSES
    train, val = (load_dataset(f"hf:{saved}", s) for s in ("train", "val"))
    train_ids, val_ids = train.images[:, 0, 0, 0].tolist(), val.images[:, 0, 0, 0].tolist()
    assert (len(train_ids), len(val_ids)) == (18, 2) and set(train_ids) | set(val_ids) == set(range(1, 21))
    assert train.labels.tolist() == [i % 3 for i in train_ids]
    assert load_dataset(f"hf:{saved}", "test", resolution=8).images.shape == (5, 8, 8, 3)
    assert [len(b) for b in open_dataset(f"hf:{saved}", "train").batches(7)] == [7, 7, 4]


def test_train_only_dataset_gets_a_test_split(tmp_path):
    path = tmp_path / "one"
    table(range(1, 31)).save_to_disk(str(path))  # a Dataset, not a DatasetDict: only training data
    sizes = [len(load_dataset(f"hf:{path}", s)) for s in ("train", "val", "test")]
    assert sizes == [22, 2, 6]


def test_columns_found_or_named(tmp_path):
    path = tmp_path / "two"
    ids = range(1, 11)
    extra = {"thumb": (Image(), pictures([255 - i for i in ids], side=4)),
             "coarse": (ClassLabel(names=["animal", "other"]), [i % 2 for i in ids])}
    DatasetDict(train=table(ids, **extra), test=table(ids, **extra)).save_to_disk(str(path))
    with pytest.raises(DatasetError, match="image columns img, thumb"):
        load_dataset(f"hf:{path}", "test")
    with pytest.raises(DatasetError, match="several label columns"):
        load_dataset(f"hf:{path}?image=img", "test")
    named = load_dataset(f"hf:{path}?image=thumb&label=coarse", "test")
    assert named.resolution == 4 and named.images[:, 0, 0, 0].tolist() == [255 - i for i in ids]
    assert named.classes == ["animal", "other"] and named.labels.tolist() == [i % 2 for i in ids]
    with pytest.raises(DatasetError, match="no column 'picture'"):
        load_dataset(f"hf:{path}?image=picture", "test")
    with pytest.raises(DatasetError, match="image=COLUMN and/or label=COLUMN"):
        load_dataset(f"hf:{path}?colour=img", "test")


def test_damaged_or_missing_folder_named(saved, tmp_path):
    arrow = next((saved / "test").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(DatasetError, match="could not be loaded") as err:
        load_dataset(f"hf:{saved}", "test")
    assert str(saved) in str(err.value)
    with pytest.raises(DatasetError, match="no folder at"):
        load_dataset(f"hf:{tmp_path / 'nothing'}", "test")


def test_hub_name_read_from_the_datasets_cache_offline(tmp_path, monkeypatch):
    """hf:owner/toy with HF_DATASETS_OFFLINE=1 reads the cache folder that a download from the hub leaves:
    CACHE/owner___toy/CONFIG/VERSION/HASH/{dataset_info.json, toy-SPLIT.arrow}."""
    cache = tmp_path / "cache"
    folder = cache / "owner___toy" / "default" / "0.0.0" / ("0" * 16)
    folder.mkdir(parents=True)
    splits = {"train": table(range(1, 21)), "test": table(range(101, 104))}
    info = splits["train"].info.copy()
    info.dataset_name, info.config_name, info.splits = "toy", "default", SplitDict()
    for name, split in splits.items():
        split.save_to_disk(str(tmp_path / name))  # the same Arrow stream files the hub download writes
        shutil.copy(next((tmp_path / name).glob("*.arrow")), folder / f"toy-{name}.arrow")
        info.splits.add(SplitInfo(name=name, num_examples=len(split), dataset_name="toy"))
    info.write_to_directory(str(folder))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("hf:owner/toy", "hf:owner/toy:default"):
        test = load_dataset(name, "test")
        assert test.images[:, 0, 0, 0].tolist() == [101, 102, 103] and test.classes == CLASSES
    with pytest.raises(DatasetError, match="owner/absent"):
        load_dataset("hf:owner/absent", "test")


def test_unlabelled_rows_are_refused_in_a_labelled_split(tmp_path):
    path = tmp_path / "nolabels"
    test = Dataset.from_dict({"img": pictures([1, 2]), "label": [-1, -1]},
                             features=Features({"img": Image(), "label": ClassLabel(names=CLASSES)}))
    DatasetDict(train=table(range(1, 11)), test=test).save_to_disk(str(path))
    with pytest.raises(DatasetError, match="without a label"):
        load_dataset(f"hf:{path}", "test")
    assert len(load_dataset(f"hf:{path}", "train")) == 9
