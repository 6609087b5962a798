"""The dashboard's "Where the heads look" section: attention distances stored in runs, charted and
tabled; the button that measures missing checkpoints with the real `explain.run_distances`."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from igpt_core import explain, open_run
from igpt_core.model import ModelConfig
from tests.test_dashboard import app, chart, csv_of, fake_runs, no_exception, texts, traces, write_run  # noqa: F401


def write_distances(runs, name: str, steps, n_layer: int, n_head: int = 2) -> dict:
    """A stored table in the format run_distances writes: heads look further in deeper layers and later."""
    config = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=32, vocab_size=17, n_positions=64)
    rows = [{"step": s, "layer": layer, "head": head, "checkpoint": "size=1;mtime=1",
             "distance": round(1.0 + 0.5 * layer + 0.2 * head + 0.001 * s, 4)}
            for s in steps for layer in range(1, n_layer + 1) for head in range(1, n_head + 1)]
    table = {"format": explain.DISTANCE_FORMAT, "dataset": "digits", "images": 64, "images_hash": "x",
             "n_layer": n_layer, "n_head": n_head, "objective": "ar", "uniform": explain.uniform_distance(config),
             "rows": rows}
    path = runs / name / "attention" / "distance.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table))
    return table


def test_distance_chart_and_csv_are_the_stored_results(fake_runs, app):
    table = write_distances(fake_runs, "ar", steps=(10, 300), n_layer=4)
    at = app(fake_runs)
    no_exception(at)
    assert "5 · Where the heads look" in [h.value for h in at.header]
    lines = traces(chart(at, "Attention distance by layer — ar (AR, 4 layers, 64 digits validation images)"))
    for step in (10, 300):
        mean = [sum(r["distance"] for r in table["rows"] if r["step"] == step and r["layer"] == layer) / 2
                for layer in range(1, 5)]
        assert lines[f"step {step}"]["x"] == [1, 2, 3, 4]
        assert lines[f"step {step}"]["y"] == pytest.approx(mean)
    assert lines["uniform attention"]["y"] == pytest.approx([table["uniform"]] * 2)
    csv = csv_of(at, "distance:ar")
    stored = pd.DataFrame.from_records(table["rows"])[["step", "layer", "head", "distance"]]
    pd.testing.assert_frame_equal(csv[["step", "layer", "head", "distance"]], stored, check_dtype=False)
    assert "No attention distances stored for bert yet." in texts(at.caption)


def test_damaged_distances_warn_and_the_page_goes_on(fake_runs, app):
    path = fake_runs / "ar" / "attention" / "distance.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    at = app(fake_runs)
    no_exception(at)
    assert any("attention distances" in w.value and "damaged" in w.value for w in at.warning)
    assert "4 · Training curves" in [h.value for h in at.header]


def test_button_measures_the_missing_checkpoints(tiny_run, tmp_path, app):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.path, runs / "real")  # a copy: the button writes into the run
    steps = tiny_run.checkpoints()
    at = app(runs, timeout=300)
    no_exception(at)
    button = at.button(key="distance_go:real")
    assert f"({len(steps)} checkpoints)" in button.label
    button.click().run()
    no_exception(at)
    table = explain.load_distances(open_run("real", runs))
    assert sorted({r["step"] for r in table["rows"]}) == steps and len(table["rows"]) == len(steps) * 2 * 2
    lines = traces(chart(at, "Attention distance by layer — real (AR, 2 layers"))
    last = [r["distance"] for r in table["rows"] if r["step"] == steps[-1]]
    assert lines[f"step {steps[-1]}"]["y"] == pytest.approx([sum(last[:2]) / 2, sum(last[2:]) / 2])
    assert not [b for b in at.button if b.key == "distance_go:real"]  # nothing missing any more
