"""Tests for the Streamlit probe dashboard (apps/dashboard.py).

Fast tests drive the page with `streamlit.testing.v1.AppTest` on a runs folder written here: run.json,
metrics.jsonl and probe results in the agreed format (several checkpoints × layers), so the charts can
be compared number by number with what is stored. One end-to-end test trains a real tiny run and
presses the page's "Compute probes" button (the real `probe_run`); one browser test serves the page
with `streamlit run` and looks at it in Debian's Chromium through Playwright.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import browser_page, free_port, keep_screenshot
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from igpt_core.probe import load_probe_results
from igpt_core.runs import Run

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "dashboard.py"


# -- a runs folder written by hand, in the stored formats -----------------------------------------------------


def _acc(step: int, layer: int, n_layer: int, base: float) -> float:
    """A plausible probe accuracy: grows with training, peaks in the middle layers."""
    depth = layer / n_layer
    return round(min(0.99, base + 0.08 * math.log10(step) - 0.25 * (depth - 0.55) ** 2), 4)


def write_run(runs_dir: Path, name: str, *, objective="ar", n_layer=4, steps=(10, 30, 100, 300), probes=True,
              base=0.55, dataset="digits", **info_extra) -> Path:
    path = runs_dir / name
    (path / "checkpoints").mkdir(parents=True)
    info = {"format": 1, "name": name, "dataset": dataset, "preset": "tiny",
            "model_config": {"n_layer": n_layer, "n_embd": 32, "n_head": 2, "vocab_size": 17, "n_positions": 64,
                             "objective": objective},
            "train_config": {"seed": 0, "steps": max(steps)}, "classes": [str(i) for i in range(10)], **info_extra}
    (path / "run.json").write_text(json.dumps(info))
    val_loss = {s: round(2.2 - 0.35 * math.log10(s) + (0.03 if objective == "bert" else 0.0), 4) for s in steps}
    lines = []
    for step in range(1, max(steps) + 1):
        row = {"step": step, "loss": round(2.5 - 0.4 * math.log10(step) + 0.05 * math.sin(step), 4), "lr": 0.003}
        if step in val_loss:
            row.update(val_loss=val_loss[step], val_bits_per_token=val_loss[step] / math.log(2))
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if probes:
        rows = [{"step": s, "val_loss": val_loss[s], "layer": layer, "val_acc": _acc(s, layer, n_layer, base + 0.01),
                 "test_acc": _acc(s, layer, n_layer, base), "C": 0.1 * (1 + layer % 2)}
                for s in steps for layer in range(n_layer + 1)]
        table = {"format": 1, "dataset": dataset, "objective": objective, "n_layer": n_layer,
                 "created": "2025-01-01T00:00:00", "settings": {},
                 "rows": rows,
                 "references": {"raw_pixels": {"val_acc": 0.61, "test_acc": 0.6, "C": 1.0},
                                "random_init": [{"layer": layer, "val_acc": 0.35 + 0.01 * layer,
                                                 "test_acc": 0.34 + 0.01 * layer, "C": 1.0}
                                                for layer in range(n_layer + 1)]}}
        (path / "probes").mkdir()
        (path / "probes" / f"{dataset}.json").write_text(json.dumps(table, indent=2))
    return path


def write_classifier(runs_dir: Path, name: str, base_run: str, test_acc=0.93, val_acc=0.94) -> Path:
    path = runs_dir / name
    path.mkdir(parents=True)
    info = {"format": 1, "name": name, "kind": "classifier", "base_run": base_run, "base_step": 300,
            "dataset": "digits", "model_config": {"n_layer": 4, "n_embd": 32, "n_head": 2, "vocab_size": 17,
                                                  "n_positions": 64, "objective": "ar"},
            "val_acc": val_acc, "test_acc": test_acc, "best_step": 40}
    (path / "run.json").write_text(json.dumps(info))
    return path


@pytest.fixture()
def fake_runs(tmp_path):
    """An AR run (4 layers, 4 checkpoints), a BERT run (2 layers, 2 checkpoints), a fine-tuned classifier of
    the AR run, and a run that was trained but never probed."""
    runs = tmp_path / "runs"
    write_run(runs, "ar", objective="ar", n_layer=4, steps=(10, 30, 100, 300))
    write_run(runs, "bert", objective="bert", n_layer=2, steps=(50, 200), base=0.45)
    write_classifier(runs, "ar-ft-digits", "ar")
    write_run(runs, "unprobed", probes=False, steps=(10, 20))
    return runs


def stored(runs: Path, name: str, dataset: str = "digits") -> dict:
    return json.loads((runs / name / "probes" / f"{dataset}.json").read_text())


# -- driving the page -----------------------------------------------------------------------------------------


class RecordingStorage(MemoryMediaFileStorage):
    """The test runtime's media store, remembered so that a download button's bytes can be read back."""

    last: RecordingStorage | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingStorage.last = self


@pytest.fixture()
def app(monkeypatch):
    monkeypatch.setattr("streamlit.testing.v1.app_test.MemoryMediaFileStorage", RecordingStorage)

    def make(runs_dir: Path, timeout: float = 60) -> AppTest:
        monkeypatch.setenv("IGPT_RUNS_DIR", str(runs_dir))
        at = AppTest.from_file(str(APP), default_timeout=timeout)
        return at.run()

    return make


def decode(value):
    """A plotly array from the chart spec: a list, or plotly 7's {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            array = array.reshape([int(s) for s in shape.split(",")] if isinstance(shape, str) else shape)
        return array.tolist()
    return list(value)


def charts(at: AppTest) -> dict[str, dict]:
    """{chart title: plotly spec} of every plotly chart on the page."""
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        title = spec["layout"]["title"]["text"]
        assert title not in out
        out[title] = spec
    return out


def chart(at: AppTest, starts_with: str) -> dict:
    found = [spec for title, spec in charts(at).items() if title.startswith(starts_with)]
    assert len(found) == 1, (starts_with, list(charts(at)))
    return found[0]


def traces(spec: dict) -> dict[str, dict]:
    """{trace name: {"x": [...], "y": [...], ...}} with arrays decoded."""
    out = {}
    for trace in spec["data"]:
        if trace.get("name") is None:
            continue
        out[trace["name"]] = {k: decode(v) if k in ("x", "y", "customdata") else v for k, v in trace.items()}
    return out


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def csv_of(at: AppTest, key: str) -> pd.DataFrame:
    """The bytes behind a download button, read back from the test runtime's media store."""
    (button,) = [b for b in at.get("download_button") if b.proto.id.endswith(f"-csv:{key}")]
    name = button.proto.url.rsplit("/", 1)[-1]
    return pd.read_csv(io.BytesIO(RecordingStorage.last.get_file(name).content))


def by_layer(table: dict, step: int) -> list[dict]:
    return sorted((r for r in table["rows"] if r["step"] == step), key=lambda r: r["layer"])


def best_layer(rows: list[dict]) -> dict:
    best = max(r["val_acc"] for r in rows)
    return next(r for r in rows if r["val_acc"] == best)  # rows by layer: the shallowest on ties


# -- chart 1: accuracy by layer ------------------------------------------------------------------------------


def test_layer_chart_equals_the_stored_probe_table(fake_runs, app):
    at = app(fake_runs)
    no_exception(at)
    assert at.multiselect(key="runs").value == ["ar", "bert"]  # default: the runs that have probes
    table = stored(fake_runs, "ar")
    spec = chart(at, "Linear-probe test accuracy by layer — ar (AR, 4 layers")
    lines = traces(spec)
    steps = sorted({r["step"] for r in table["rows"]})
    assert [name for name in lines if name.startswith("step ")] == [f"step {s}" for s in steps]
    for step in steps:
        rows = by_layer(table, step)
        assert lines[f"step {step}"]["x"] == [r["layer"] for r in rows]
        assert lines[f"step {step}"]["y"] == pytest.approx([r["test_acc"] for r in rows])
    stars = lines["best layer (by val acc)"]
    assert stars["marker"]["symbol"] == "star"
    assert stars["x"] == [best_layer(by_layer(table, s))["layer"] for s in steps]
    assert stars["y"] == pytest.approx([best_layer(by_layer(table, s))["test_acc"] for s in steps])
    refs = table["references"]
    assert lines["raw pixels"]["y"] == pytest.approx([refs["raw_pixels"]["test_acc"]] * 2)
    assert lines["raw pixels"]["line"]["dash"] == "dash"
    assert lines["random init"]["x"] == [r["layer"] for r in refs["random_init"]]
    assert lines["random init"]["y"] == pytest.approx([r["test_acc"] for r in refs["random_init"]])
    assert lines["random init"]["line"]["dash"] == "dot"
    assert spec["layout"]["xaxis"]["title"]["text"].startswith("layer (0 = embeddings")
    assert spec["layout"]["yaxis"]["title"]["text"] == "test accuracy"
    # colour by training step: one colour per checkpoint, all different
    assert len({lines[f"step {s}"]["line"]["color"] for s in steps}) == len(steps)


def test_toggle_shows_validation_accuracy(fake_runs, app):
    at = app(fake_runs)
    at.toggle(key="use_val").set_value(True).run()
    no_exception(at)
    table = stored(fake_runs, "bert")
    lines = traces(chart(at, "Linear-probe validation accuracy by layer — bert"))
    for step in (50, 200):
        assert lines[f"step {step}"]["y"] == pytest.approx([r["val_acc"] for r in by_layer(table, step)])
    assert lines["raw pixels"]["y"] == pytest.approx([table["references"]["raw_pixels"]["val_acc"]] * 2)


def test_choosing_checkpoints_and_runs_changes_the_charts(fake_runs, app):
    at = app(fake_runs)
    at.multiselect(key="steps:ar").set_value([30, 300]).run()
    no_exception(at)
    lines = traces(chart(at, "Linear-probe test accuracy by layer — ar "))
    assert [n for n in lines if n.startswith("step ")] == ["step 30", "step 300"]
    assert lines["step 300"]["y"] == pytest.approx([r["test_acc"] for r in by_layer(stored(fake_runs, "ar"), 300)])
    assert set(at.dataframe[0].value.step.dropna()) == {30, 300}
    assert "AR vs BERT" in " ".join(charts(at))

    at.multiselect(key="runs").set_value(["bert"]).run()
    no_exception(at)
    titles = list(charts(at))
    assert any(t.startswith("Linear-probe test accuracy by layer — bert") for t in titles)
    assert not any("— ar " in t or "AR vs BERT" in t or "fine-tuning" in t for t in titles)
    assert "choose runs of both objectives" in texts(at.info)
    assert list(traces(chart(at, "Validation loss vs best-layer"))) == ["bert"]


def test_csv_download_matches_the_table_and_the_stored_results(fake_runs, app):
    at = app(fake_runs)
    table = stored(fake_runs, "ar")
    csv = csv_of(at, "layers:ar")
    shown = at.dataframe[0].value
    assert len(csv) == len(shown) == len(table["rows"]) + 1 + len(table["references"]["random_init"])
    points = csv[csv.series == "checkpoint"]
    expected = sorted((r["step"], r["layer"], r["val_acc"], r["test_acc"], r["C"], r["val_loss"])
                      for r in table["rows"])
    got = sorted(zip(points.step.astype(int), points.layer.astype(int), points.val_acc, points.test_acc, points.C,
                     points.val_loss))
    assert got == [pytest.approx(e) for e in expected]
    assert points.best_layer.sum() == 4  # one best layer per checkpoint
    raw = csv[csv.series == "raw pixels"].iloc[0]
    assert (raw.val_acc, raw.test_acc) == (0.61, 0.6)
    np.testing.assert_allclose(csv.test_acc.to_numpy(), shown.test_acc.to_numpy(float))


# -- chart 2: val loss against best-layer accuracy --------------------------------------------------------------


def test_loss_vs_best_layer_accuracy_with_spearman(fake_runs, app):
    from scipy.stats import spearmanr

    at = app(fake_runs)
    spec = chart(at, "Validation loss vs best-layer probe test accuracy")
    lines = traces(spec)
    xs, ys = [], []
    for name in ("ar", "bert"):
        table = stored(fake_runs, name)
        steps = sorted({r["step"] for r in table["rows"]})
        bests = [best_layer(by_layer(table, s)) for s in steps]
        assert lines[name]["x"] == pytest.approx([b["val_loss"] for b in bests])
        assert lines[name]["y"] == pytest.approx([b["test_acc"] for b in bests])
        xs += [b["val_loss"] for b in bests]
        ys += [b["test_acc"] for b in bests]
    # one ρ per run (bert has 2 checkpoints: too few for a rank correlation)
    rho = spearmanr(xs[:4], ys[:4]).statistic
    assert f"Spearman ρ = {rho:+.2f} (ar), n/a (bert)" in spec["layout"]["title"]["text"]
    assert rho == pytest.approx(-1.0)  # the fake AR run: lower loss, better probe at every checkpoint
    assert spec["layout"]["xaxis"]["title"]["text"] == "val loss (nats/token)"
    assert "ar: ρ = -1.00 (4 checkpoints)" in texts(at.caption)
    csv = csv_of(at, "loss-vs-acc")
    assert csv.val_loss.tolist() == pytest.approx(xs) and csv.test_acc.tolist() == pytest.approx(ys)

    # a checkpoint whose order disagrees changes ρ: swap two checkpoints' accuracies
    path = fake_runs / "ar" / "probes" / "digits.json"
    table = json.loads(path.read_text())
    for row in table["rows"]:
        if row["step"] in (10, 300):  # the first checkpoint now probes best, the last worst
            row["val_acc"] = row["test_acc"] = 0.9 if row["step"] == 10 else 0.5
    path.write_text(json.dumps(table))
    at.run()
    bests = [best_layer(by_layer(table, s)) for s in (10, 30, 100, 300)]
    rho = spearmanr([b["val_loss"] for b in bests], [b["test_acc"] for b in bests]).statistic
    assert f"Spearman ρ = {rho:+.2f} (ar)" in chart(at, "Validation loss vs best-layer")["layout"]["title"]["text"]
    assert rho != pytest.approx(-1.0)


# -- chart 3 and 4: fine-tuning, training curves -----------------------------------------------------------------


def test_finetuning_bars_and_training_curves(fake_runs, app):
    at = app(fake_runs)
    no_exception(at)
    bars = traces(chart(at, "Linear probe (best layer and checkpoint) vs fine-tuning"))
    assert bars["test accuracy"]["x"] == ["ar: best linear probe", "ar: fine-tuned (ar-ft-digits)"]
    best = max(stored(fake_runs, "ar")["rows"], key=lambda r: (r["val_acc"], -r["step"]))
    assert bars["test accuracy"]["y"] == pytest.approx([best["test_acc"], 0.93])
    assert bars["validation accuracy"]["y"] == pytest.approx([best["val_acc"], 0.94])

    curves = traces(chart(at, "Training curves"))
    metrics = Run(fake_runs / "ar").metrics()
    assert curves["ar: train loss"]["x"] == [m["step"] for m in metrics]
    assert curves["ar: train loss"]["y"] == pytest.approx([m["loss"] for m in metrics])
    evals = [m for m in metrics if "val_loss" in m]
    assert curves["ar: val loss"]["x"] == [m["step"] for m in evals]
    assert curves["ar: val loss"]["y"] == pytest.approx([m["val_loss"] for m in evals])
    assert "bert: val loss" in curves
    assert chart(at, "Training curves")["layout"]["yaxis"]["title"]["text"] == "loss (nats/token)"
    assert len(csv_of(at, "training")) == len(metrics) + len(Run(fake_runs / "bert").metrics())


def test_training_table_in_bits_per_token_also_from_old_val_bpd_logs(fake_runs, app):
    # runs logged before the rename wrote bits/token under "val_bpd": their table column is still filled
    path = fake_runs / "bert" / "metrics.jsonl"
    path.write_text(path.read_text().replace('"val_bits_per_token"', '"val_bpd"'))
    at = app(fake_runs)
    no_exception(at)
    table = csv_of(at, "training")
    evals = table[table.val_loss.notna()]
    assert {"ar", "bert"} <= set(evals.run)
    assert evals.val_bits_per_token.to_numpy() == pytest.approx(evals.val_loss.to_numpy() / math.log(2))
    assert "val_bpd" not in table.columns
    assert "Bits per token" in texts(at.caption) and "lossy" in texts(at.caption)


# -- no runs, no probes, where the runs are -----------------------------------------------------------------------


def test_no_runs_explains_the_commands(tmp_path, app):
    at = app(tmp_path / "nothing-here")
    no_exception(at)
    assert "No runs" in texts(at.warning)
    code = texts(at.code)
    assert "igpt train --dataset digits --preset tiny --name digits" in code and "igpt probe digits" in code
    assert not at.get("plotly_chart")


def test_runs_without_probes_explain_igpt_probe(tmp_path, app):
    runs = tmp_path / "runs"
    write_run(runs, "digits", probes=False, steps=(10, 20))
    at = app(runs)
    no_exception(at)
    assert at.multiselect(key="runs").value == ["digits"]  # nothing probed yet: every run is shown
    assert "igpt probe digits" in texts(at.code)
    assert "No probe results" in " ".join(h.value for h in at.subheader)
    assert list(charts(at)) == ["Training curves: train and validation loss"]


def test_runs_dir_as_script_argument(fake_runs, tmp_path, app, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(APP), "--runs-dir", str(fake_runs)])
    at = app(tmp_path / "empty")  # $IGPT_RUNS_DIR points elsewhere: the argument wins
    no_exception(at)
    assert str(fake_runs.resolve()) in texts(at.caption)
    assert any(t.startswith("Linear-probe test accuracy by layer — ar ") for t in charts(at))


# -- bad input: one run's problem is a warning, the rest of the page works ------------------------------------------


DAMAGES = {
    "truncated": lambda path: path.write_text(path.read_text()[:300]),
    "partial": lambda path: path.write_text(json.dumps({**json.loads(path.read_text()),
                                                        "rows": [{"step": 50, "layer": 0}]})),
    "newer-format": lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), "format": 99})),
    "empty": lambda path: path.write_text(""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_probe_results_warn_and_the_rest_works(fake_runs, app, damage):
    path = fake_runs / "bert" / "probes" / "digits.json"
    DAMAGES[damage](path)
    at = app(fake_runs)
    no_exception(at)
    assert at.multiselect(key="runs").value == ["ar", "bert"]
    warnings = texts(at.warning)
    assert str(path) in warnings
    titles = list(charts(at))
    assert any(t.startswith("Linear-probe test accuracy by layer — ar ") for t in titles)
    assert not any(t.startswith("Linear-probe test accuracy by layer — bert") for t in titles)
    assert "bert: val loss" in traces(chart(at, "Training curves"))  # its metrics are still good


def test_unreadable_or_unknown_run_formats_warn(fake_runs, app):
    (fake_runs / "old").mkdir()
    (fake_runs / "old" / "run.json").write_text(json.dumps({"dataset": "digits", "config": {"layers": 3}}))
    (fake_runs / "broken").mkdir()
    (fake_runs / "broken" / "run.json").write_text("{not json")
    info = json.loads((fake_runs / "bert" / "run.json").read_text())
    (fake_runs / "bert" / "run.json").write_text(json.dumps({**info, "format": 7}))
    at = app(fake_runs)
    no_exception(at)
    warnings = texts(at.warning)
    assert "'old' has a run.json this igpt cannot read (it has no model_config" in warnings
    assert "'broken'" in warnings and "run.json format 7" in warnings
    titles = list(charts(at))
    assert any(t.startswith("Linear-probe test accuracy by layer — ar ") for t in titles)
    assert any(t.startswith("Linear-probe test accuracy by layer — bert") for t in titles)


def test_run_deleted_while_the_page_is_open(fake_runs, app):
    at = app(fake_runs)
    shutil.rmtree(fake_runs / "bert")
    at.run()
    no_exception(at)
    assert "'bert' no longer exists" in texts(at.warning)
    titles = list(charts(at))
    assert any(t.startswith("Linear-probe test accuracy by layer — ar ") for t in titles)
    assert not any("— bert" in t for t in titles)
    at.multiselect(key="runs").set_value(["ar"]).run()  # deselecting it clears the warning
    no_exception(at)
    assert not at.warning


def test_new_results_written_while_open_show_up(fake_runs, app):
    at = app(fake_runs)
    path = fake_runs / "ar" / "probes" / "digits.json"
    table = json.loads(path.read_text())
    for row in table["rows"]:
        if row["step"] == 300:
            row["test_acc"] = 0.5
    path.write_text(json.dumps(table))
    at.run()
    assert traces(chart(at, "Linear-probe test accuracy by layer — ar "))["step 300"]["y"] == [0.5] * 5

    # a checkpoint probed while the page is open joins the chosen checkpoints; deselected ones stay out
    at.multiselect(key="steps:ar").set_value([30]).run()
    table["rows"] += [{**row, "step": 1000, "val_loss": 1.1} for row in table["rows"] if row["step"] == 300]
    path.write_text(json.dumps(table))
    at.run()
    no_exception(at)
    assert at.multiselect(key="steps:ar").value == [30, 1000]
    lines = traces(chart(at, "Linear-probe test accuracy by layer — ar "))
    assert [n for n in lines if n.startswith("step ")] == ["step 30", "step 1000"]


# -- end to end: a real tiny run, probed from the page with the real probe_run ---------------------------------------


@pytest.fixture()
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compute_missing_probes_from_the_page(tmp_path, app, one_torch_thread):
    from conftest import make_run

    runs = tmp_path / "runs"
    run = make_run(runs, "real", "ar", steps=10)
    last = run.checkpoints()[-1]
    at = app(runs, timeout=300)
    no_exception(at)
    assert "igpt probe real" in texts(at.code)  # not probed yet: the page says how
    assert at.selectbox(key="probe_run").value == "real"
    assert at.selectbox(key="probe_step:real").value == last  # the latest unprobed checkpoint
    at.number_input(key="probe_max_train:real:digits").set_value(300)  # a subset keeps the test fast
    at.button(key="probe_go").click().run()
    no_exception(at)
    assert "Probed real at step" in texts(at.success)
    table = load_probe_results(run)
    assert sorted((r["step"], r["layer"]) for r in table.rows) == [(last, layer) for layer in range(3)]
    lines = traces(chart(at, "Linear-probe test accuracy by layer — real (AR, 2 layers"))
    rows = by_layer(table.to_dict(), last)
    assert lines[f"step {last}"]["x"] == [0, 1, 2]
    assert lines[f"step {last}"]["y"] == pytest.approx([r["test_acc"] for r in rows])
    assert lines["raw pixels"]["y"] == pytest.approx([table.references["raw_pixels"]["test_acc"]] * 2)
    assert table.settings["max_train"] == 300
    assert at.button(key="probe_go").disabled  # nothing missing at that checkpoint any more


# -- the real server in a real browser -------------------------------------------------------------------------------


def test_page_renders_in_chromium(fake_runs, tmp_path, chromium):

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "IGPT_RUNS_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--", "--runs-dir", str(fake_runs)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        with browser_page(chromium, f"http://127.0.0.1:{port}/", height=1000, timeout=90_000) as page:
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=90_000)
            page.get_by_text("Linear-probe test accuracy by layer — ar").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
            assert page.locator(".js-plotly-plot").count() >= 1
            assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 4
            assert page.get_by_text("Image GPT probe dashboard").count() == 1
            assert page.locator('[data-testid="stException"]').count() == 0
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            keep_screenshot(shot)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
