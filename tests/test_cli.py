"""The `igpt` command end to end, as a user runs it: a real process, real files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_core import cli
from igpt_core.runs import Run

IGPT = [sys.executable, "-m", "igpt_core.cli"]


def igpt(*args, cwd, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*IGPT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"igpt {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny run trained through the CLI."""
    work = tmp_path_factory.mktemp("cli")
    out = igpt("train", "--dataset", "digits", "--steps", "12", "--batch-size", "16", "--eval-every", "4",
               "--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--name", "t", "--json", cwd=work)
    summary = json.loads(out.stdout)
    assert summary["steps"] == 12 and Path(summary["path"]).is_dir()
    image = np.zeros((20, 20, 3), np.uint8)
    image[5:15, 8:12] = 255
    Image.fromarray(image).save(work / "digit.png")  # a bar, like a 1
    return work


def test_every_subcommand_has_help(tmp_path, capsys):
    out = igpt("--help", cwd=tmp_path).stdout  # a real process, once
    commands = ["train", "runs", "data", "tokenize", "sample", "score", "surprise", "inside", "probe", "paper", "finetune",
                "classify", "import-hf", "export-hf", "demo", "dashboard"]
    for name in commands:  # each sub-command's help in this process: a new one per command costs ~4 s of imports
        assert name in out
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith("usage: igpt " + name) and "--help" in help_text


def test_precision_is_chosen_on_the_commands_that_run_the_model(capsys):
    parser = cli.build_parser()
    for command in (["probe", "r"], ["paper", "r"], ["score", "r"], ["surprise", "r", "--image", "x.png"],
                    ["inside", "r", "--image", "x.png", "--pixel", "1,1"]):
        assert parser.parse_args(command).precision == "auto"
        assert parser.parse_args([*command, "--precision", "bf16"]).precision == "bf16"
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert parser.parse_args(["demo", "--model-memory", "4GB"]).model_memory == "4GB"
    assert parser.parse_args(["demo"]).model_memory is None  # the library's budget


def test_train_writes_a_run_that_runs_lists(workdir):
    rows = json.loads(igpt("runs", "--json", cwd=workdir).stdout)
    assert [r["name"] for r in rows] == ["t"]
    assert rows[0]["steps"] == 12 and rows[0]["objective"] == "ar" and rows[0]["best_val_bits_per_token"] > 0
    assert rows[0]["label"] is None  # trained here, not imported
    assert "t " in igpt("runs", cwd=workdir).stdout
    evals = [row for row in Run(workdir / "runs" / "t").metrics() if "val_loss" in row]
    assert evals and evals[-1]["step"] == 12  # bits per palette token are logged beside each val loss
    assert all(row["val_bits_per_token"] == pytest.approx(row["val_loss"] / np.log(2)) for row in evals)


def test_runs_lists_an_unreadable_run_in_one_line(tmp_path):
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "run.json").write_text(json.dumps({"format": 1, "dataset": "digits"}))
    (tmp_path / "runs" / "odd").mkdir()
    (tmp_path / "runs" / "odd" / "run.json").write_text(json.dumps({"model_config": {"layers": 3}}))
    result = igpt("runs", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "Traceback" not in result.stderr  # the header, then one line per run
    assert lines[1].startswith("odd ") and "unreadable" in lines[1] and "model_config does not fit" in lines[1]
    assert lines[2].startswith("old ") and "run.json this igpt cannot read (it has no model_config" in lines[2]
    rows = json.loads(igpt("runs", "--json", cwd=tmp_path).stdout)
    assert [(r["name"], "error" in r) for r in rows] == [("odd", True), ("old", True)]
    result = igpt("probe", "old", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "cannot read" in result.stderr and len(result.stderr.splitlines()) == 1


def test_scan_runs_splits_readable_runs_from_unreadable_ones(workdir, tmp_path):
    from igpt_core.runs import scan_runs

    runs = tmp_path / "runs"
    shutil.copytree(workdir / "runs" / "t", runs / "t")
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text("{not json")
    (runs / "half").mkdir()  # no run.json: not a run at all
    readable, problems = scan_runs(runs)
    assert [run.name for run in readable] == ["t"] and list(problems) == ["broken"]
    assert "run.json is damaged" in problems["broken"] and "\n" not in problems["broken"]
    assert scan_runs(tmp_path / "nowhere") == ([], {})


def test_sample_score_surprise(workdir):
    out = json.loads(igpt("sample", "t", "--image", "digit.png", "-n", "3", "--keep-rows", "4", "--out", "g.png",
                          "--json", cwd=workdir).stdout)
    grid = np.asarray(Image.open(workdir / "g.png"))
    assert out["samples"] == 3 and grid.shape[1] > grid.shape[0] * 3  # six cells side by side
    igpt("sample", "t", "--unconditional", "-n", "2", "--out", "u.png", cwd=workdir)
    assert (workdir / "u.png").stat().st_size > 0
    result = json.loads(igpt("score", "t", "--limit", "20", "--json", cwd=workdir).stdout)
    assert result["images"] == 20 and result["bits_per_token"] == pytest.approx(result["nats_per_token"] / np.log(2))
    surprise = json.loads(igpt("surprise", "t", "--image", "digit.png", "--out", "s.png", "--json", cwd=workdir).stdout)
    assert np.array(surprise["nll"]).shape == (8, 8)


def test_sample_and_score_with_int8(workdir):
    image = np.zeros((20, 20, 3), np.uint8)
    image[5:15, 8:12] = 255
    Image.fromarray(image).save(workdir / "digit8.png")
    result = igpt("sample", "t", "--image", "digit8.png", "-n", "2", "--int8", "--out", "g8.png", "--json", cwd=workdir)
    out = json.loads(result.stdout)
    assert out["samples"] == 2 and Image.open(workdir / "g8.png").size[0] > 0
    assert "deprecated" not in result.stderr and "Warning" not in result.stderr  # the fbgemm functions' warnings
    int8 = json.loads(igpt("score", "t", "--limit", "20", "--int8", "--json", cwd=workdir).stdout)
    fp32 = json.loads(igpt("score", "t", "--limit", "20", "--precision", "fp32", "--json", cwd=workdir).stdout)
    assert int8["precision"] == "int8" and fp32["precision"] == "fp32"
    assert int8["bits_per_token"] == pytest.approx(fp32["bits_per_token"], rel=0.01)
    assert "--int8" in igpt("sample", "--help", cwd=workdir).stdout


def test_data_command_writes_examples(tmp_path):
    out = json.loads(igpt("data", "digits", "--json", "--out", "d.png", cwd=tmp_path).stdout)
    assert out["images"] == 1294 and out["resolution"] == 8 and len(out["classes"]) == 10
    assert Image.open(tmp_path / "d.png").size[0] > 100


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet"], "unknown dataset"),
    (["train", "--preset", "huge"], "invalid choice"),
    (["sample", "missing", "--image", "x.png"], "no run named 'missing'"),
    (["sample", "t", "--image", "nothing.png"], "no image at"),
    (["sample", "t", "--image", "digit.png", "--keep-rows", "99"], "rows to keep must lie in 0..8"),
    (["sample", "t", "--image", "digit.png", "--top-p", "0"], "top-p"),
    (["data", "cifar10"], "cifar-10-batches-py"),
    (["train", "--name", "t", "--resume", "--steps", "12"], "differ"),
])
def test_bad_input_gets_one_clear_line(workdir, args, message):
    result = igpt(*args, cwd=workdir, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_reported(workdir, tmp_path):
    shutil.copytree(workdir / "runs" / "t", tmp_path / "runs" / "t")
    last = sorted((tmp_path / "runs" / "t" / "checkpoints").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:200])
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = igpt("sample", "t", "--image", "x.png", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_probe_prints_a_table_and_saves_it(workdir):
    out = igpt("probe", "t", "--checkpoints", "12", "--layers", "0,2", "--concat", "1,2", "--max-train", "300",
               cwd=workdir).stdout
    assert "L0" in out and "L2" in out and "raw pixels" in out and "L1+L2" in out
    stored = json.loads((workdir / "runs" / "t" / "probes" / "digits.json").read_text())
    assert {(r["step"], r["layer"]) for r in stored["rows"]} == {(12, 0), (12, 2)}
    assert [(r["step"], r["layers"]) for r in stored["concat"]] == [(12, [1, 2])]
    file = workdir / "runs" / "t" / "probes" / "digits.json"
    before = file.stat().st_mtime_ns
    again = igpt("probe", "t", "--checkpoints", "12", "--skip-existing", cwd=workdir).stdout  # as make dashboard
    assert "nothing to do" in again and file.stat().st_mtime_ns == before
    for bad in (["--layers", "7"], ["--concat", "1,7"]):
        result = igpt("probe", "t", *bad, cwd=workdir, check=False)
        assert result.returncode == 2 and "0..2" in result.stderr and "Traceback" not in result.stderr


def test_export_then_import_round_trip(workdir):
    igpt("export-hf", "t", "hf-out", cwd=workdir)
    assert (workdir / "hf-out" / "config.json").exists()
    summary = json.loads(igpt("import-hf", "hf-out", "--name", "back", "--json", cwd=workdir).stdout)
    assert summary["name"] == "back" and summary["colors"] == 16
    result = igpt("import-hf", "no-such-folder/x", "--name", "y", cwd=workdir, check=False)
    assert result.returncode == 2 and "save_pretrained" in result.stderr
