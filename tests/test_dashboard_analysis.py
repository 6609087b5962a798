"""The dashboard's section 6, "Inside the representations": the probe accuracy heat map, a probe's
confusion matrix, the CKA maps and the PCA projection over training, checked number by number against
the stored results and the library's own computation. A run written by hand with OpenAI-like steps
(131,000..1,000,000) and a real tiny run probed by `probe_run`; in Chromium, the views render and the
projection plays."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import browser_page, keep_screenshot, make_run, serve_process, stop_process
from streamlit.testing.v1 import AppTest

from igpt_core import analysis
from igpt_core.probe import cached_features, load_probe_results, probe_run
from tests.test_analysis import BIG_STEPS, CLASSES, write_cached_run
from tests.test_dashboard import APP, ROOT, app, chart, csv_of, decode, free_port, no_exception, texts  # noqa: F401


def heatmap(spec: dict) -> dict:
    (trace,) = [t for t in spec["data"] if t["type"] == "heatmap"]
    return {**trace, "z": np.array([decode(row) for row in trace["z"]] if isinstance(trace["z"], list)
                                   else decode(trace["z"]), dtype=float)}


@pytest.fixture()
def big_run(tmp_path):
    """Features cached at every checkpoint but 262,000."""
    runs = tmp_path / "runs"
    cached = (131_000, 524_000, 1_000_000)
    return runs, write_cached_run(runs, "big", BIG_STEPS, cached=cached)


def test_accuracy_heat_map_is_the_stored_grid_with_the_best_probe_marked(big_run, app):
    runs, _ = big_run
    at = app(runs)
    no_exception(at)
    assert "6 · Inside the representations" in [h.value for h in at.header]
    table = load_probe_results("big", runs_dir=runs)
    spec = chart(at, "Probe test accuracy by layer and checkpoint — big")
    grid = heatmap(spec)
    assert grid["x"] == ["131,000", "262,000", "524,000", "1,000,000"] and decode(grid["y"]) == [0, 1, 2, 3]
    for j, step in enumerate(BIG_STEPS):
        assert grid["z"][:, j] == pytest.approx([r["test_acc"] for r in table.rows
                                                 if r["step"] == step])
    (star,) = [t for t in spec["data"] if t.get("name") == "best probe (by val acc)"]
    best = table.best()
    assert star["x"] == [f"{best['step']:,}"] and decode(star["y"]) == [best["layer"]]
    csv = csv_of(at, "inside-acc:big")
    assert csv[["step", "layer", "test_acc"]].values.tolist() == [[r["step"], r["layer"], r["test_acc"]]
                                                                   for r in table.rows]
    assert csv[csv.best].values[:, :2].tolist() == [[best["step"], best["layer"]]]


def test_confusion_matrix_of_the_chosen_probe_with_per_class_accuracy(big_run, app):
    runs, _ = big_run
    at = app(runs)
    table = load_probe_results("big", runs_dir=runs)
    best = table.best()
    assert at.select_slider(key="inside_step:big").value == best["step"]  # the best probe first
    at.select_slider(key="inside_step:big").set_value(262_000).run()
    at.select_slider(key="inside_layer:big").set_value(1).run()
    no_exception(at)
    spec = chart(at, "Test confusion matrix — big, layer 1 at step 262,000")
    assert heatmap(spec)["z"].tolist() == table.confusion(262_000, 1).tolist()
    accuracy = analysis.per_class_accuracy(table.confusion(262_000, 1))
    ticks = spec["layout"]["yaxis"]["ticktext"]
    assert ticks == [f"{c} ({a:.0%})" for c, a in zip(CLASSES, accuracy)]
    csv = csv_of(at, "inside-confusion:big")
    assert csv["true class"].tolist() == CLASSES
    assert csv["per_class_accuracy"].to_numpy() == pytest.approx(accuracy)
    assert csv[[f"predicted {c}" for c in CLASSES]].values.tolist() == table.confusion(262_000, 1).tolist()


def test_cka_maps_equal_the_library_and_missing_features_name_the_command(big_run, app):
    runs, written = big_run
    at = app(runs)
    at.select_slider(key="inside_step:big").set_value(524_000).run()
    no_exception(at)
    between = heatmap(chart(at, "CKA between layers — big at step 524,000"))
    assert between["z"] == pytest.approx(analysis.cka_matrix(written[524_000]), abs=1e-9)
    spec = chart(at, "CKA with the last checkpoint — big")
    assert spec["layout"]["xaxis"]["title"]["text"] == "checkpoint (each layer against itself at step 1,000,000)"
    over = heatmap(spec)
    assert over["x"] == ["131,000", "524,000", "1,000,000"]
    assert over["z"] == pytest.approx(analysis.cka_over_training(written), abs=1e-9)
    csv = csv_of(at, "inside-cka-training:big")
    assert csv.cka.to_numpy() == pytest.approx(analysis.cka_over_training(written).ravel(), abs=1e-9)
    assert "igpt probe big --dataset digits --checkpoints 262000" in texts(at.code)  # no features there

    at.select_slider(key="inside_step:big").set_value(262_000).run()
    no_exception(at)
    assert not [t for t in at.get("plotly_chart") if "CKA between layers" in t.proto.spec]
    assert "No cached features for checkpoint 262,000 of big" in texts(at.info)


def test_projection_is_an_animation_over_the_cached_checkpoints(big_run, app):
    runs, written = big_run
    at = app(runs)
    at.select_slider(key="inside_layer:big").set_value(2).run()
    no_exception(at)
    spec = chart(at, "PCA of layer 2's features — big, coloured by class")
    expected = analysis.pca_over_training({s: f[2] for s, f in written.items()})
    labels = np.arange(40) % 4
    assert [f["name"] for f in spec["frames"]] == ["131000", "524000", "1000000"]
    for frame, step in zip(spec["frames"], sorted(expected)):
        for c, trace in enumerate(frame["data"]):
            assert trace["name"] == CLASSES[c]
            assert decode(trace["x"]) == pytest.approx(expected[step][labels == c, 0].tolist())
            assert decode(trace["y"]) == pytest.approx(expected[step][labels == c, 1].tolist())
    slider = spec["layout"]["sliders"][0]
    assert [s["label"] for s in slider["steps"]] == ["131,000", "524,000", "1,000,000"]
    play = spec["layout"]["updatemenus"][0]["buttons"][0]
    assert play["method"] == "animate" and "Play" in play["label"]
    csv = csv_of(at, "inside-projection:big")
    assert len(csv) == 3 * 40 and csv[csv.step == 1_000_000][["pc1", "pc2"]].to_numpy() == pytest.approx(
        expected[1_000_000])


# -- a real run: features cached by probe_run itself --------------------------------------------------------


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("probed")
    try:
        make_run(runs, "real", steps=20, checkpoints=[10])
        probe_run("real", runs_dir=runs, max_train=200, progress=False, workers=1)
    finally:
        torch.set_num_threads(before)
    return runs


def test_views_of_a_really_probed_run(probed_run, app):
    at = app(probed_run)
    no_exception(at)
    table = load_probe_results("real", runs_dir=probed_run)
    step, layer = table.best()["step"], table.best()["layer"]
    features, labels = cached_features("real", None, step, runs_dir=probed_run)
    between = heatmap(chart(at, f"CKA between layers — real at step {step}"))
    assert between["z"] == pytest.approx(analysis.cka_matrix(features), abs=1e-9)
    confusion = heatmap(chart(at, f"Test confusion matrix — real, layer {layer} at step {step}"))
    assert confusion["z"].tolist() == table.confusion(step, layer).tolist()
    assert confusion["z"].sum() == len(labels)  # every test image counted once
    spec = chart(at, f"PCA of layer {layer}'s features — real")
    assert [f["name"] for f in spec["frames"]] == ["10", "20"]
    assert not at.info or "No cached features" not in texts(at.info)


# -- the real server in Chromium ----------------------------------------------------------------------------


@pytest.fixture()
def served(big_run):
    runs, _ = big_run
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "IGPT_RUNS_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    server, _ = serve_process(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--", "--runs-dir", str(runs)], port, cwd=ROOT, env=env)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_process(server)


def test_views_render_and_the_projection_plays_in_chromium(served, chromium, tmp_path):
    with browser_page(chromium, served, height=1100, timeout=120_000) as page:
        page.get_by_text("6 · Inside the representations").first.wait_for(timeout=120_000)
        for title in ("Probe test accuracy by layer and checkpoint — big", "Test confusion matrix — big",
                      "CKA between layers — big", "CKA with the last checkpoint — big", "PCA of layer"):
            page.get_by_text(title).first.wait_for(timeout=60_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm").count() >= 4
        projection = page.locator(".js-plotly-plot").filter(has_text="PCA of layer").first
        projection.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(tmp_path / "projection-before.png"))
        assert projection.get_by_text("checkpoint: step 131,000").count() == 1  # the slider's current value
        first = projection.locator(".scatterlayer .trace").first.locator(".point").first.get_attribute("transform")
        projection.get_by_text("Play").click()
        projection.get_by_text("checkpoint: step 1,000,000").wait_for(timeout=30_000)  # played to the last frame
        assert projection.get_by_text("checkpoint: step 131,000").count() == 0
        moved = projection.locator(".scatterlayer .trace").first.locator(".point").first.get_attribute("transform")
        assert moved != first  # the points moved with the frames
        page.wait_for_timeout(800)
        page.screenshot(path=str(tmp_path / "projection-after.png"))
        heat = page.locator(".js-plotly-plot").filter(has_text="Probe test accuracy by layer and checkpoint").first
        heat.scroll_into_view_if_needed()
        page.wait_for_timeout(800)
        page.screenshot(path=str(tmp_path / "heat-map.png"))
        for shot in ("projection-before.png", "projection-after.png", "heat-map.png"):
            assert (tmp_path / shot).stat().st_size > 10_000
            keep_screenshot(tmp_path / shot)
