"""`igpt paper` (the paper's probe figures) and OpenAI's token datasets end to end, on the run imported
from the tiny TF fixtures (2 layers, 16 colours, 4×4 images, steps 1 and 2) and a small dataset written
here in OpenAI's layout with the fixtures' palette, as OpenAI's encoded CIFAR-10 is written in its own."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_core import cli
from igpt_core.likelihood import score
from igpt_core.probe import load_probe_data, load_probe_results
from igpt_core.runs import open_run

FIXTURES = Path(__file__).parent / "fixtures" / "openai_tf"
SIZES = {"tr": 48, "va": 24, "te": 24}
DATASET = "openai:cifar10"


def igpt_process(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "igpt_core.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def igpt_json(capsys, *args) -> dict:
    """The CLI in this process with --json: its parsed output."""
    cli.main([str(a) for a in args] + ["--json"])
    return json.loads(capsys.readouterr().out)


def write_token_dataset(data_dir: Path) -> dict:
    """OpenAI's cifar10 files under data_dir/openai, with the fixtures' 16 colours; labels that the
    colours tell apart (class 1 draws from the upper half of the palette more often)."""
    root = data_dir / "openai"
    (root / "cifar10").mkdir(parents=True)
    shutil.copy(FIXTURES / "kmeans_centers.npy", root / "kmeans_centers.npy")
    rng = np.random.default_rng(3)
    written = {}
    for code, n in SIZES.items():
        labels = rng.integers(0, 2, n)
        biased = labels[:, None] * 8 + rng.integers(0, 8, (n, 16))
        ids = np.where(rng.random((n, 16)) < 0.6, biased, rng.integers(0, 16, (n, 16))).astype(np.uint16)
        np.save(root / "cifar10" / f"cifar10_{code}X.npy", ids)
        np.save(root / "cifar10" / f"cifar10_{code}Y.npy", np.eye(10, dtype=np.float32)[labels])
        written[code] = (ids, labels)
    return written


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the fixtures imported as run 'tf' (runs/) and the token dataset (data/)."""
    folder = tmp_path_factory.mktemp("paper")
    done = subprocess.run([sys.executable, "-m", "igpt_core.cli", "import-openai", "--from", FIXTURES, "--name", "tf",
                           "--runs-dir", folder / "runs"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = write_token_dataset(folder / "data")
    return folder, written


def fresh_copy(work, tmp_path) -> Path:
    """The imported run and the data in a folder of this test's own (no features cached yet)."""
    folder, _ = work
    for name in ("runs", "data"):
        shutil.copytree(folder / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def painted(work, tmp_path_factory):
    """A copy of `work` where `igpt paper tf --dataset openai:cifar10 --val-images 10` ran: (folder, its JSON)."""
    folder = fresh_copy(work, tmp_path_factory.mktemp("painted"))
    args = ["paper", "tf", "--dataset", DATASET, "--precision", "fp32", "--val-images", "10", "--runs-dir",
            folder / "runs", "--data-dir", folder / "data", "--workers", "1", "--json"]
    done = subprocess.run([sys.executable, "-m", "igpt_core.cli", *map(str, args)], cwd=folder, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return folder, json.loads(done.stdout)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_token_ids_are_read_as_they_are(work, capsys):
    folder, written = work
    run = open_run("tf", folder / "runs")
    data, classes, _, token_ids = load_probe_data(run, DATASET, 4, folder / "data", None, 0)
    for split, code in (("train", "tr"), ("val", "va"), ("test", "te")):
        assert np.array_equal(token_ids[split], written[code][0])
        assert data[split][1].tolist() == written[code][1].tolist()
    assert classes == [str(i) for i in range(10)]
    # igpt score on the ids: the same number as the model's own score of the stored ids.
    result = igpt_json(capsys, "score", "tf", "--dataset", DATASET, "--split", "test", "--precision", "fp32",
                       "--runs-dir", folder / "runs", "--data-dir", folder / "data")
    model = run.load()[0]
    expected = score(model, torch.from_numpy(written["te"][0].astype(np.int64)))["nats_per_token"]
    assert result["images"] == SIZES["te"] and result["nats_per_token"] == pytest.approx(expected, rel=1e-6)


def test_a_run_with_another_palette_gets_one_line(work, tiny_run, runs_dir, capsys):
    folder, _ = work
    for command in (["score", "tiny", "--precision", "fp32"], ["probe", "tiny"], ["paper", "tiny"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--dataset", DATASET, "--runs-dir", str(runs_dir), "--data-dir", str(folder / "data")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "OpenAI's 16-colour palette" in err and "another" in err


def test_paper_writes_csv_and_png_that_match_the_probe_table(work, painted):
    _, written = work
    folder, result = painted
    run = open_run("tf", folder / "runs")
    paper = run.path / "paper"
    assert sorted(result["files"]) == [str(paper / "openai_cifar10.csv"), str(paper / "openai_cifar10.png")]
    assert (paper / "openai_cifar10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(paper / "openai_cifar10.csv")
    table = load_probe_results(run, DATASET)
    stored = {(r["step"], r["layer"]): r for r in table.rows}
    assert [(int(r["step"]), int(r["layer"])) for r in rows] == [(s, layer) for s in (1, 2) for layer in range(3)]
    for row in rows:
        probe = stored[(int(row["step"]), int(row["layer"]))]
        assert float(row["val_acc"]) == probe["val_acc"] and float(row["test_acc"]) == probe["test_acc"]
        assert float(row["C"]) == probe["C"]
        assert (row["best"] == "True") == (table.best(int(row["step"])) is probe)
    # Imported runs have no training log: each checkpoint's loss is scored on the first val images.
    val_ids = torch.from_numpy(written["va"][0][:10].astype(np.int64))
    for step in (1, 2):
        expected = score(run.load(step)[0], val_ids)["nats_per_token"]
        losses = [float(r["val_loss"]) for r in rows if int(r["step"]) == step]
        assert losses == pytest.approx([expected] * 3, rel=1e-6)


def test_paper_resumes_after_sigkill_without_recomputing(work, tmp_path):
    folder = fresh_copy(work, tmp_path)
    args = ["paper", "tf", "--dataset", DATASET, "--precision", "fp32", "--runs-dir", folder / "runs",
            "--data-dir", folder / "data", "--workers", "1"]
    features = folder / "runs" / "tf" / "probes" / "features"
    csv_path = folder / "runs" / "tf" / "paper" / "openai_cifar10.csv"
    process = igpt_process(*args, cwd=folder)
    try:
        deadline = time.monotonic() + 240
        while not list(features.glob("step_*.npz")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, err  # it was stopped mid-way, not finished
    assert not csv_path.exists()
    before = {path.name: path.stat().st_mtime_ns for path in features.glob("*.npz")}
    assert before

    again = igpt_process(*args, cwd=folder)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    after = {path.name: path.stat().st_mtime_ns for path in features.glob("*.npz")}
    assert {name: after[name] for name in before} == before  # what was cached was read, not computed again
    assert len(after) > len(before)
    rows = read_csv(csv_path)
    assert len(rows) == 6 and all(r["val_loss"] for r in rows)
    assert "checkpoints × 3 layers × 96 images" in out


def test_dashboard_shows_the_same_charts(painted):
    from streamlit.testing.v1 import AppTest

    folder, result = painted
    # The dashboard's section alone (apps/dashboard.py calls it with the runs chosen in its sidebar).
    page = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parents[1] / "apps")!r})
from dashboard_paper import paper_section
paper_section(Path({str(folder / "runs")!r}), ["tf"])
"""
    at = AppTest.from_string(page, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(element.proto.spec) for element in at.get("plotly_chart")]
    specs = {spec["layout"]["title"]["text"]: spec for spec in specs}
    rows = result["rows"]["tf"]
    by_layer = {t["name"]: t for t in specs["tf: linear probe accuracy by layer"]["data"] if t.get("name")}
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        assert decoded(by_layer[f"step {step}"]["y"]) == pytest.approx([100 * r["test_acc"] for r in mine])
    (line,) = [t for t in specs["better generative models learn better features"]["data"] if t.get("name") == "tf"]
    best = [r for r in rows if r["best"]]
    assert decoded(line["x"]) == pytest.approx([r["val_loss"] for r in best])
    assert decoded(line["y"]) == pytest.approx([100 * r["test_acc"] for r in best])


def decoded(value) -> list:
    """A plotly array from a chart spec: a list, or plotly's base64 {"dtype", "bdata"} form."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).tolist()
    return list(value)


def test_a_trained_run_takes_its_losses_from_the_metrics_log(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run.path, tmp_path / "runs" / "tiny")
    cli.main(["paper", "tiny", "--checkpoints", "5,40", "--layers", "1,2", "--max-train", "200", "--precision", "fp32",
              "--runs-dir", str(tmp_path / "runs"), "--workers", "1", "--json"])
    out, plan = capsys.readouterr()  # with --json, the plan goes to stderr
    result = json.loads(out)
    assert "tiny: 2 checkpoints × 2 layers" in plan and "validation loss from the run's metrics log" in plan
    logged = open_run("tiny", tmp_path / "runs").val_losses()
    rows = result["rows"]["tiny"]
    assert [(r["step"], r["layer"]) for r in rows] == [(5, 1), (5, 2), (40, 1), (40, 2)]
    assert all(r["val_loss"] == logged[r["step"]] for r in rows) and result["dataset"] == "digits"
    assert not (tmp_path / "runs" / "tiny" / "paper" / "val_loss.json").exists()  # nothing was scored


def test_without_matplotlib_the_csv_is_written_and_one_line_says_why(painted, tmp_path, monkeypatch, capsys):
    source, _ = painted
    shutil.copytree(source / "runs", tmp_path / "runs")
    paper = tmp_path / "runs" / "tf" / "paper"
    (paper / "openai_cifar10.png").unlink()
    (paper / "openai_cifar10.csv").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: importing it fails
    cli.main(["paper", "tf", "--dataset", DATASET, "--precision", "fp32", "--val-images", "10", "--runs-dir",
              str(tmp_path / "runs"), "--data-dir", str(source / "data"), "--workers", "1"])
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: no PNG drawn: matplotlib is not installed (pip install matplotlib); "
                     "the CSVs hold every number"]
    assert len(read_csv(paper / "openai_cifar10.csv")) == 6 and not (paper / "openai_cifar10.png").exists()
