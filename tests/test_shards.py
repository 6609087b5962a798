"""Tokenised shards: written by `igpt tokenize`, read back equal to the in-memory path, trained on with
the same loss curve, palette mismatches and damaged files refused, and memory that does not grow with them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import TINY
from test_distributed import assert_same_curve, curve, finish, torchrun

from igpt_core.cli import main
from igpt_core.data import SPLITS, load_dataset
from igpt_core.errors import IgptError
from igpt_core.palette import Palette
from igpt_core.runs import open_run
from igpt_core.data.shards import open_shards, palette_fingerprint
from igpt_core.tokenizer import tokenize
from igpt_core.training import TrainConfig, start_run, token_ids, train


def tiny_config(steps=6, eval_images=64):
    return TrainConfig(steps=steps, batch_size=16, eval_every=3, eval_images=eval_images)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits run made the usual way (palette fitted in memory), trained for 6 steps."""
    runs = tmp_path_factory.mktemp("runs")
    run = start_run("mem", "digits", "tiny", "ar", 16, train_config=tiny_config(), model_overrides=TINY, runs_dir=runs)
    train(run, progress=False)
    return run


def test_tokenize_command_round_trips_ids_and_labels(digits_run, tmp_path, capsys):
    out = tmp_path / "digits-shards"
    main(["tokenize", "digits", "--palette", digits_run.name, "--runs-dir", str(digits_run.path.parent),
          "--out", str(out), "--shard-images", "500", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == {"train": 1294, "val": 144, "test": 359} and result["resolution"] == 8
    shards = open_shards(out)
    assert shards.palette == digits_run.palette and shards.classes == [str(d) for d in range(10)]
    assert shards.index["palette_fingerprint"] == palette_fingerprint(digits_run.palette)
    assert [s["images"] for s in shards.index["splits"]["train"]["shards"]] == [500, 500, 294]
    for split in SPLITS:
        data = load_dataset("digits", split)
        part = shards.split(split)
        expected = digits_run.palette.encode(data.images, 8)
        assert np.array_equal(part[np.arange(len(part))].numpy(), expected)
        assert np.array_equal(part.labels, data.labels)
        assert part.color_counts.tolist() == np.bincount(expected.ravel(), minlength=16).tolist()
    rows = np.array([1293, 0, 777, 501, 0])  # any order, across shards, repeats
    assert np.array_equal(shards.split("train")[rows].numpy(), digits_run.palette.encode(load_dataset("digits").images[rows], 8))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    # As a dataset (for probe, score, data ...): images in the palette's colours, which encode to the same ids.
    as_images = load_dataset(f"shards:{out}", "test")
    assert np.array_equal(digits_run.palette.encode(as_images.images, 8), shards.split("test")[np.arange(359)].numpy())
    assert np.array_equal(as_images.labels, load_dataset("digits", "test").labels) and as_images.classes == shards.classes


def test_training_on_shards_gives_the_in_memory_curve(digits_run, tmp_path):
    out = tmp_path / "shards"
    tokenize("digits", digits_run.palette, out, progress=False)
    run = start_run("from-shards", f"shards:{out}", "tiny", "ar", None, train_config=tiny_config(),
                    model_overrides=TINY, runs_dir=tmp_path / "runs")
    assert run.palette == digits_run.palette
    assert run.info["unigram_val_loss"] == pytest.approx(digits_run.info["unigram_val_loss"], rel=1e-12)
    train(run, progress=False)
    assert [r["loss"] for r in run.metrics()] == [r["loss"] for r in digits_run.metrics()]
    assert [r.get("val_loss") for r in run.metrics()] == [r.get("val_loss") for r in digits_run.metrics()]


def test_palette_mismatch_is_one_clear_error(digits_run, tmp_path, capsys):
    out = tmp_path / "shards"
    tokenize("digits", digits_run.palette, out, splits=("train", "val"), progress=False)
    run = start_run("r", f"shards:{out}", "tiny", "ar", None, train_config=tiny_config(steps=1),
                    model_overrides=TINY, runs_dir=tmp_path / "runs")
    other = Palette(np.linspace(-1, 1, 48).reshape(16, 3))
    tokenize("digits", other, out, splits=("train", "val"), overwrite=True, progress=False)
    with pytest.raises(IgptError, match=f"tokenised with palette {palette_fingerprint(other)}.*run 'r' uses palette"):
        train(run, progress=False)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", f"shards:{out}", "--colors", "32", "--runs-dir", str(tmp_path / "runs"), "--name", "x"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"error: --colors 32, but the shards in .* hold ids of a 16-colour palette.*", last)


def test_damaged_shards_name_the_file(digits_run, tmp_path):
    out = tmp_path / "shards"
    tokenize("digits", digits_run.palette, out, splits=("train",), shard_images=700, progress=False)
    shard = out / "train-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(IgptError, match="truncated") as err:
        open_shards(out).split("train")
    assert str(shard) in str(err.value)
    np.save(shard, np.zeros((594, 63), np.uint16))  # a row length that is not the index's 64
    with pytest.raises(IgptError, match=r"\(594, 63\).*\(594, 64\)") as err:
        open_shards(out).split("train")
    assert str(shard) in str(err.value)
    with pytest.raises(IgptError, match="no val split"):
        open_shards(out).split("val")
    with pytest.raises(IgptError, match="already exists"):
        tokenize("digits", digits_run.palette, out, progress=False)
    with pytest.raises(IgptError, match="no shards at"):
        open_shards(tmp_path / "absent")


def write_random_shards(folder, palette, n_train, n_val, size, seed=0):
    """Shards in the format `tokenize` writes (index.json, palette.json, uint16 .npy), with random ids:
    big enough to matter, without quantising hundreds of thousands of images in a test."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    tokens = size * size
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        array = np.lib.format.open_memmap(folder / f"{split}-00000.npy", mode="w+", dtype=np.uint16, shape=(n, tokens))
        counts = np.zeros(len(palette), np.int64)
        for begin in range(0, n, 20_000):
            ids = rng.integers(0, len(palette), size=(min(20_000, n - begin), tokens), dtype=np.uint16)
            array[begin : begin + len(ids)] = ids
            counts += np.bincount(ids.ravel(), minlength=len(palette))
        array.flush()
        del array
        splits[split] = {"images": n, "shards": [{"file": f"{split}-00000.npy", "images": n}], "labels": None,
                         "color_counts": counts.tolist()}
    palette.save(folder / "palette.json")
    index = {"format": "igpt-shards", "version": 1, "dataset": "random", "seed": seed, "resolution": size,
             "tokens_per_image": tokens, "n_colors": len(palette), "palette_fingerprint": palette_fingerprint(palette),
             "classes": None, "splits": splits}
    (folder / "index.json").write_text(json.dumps(index))


def anonymous_memory() -> int:
    """Bytes of this process's resident anonymous memory (heap, not pages of mapped files)."""
    status = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def test_training_memory_does_not_grow_with_the_shards(tmp_path):
    bound = 32 << 20
    palette = Palette(np.linspace(-1, 1, 48).reshape(16, 3))
    folder = tmp_path / "big"
    write_random_shards(folder, palette, n_train=240_000, n_val=256, size=16)  # 240 000 × 256 ids: 123 MB
    assert sum(p.stat().st_size for p in folder.glob("*.npy")) > 3 * bound
    config = tiny_config(steps=4, eval_images=32)
    run = start_run("big", f"shards:{folder}", "tiny", "ar", None, train_config=config, model_overrides=TINY,
                    runs_dir=tmp_path / "runs")
    ids, _ = token_ids(run, run.model_config, config, "cpu", None)
    assert all(isinstance(array, np.memmap) for array in ids.arrays)  # rows are read on demand
    train(run, progress=False)  # warm-up: torch's kernels and buffers, the first pages of the files
    before, during = anonymous_memory(), []
    train(run, progress=False, on_step=lambda step, loss: during.append(anonymous_memory()))
    assert len(during) == 4 and max(during) - before < bound


@pytest.mark.slow  # torchrun
def test_two_processes_on_shards_give_the_one_process_curve(digits_run, tmp_path):
    """Under torchrun each process reads only its share of every batch from the shards; the global
    batch, and so the loss curve, is the one of a single process tokenising in memory."""
    out = tmp_path / "shards"
    tokenize("digits", digits_run.palette, out, splits=("train", "val"), progress=False)
    launch = torchrun(["--dataset", f"shards:{out}", "--steps", "6", "--batch-size", "16", "--eval-every", "3",
                       "--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--name", "ddp",
                       "--runs-dir", str(tmp_path / "runs"), "--json"], cwd=tmp_path)
    output = finish(launch)
    assert launch.returncode == 0, output[-3000:]
    assert_same_curve(curve(open_run("ddp", tmp_path / "runs")), curve(digits_run))


def test_tokenize_fits_a_palette_or_says_what_it_needs(tmp_path, capsys):
    out = tmp_path / "fitted"
    main(["tokenize", "digits", "--colors", "8", "--splits", "train,val", "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["colors"] == 8 and result["images"] == {"train": 1294, "val": 144}
    assert len(open_shards(out).palette) == 8
    for options in ([], ["--colors", "8", "--palette", str(out)]):
        with pytest.raises(SystemExit) as exit_:
            main(["tokenize", "digits", "--out", str(tmp_path / "x"), *options])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith("error: give --palette RUN_OR_FILE (reuse a run's palette) or --colors K")
    main(["tokenize", "digits", "--palette", str(out), "--splits", "test", "--out", str(tmp_path / "again"), "--json"])
    assert open_shards(tmp_path / "again").palette == open_shards(out).palette  # a shards folder's palette reused


def test_an_interrupted_tokenize_leaves_nothing(digits_run, tmp_path, monkeypatch):
    palette, calls = digits_run.palette, []
    encode = Palette.encode

    def encode_then_stop(self, images, size):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C half-way through the training split
        return encode(self, images, size)

    monkeypatch.setattr(Palette, "encode", encode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tokenize("digits", palette, tmp_path / "shards", shard_images=500, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
