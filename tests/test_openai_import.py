"""OpenAI's TensorFlow checkpoints -> igpt runs, checked against TensorFlow's own logits.

The fixtures (tests/fixtures/openai_tf, made by make_fixtures.py there with TensorFlow, which these
tests never import) are OpenAI's iGPT graph at a tiny size, saved by a sharded TF1 Saver after one and
two Adam steps, with the logits TensorFlow computed on a fixed batch. Downloads are served by a
local HTTP server in a thread.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
from conftest import app_module
from PIL import Image

from igpt_core import cli
from igpt_core.data import load_dataset
from igpt_core.errors import CheckpointError
from igpt_core.model import preset
from igpt_core.pretrained import imported_label
from igpt_core.pretrained.labels import parameter_count, short_count
from igpt_core.pretrained.tf_bundle import (TABLE_MAGIC, TensorBundle, masked_crc32c, parse_message, read_table,
                                            read_varint)
from igpt_core.runs import open_run

FIXTURES = Path(__file__).parent / "fixtures" / "openai_tf"
STEPS = [1, 2]
SHARDS = [f"model.ckpt-{step}.data-{i:05d}-of-00003" for step in STEPS for i in range(3)]


def igpt(*args, cwd):
    """The CLI in a real process (exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "igpt_core.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def igpt_error(capsys, *args) -> str:
    """Run the CLI in this process, expecting the one-line error and exit status 2; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]  # on a line of its own, after the progress bar if one was showing
    assert line.startswith("error: ") and err.count("error:") == 1, err
    return line


def copy_fixtures(folder: Path) -> Path:
    shutil.copytree(FIXTURES, folder, ignore=shutil.ignore_patterns("*.py", "other_width", "logits-*", "ids.npy"))
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixtures imported through the CLI: (working folder, the command's JSON summary)."""
    work = tmp_path_factory.mktemp("openai")
    result = igpt("import-openai", "--from", FIXTURES, "--name", "tf", "--runs-dir", work / "runs", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, json.loads(result.stdout)


# -- the import -------------------------------------------------------------------------------------


def test_every_checkpoint_gives_tensorflows_logits(imported):
    work, summary = imported
    run = open_run("tf", work / "runs")
    assert run.checkpoints() == STEPS == summary["checkpoints"]
    ids = torch.from_numpy(np.load(FIXTURES / "ids.npy")).long()
    for step in STEPS:
        model, palette, info = run.load(step)
        with torch.no_grad():
            logits, _ = model(ids)
        expected = torch.from_numpy(np.load(FIXTURES / f"logits-{step}.npy"))
        assert expected.abs().max() > 1  # far from zero, so that 1e-4 says something
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        assert info["step"] == step
    # the two steps differ (Adam moved the weights), so each checkpoint is its own step's
    assert not np.allclose(np.load(FIXTURES / "logits-1.npy"), np.load(FIXTURES / "logits-2.npy"), atol=1e-3)


def test_run_records_what_was_imported(imported):
    work, summary = imported
    run = open_run("tf", work / "runs")
    origin = str(FIXTURES.resolve())
    assert run.info["imported"] == {"source": "openai-tf", "model": "OpenAI iGPT (2 layers × 16)", "from": origin,
                                    "steps": STEPS}
    count = sum(p.numel() for p in run.load()[0].parameters())
    assert summary["label"] == imported_label(run) == f"OpenAI iGPT (2 layers × 16) · pre-trained (imported) · {count // 1000}K"
    centers = np.load(FIXTURES / "kmeans_centers.npy")
    np.testing.assert_array_equal(run.palette.colors, np.rint(127.5 * (centers.astype(np.float64) + 1)).astype(np.uint8))
    config = run.model_config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_colors, config.image_size) == (2, 16, 2, 16, 4)


def test_labels_of_openais_sizes():
    assert [short_count(parameter_count(preset(size))) for size in "sml"] == ["76M", "455M", "1.36B"]


def test_sample_and_score_work_on_the_imported_run(imported, capsys, monkeypatch):
    work, _ = imported
    monkeypatch.chdir(work)
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5).save("x.png")
    runs = ["--runs-dir", str(work / "runs"), "--json"]
    cli.main(["sample", "tf", "--image", "x.png", "-n", "2", "--out", "g.png", *runs])
    assert json.loads(capsys.readouterr().out)["samples"] == 2 and Image.open("g.png").size[0] > 0
    cli.main(["score", "tf", "--dataset", "digits", "--limit", "8", "--step", "1", *runs])
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 8 and 0 < result["nats_per_token"] < 20


def test_imported_runs_are_labelled_in_igpt_runs_and_the_demo(imported, capsys):
    """Not "0 steps · no val loss yet" but what the model is; steps only where they are OpenAI's."""
    from igpt_core.pretrained.labels import imported_record
    from igpt_core.runs import create_run

    work, summary = imported
    runs = work / "runs-labels"
    shutil.copytree(work / "runs" / "tf", runs / "tf")
    tf = open_run("tf", runs)
    # an import that holds no OpenAI training steps, as a Hugging Face import (one checkpoint at step 0)
    hub = create_run(runs, "hub", {"dataset": "imported:someone/igpt", "model_config": tf.info["model_config"],
                                   "imported": imported_record("hf", "someone/igpt", "someone/igpt")}, tf.palette)
    hub_label = imported_label(hub)
    assert summary["label"] == imported_label(tf) and hub_label.startswith("someone/igpt · pre-trained (imported)")

    cli.main(["runs", "--runs-dir", str(runs)])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["tf"].endswith(summary["label"]) and lines["tf"].split()[1:7] == ["imported", "ar", "-", "4", "2", "-"]
    assert lines["hub"].endswith(hub_label) and lines["hub"].split()[1:7] == ["imported", "ar", "-", "4", "-", "-"]
    cli.main(["runs", "--runs-dir", str(runs), "--json"])
    assert [row["label"] for row in json.loads(capsys.readouterr().out)] == [hub_label, summary["label"]]

    models = app_module("demo_models").Models(runs)
    picker = dict((value, text) for text, value in models.refresh(None)[0].choices)
    assert picker["tf"] == f"tf — {summary['label']} · 4×4 · 2 steps of OpenAI's training"
    assert picker["hub"] == f"hub — {hub_label} · 4×4"
    facts = models.choose_run("tf")[0]
    assert summary["label"] in facts and "2 steps of OpenAI's training" in facts and "no val" not in facts


def test_steps_choose_checkpoints(tmp_path, capsys):
    cli.main(["import-openai", "--from", str(FIXTURES), "--name", "late", "--steps", "2", "--runs-dir",
              str(tmp_path), "--json"])
    assert open_run("late", tmp_path).checkpoints() == [2]
    err = igpt_error(capsys, "import-openai", "--from", FIXTURES, "--name", "x", "--steps", "1,3", "--runs-dir", tmp_path)
    assert "no model.ckpt-3.index" in err and "steps there: [1, 2]" in err


# -- damaged or foreign input: one line, exit 2, no run left behind ---------------------------------


def truncate_shard(folder):
    path = folder / "model.ckpt-2.data-00001-of-00003"
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(folder):
    entry = TensorBundle(folder / "model.ckpt-2").entries["model/h0/mlp/c_fc/w"]
    path = folder / "model.ckpt-2.data-00001-of-00003"
    data = bytearray(path.read_bytes())
    data[entry.offset + 5] ^= 0x01
    path.write_bytes(bytes(data))


def remove_shard(folder):
    (folder / "model.ckpt-1.data-00002-of-00003").unlink()


def foreign_index(folder):  # a width-8 model's index beside the width-16 model's shards
    shutil.copy(FIXTURES / "other_width" / "model.ckpt-1.index", folder / "model.ckpt-2.index")


@pytest.mark.parametrize("damage, extra, message", [
    (truncate_shard, [], "model.ckpt-2.data-00001-of-00003 has 46564 bytes but its index accounts for 46664: the shard is truncated"),
    (flip_byte, [], "tensor 'model/h0/mlp/c_fc/w' in model.ckpt-2.data-00001-of-00003 fails its crc32c check"),
    (remove_shard, [], "model.ckpt-1.data-00002-of-00003 is missing"),
    (foreign_index, [], "its index accounts for"),
    (None, ["--n-head", "4"], "--n-head 4 does not fit model.ckpt-1: its attention weights are split into 2 heads"),
], ids=["truncated-shard", "flipped-byte", "missing-shard", "foreign-index", "wrong-n-head"])
def test_bad_checkpoints_get_one_line_and_leave_no_run(tmp_path, capsys, damage, extra, message):
    folder = copy_fixtures(tmp_path / "ckpt")
    if damage is not None:
        damage(folder)
    runs = tmp_path / "runs"
    err = igpt_error(capsys, "import-openai", "--from", folder, "--name", "bad", "--runs-dir", runs, *extra)
    assert message in err
    assert not runs.exists() or list(runs.iterdir()) == []  # not even a hidden half-built folder


def test_size_or_folder_is_required(tmp_path, capsys):
    err = igpt_error(capsys, "import-openai", "--name", "x", "--runs-dir", tmp_path)
    assert "give a SIZE to download (s, m or l) or a folder with --from DIR" in err
    err = igpt_error(capsys, "import-openai", "--from", tmp_path / "nowhere", "--name", "x", "--runs-dir", tmp_path)
    assert "there is no folder" in err


# -- downloads --------------------------------------------------------------------------------------


def checkpoint_files(steps=STEPS) -> dict[str, bytes]:
    """The fixtures as OpenAI's server lays out iGPT-S: {URL path: bytes}, with the palette."""
    files = {"/color-clusters/kmeans_centers.npy": (FIXTURES / "kmeans_centers.npy").read_bytes()}
    for step in steps:
        for name in [f"model.ckpt-{step}.index"] + [s for s in SHARDS if s.startswith(f"model.ckpt-{step}.")]:
            files[f"/checkpoints/igpt-s/{step}/{name}"] = (FIXTURES / name).read_bytes()
    return files


def test_download_resumes_after_a_cut_connection(tmp_path, capsys, serve_files):
    files = checkpoint_files()
    cut_name = "model.ckpt-2.data-00001-of-00003"
    server = serve_files(files, cut=f"/checkpoints/igpt-s/2/{cut_name}")
    url = server.url
    args = ["import-openai", "s", "--name", "dl", "--steps", "1,2", "--url", url, "--download-dir",
            str(tmp_path / "dl"), "--runs-dir", str(tmp_path / "runs"), "--json"]
    err = igpt_error(capsys, *args)
    half = len(files[server.requests[-1][0]]) // 2
    assert f"the download of {url}/checkpoints/igpt-s/2/{cut_name} stopped after {half} of {2 * half} bytes" in err
    assert "run the same command again to resume it" in err
    assert (tmp_path / "dl" / (cut_name + ".part")).stat().st_size == half
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []

    cli.main(args)
    summary = json.loads(capsys.readouterr().out)
    assert (f"/checkpoints/igpt-s/2/{cut_name}", f"bytes={half}-") in server.requests  # resumed, not restarted
    assert sum(path.endswith(".index") for path, _ in server.requests) == 2  # finished files are not fetched again
    for name in ["kmeans_centers.npy", "model.ckpt-1.index", "model.ckpt-2.index", *SHARDS]:
        assert (tmp_path / "dl" / name).read_bytes() == (FIXTURES / name).read_bytes(), name
    assert not list((tmp_path / "dl").glob("*.part"))
    assert summary["checkpoints"] == STEPS
    assert open_run("dl", tmp_path / "runs").info["imported"]["from"] == f"{url}/checkpoints/igpt-s"


def test_missing_file_on_the_server_is_one_line(tmp_path, capsys, serve_files):
    url = serve_files({}).url
    err = igpt_error(capsys, "import-openai", "m", "--name", "x", "--url", url, "--download-dir",
                     tmp_path / "dl", "--runs-dir", tmp_path / "runs")
    assert f"the download of {url}/color-clusters/kmeans_centers.npy failed (HTTP 404" in err


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("dataset_first", [True, False], ids=["dataset-first", "checkpoint-first"])
def test_the_palette_is_fetched_once_for_datasets_and_checkpoints(tmp_path, capsys, monkeypatch, serve_files,
                                                                   dataset_first):
    """openai:cifar10 and iGPT-S set up in one data folder, in either order: one palette download."""
    ids = np.random.default_rng(0).integers(0, 16, size=(3, 1024)).astype(np.uint16)  # the fixtures' 16 colours
    files = {**checkpoint_files([1]), "/datasets/cifar10_teX.npy": npy_bytes(ids),
             "/datasets/cifar10_teY.npy": npy_bytes(np.eye(10, dtype=np.float32)[[4, 0, 9]])}
    server = serve_files(files)
    data = tmp_path / "data"
    monkeypatch.setenv("IGPT_DATA_DIR", str(data))
    monkeypatch.setenv("IGPT_OPENAI_URL", server.url)

    def set_up_dataset():
        return load_dataset("openai:cifar10", "test", download=True)

    def set_up_checkpoint():
        cli.main(["import-openai", "s", "--name", "s", "--steps", "1", "--runs-dir", str(tmp_path / "runs"), "--json"])
        return json.loads(capsys.readouterr().out)

    if dataset_first:
        dataset, summary = set_up_dataset(), set_up_checkpoint()
    else:
        summary, dataset = set_up_checkpoint(), set_up_dataset()
    assert server.fetched("/color-clusters/kmeans_centers.npy") == 1
    assert server.fetched("/checkpoints/igpt-s/1/model.ckpt-1.index") == 1
    palette = (FIXTURES / "kmeans_centers.npy").read_bytes()
    for copy in (data / "openai" / "kmeans_centers.npy", data / "openai" / "igpt-s" / "kmeans_centers.npy"):
        assert copy.read_bytes() == palette, copy
    assert np.array_equal(dataset.token_ids, ids) and dataset.labels.tolist() == [4, 0, 9]
    run = open_run("s", tmp_path / "runs")
    assert summary["checkpoints"] == [1] and np.array_equal(run.palette.colors, dataset.palette.colors)


# -- the bundle reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoded, value", [(b"\x00", 0), (b"\x01", 1), (b"\x7f", 127), (b"\x80\x01", 128),
                                            (b"\xac\x02", 300), (b"\xff\xff\xff\xff\x0f", 2**32 - 1),
                                            (b"\x80\x80\x80\x80\x80\x01", 2**35)])
def test_varints(encoded, value):
    assert read_varint(b"\x05" + encoded + b"\x09", 1) == (value, 1 + len(encoded))


def test_a_varint_cut_short_is_an_error():
    with pytest.raises(CheckpointError, match="varint runs past its end"):
        read_varint(b"\x80\x80", 0)


def test_crc_is_masked_as_tensorflow_stores_it():
    crc = google_crc32c.value(b"123456789")
    assert crc == 0xE3069283  # CRC-32C's check value
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    bundle = TensorBundle(FIXTURES / "model.ckpt-1")
    entry = bundle.entries["model/wte"]
    data = (FIXTURES / "model.ckpt-1.data-00001-of-00003").read_bytes()[entry.offset:entry.offset + entry.size]
    assert masked_crc32c(data) == entry.crc32c != google_crc32c.value(data)


def test_bundle_reads_tensorflows_index():
    bundle = TensorBundle(FIXTURES / "model.ckpt-2")
    assert bundle.num_shards == 3
    assert {"global_step", "beta1_power", "beta2_power", "model/wte/Adam", "model/wte/Adam_1"} <= set(bundle.entries)
    assert bundle.shape("model/h1/attn/q_proj") == (2, 8, 16) and bundle.shape("model/sos") == (16,)
    assert bundle.read("global_step") == 2
    # 70 entries in one block: the keys after its first restart point are rebuilt from shared prefixes
    keys = [key for key, _ in read_table((FIXTURES / "model.ckpt-2.index").read_bytes())]
    assert keys[0] == b"" and keys == sorted(keys) and len(keys) == 1 + len(bundle.entries)
    assert parse_message(read_table((FIXTURES / "model.ckpt-2.index").read_bytes())[0][1])[1] == [3]


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def encode_block(pairs, restart_every=2) -> bytes:
    """A LevelDB block as TensorFlow's table writer lays it out, with its trailer (no compression)."""
    body, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(pairs):
        shared = 0
        if i % restart_every:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(body))
        body += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        body += key[shared:] + value
        previous = key
    body += b"".join(r.to_bytes(4, "little") for r in restarts) + len(restarts).to_bytes(4, "little")
    return bytes(body) + b"\x00" + masked_crc32c(bytes(body) + b"\x00").to_bytes(4, "little")


def encode_table(blocks) -> bytes:
    """A table of several data blocks, an empty metaindex block, an index block and the footer."""
    table, index = b"", []
    for pairs in blocks:
        block = encode_block(pairs)
        index.append((pairs[-1][0], encode_varint(len(table)) + encode_varint(len(block) - 5)))
        table += block
    meta = (len(table), len(encode_block([])) - 5)
    table += encode_block([])
    handle = (len(table), len(encode_block(index)) - 5)
    table += encode_block(index)
    handles = b"".join(encode_varint(v) for v in (*meta, *handle))
    return table + handles.ljust(40, b"\x00") + TABLE_MAGIC.to_bytes(8, "little")


def test_table_with_several_blocks_and_restarts():
    pairs = [(f"model/h{i}/attn/{p}".encode(), bytes([i, len(p)])) for i in range(4) for p in ("c_proj", "k_proj", "q_proj")]
    blocks = [pairs[:5], pairs[5:9], pairs[9:]]
    assert read_table(encode_table(blocks)) == pairs


def test_a_damaged_table_block_is_an_error():
    table = bytearray(encode_table([[(b"a", b"1"), (b"ab", b"2")]]))
    table[3] ^= 0xFF  # inside the first data block
    with pytest.raises(CheckpointError, match="fails its crc32c check"):
        read_table(bytes(table))
    with pytest.raises(CheckpointError, match="no table footer"):
        read_table(bytes(table[:-1]))


def test_label_of_runs_igpt_trained_and_of_older_imports(tmp_path):
    from igpt_core.palette import Palette
    from igpt_core.runs import create_run

    config = preset("s").to_dict()
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)))
    trained = create_run(tmp_path, "mine", {"dataset": "digits", "model_config": config}, palette)
    assert imported_label(trained) is None
    older = create_run(tmp_path, "old", {"dataset": "imported:openai/imagegpt-small", "model_config": config}, palette)
    assert imported_label(older) == "OpenAI iGPT-S · pre-trained (imported) · 76M"
