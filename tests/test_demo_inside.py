"""The demo's "Inside the model" tab (apps/inside.py): its endpoints against igpt_core.explain through
gradio_client, and a click on a pixel of the model's view in Debian's Chromium."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gradio_client.exceptions import AppError

from igpt_core import explain, load_dataset, open_run
from conftest import browser_page, keep_screenshot

from igpt_core.render import save_png
from tests.test_demo import IDLE, SIZE, app, as_input, client, grid_cells, read_png, runs  # noqa: F401


def model_and_ids(app, name, index):
    model, palette, _ = open_run(name, app.runs).load()
    return model, palette, palette.encode(load_dataset("digits", "val").images[index][None], SIZE)[0]


@pytest.mark.parametrize("name", ["digits-ar", "digits-bert"])
def test_distribution_is_next_pixel(app, tmp_path, name):
    c = client(app, tmp_path)
    editor, *_ = c.predict(name, 2, api_name="/use_example")
    model, palette, ids = model_and_ids(app, name, 2)
    t = 3 * SIZE + 2  # row 4, column 3 counted from 1
    for temperature, top_k in [(1.0, 0), (0.5, 3)]:
        bars, text, numbers = c.predict("4, 3", temperature, top_k, name, 20, as_input(editor), "",
                                        api_name="/inside_distribution")
        expected = explain.next_pixel(model, ids, t, temperature=temperature, top_k=top_k or None)
        top = expected.topk(3 if top_k else 8)
        assert numbers["top_ids"] == top.indices.tolist()
        np.testing.assert_allclose(numbers["top_probabilities"], top.values, rtol=1e-5)
        assert numbers["top_colors"] == palette.colors[top.indices].tolist()
        assert numbers["true_id"] == int(ids[t]) and numbers["pixel"] == [4, 3]
        assert f"rank **{numbers['true_rank']}**" in text
        assert read_png(bars).shape[0] >= 20 * len(numbers["top_ids"])  # one bar per colour


def test_attention_heads_strip_and_uncertainty_panels(app, tmp_path):
    c = client(app, tmp_path)
    editor, *_ = c.predict("digits-ar", 5, api_name="/use_example")
    view, layers, heads, strip, caption = c.predict("2, 5", 2, "digits-ar", 20, as_input(editor), "",
                                                    api_name="/inside_look")
    n_layer, n_head = 2, 2
    widths = [read_png(p).shape[1] for p in (layers, heads, strip)]
    assert widths[0] > n_layer * 150 and widths[1] > n_head * 150 and widths[2] > (n_layer + 1) * 150
    model, palette, ids = model_and_ids(app, "digits-ar", 5)
    marked = read_png(view)
    assert (marked == [0, 200, 255]).all(-1).any(), "the clicked pixel is outlined on the view"
    true_p = explain.layer_predictions(model, ids)[-1, 1 * SIZE + 4, int(ids[1 * SIZE + 4])].exp()
    assert f"{float(true_p):.2f} at the output" in caption

    picture, text = c.predict("digits-ar", 20, as_input(editor), "", api_name="/inside_uncertainty")
    assert read_png(picture).shape[1] > 2.5 * read_png(picture).shape[0]  # view, entropy, surprise side by side
    mean = float(re.search(r"Mean uncertainty \*\*([0-9.]+) nats", text).group(1))
    assert mean == pytest.approx(float(explain.entropy_map(model, ids).mean()), abs=6e-3)

    with pytest.raises(AppError, match="outside the 8×8 image"):
        c.predict("9, 1", 1.0, 0, "digits-ar", 20, as_input(editor), "", api_name="/inside_distribution")


def test_a_streaming_completion_shows_what_each_next_pixel_is_drawn_from(app, tmp_path):
    """The page's own Demo object: each frame's numbers are `next_pixel` of sample 1 at the next pixel."""
    actions = app.module.Demo(app.runs)
    model, palette, _ = open_run("digits-ar", app.runs).load()
    image = load_dataset("digits", "val").images[4]
    frames = list(actions.complete("digits-ar", 20, None, image, "", 4, 2, 0.8, 5, 3, "every row", True))
    assert frames[0][2] is None  # before the first pixel arrives
    rows = []
    for i, (grid, _, numbers) in enumerate(frames[1:]):
        save_png(grid, tmp_path / f"{i}.png")
        sample = grid_cells(tmp_path / f"{i}.png", 2)[3]  # sample 1, in palette colours (grey not drawn yet)
        row, col = numbers["pixel"]
        t = (row - 1) * SIZE + (col - 1)
        expected = explain.next_pixel(model, palette.encode(sample[None], SIZE)[0], t, temperature=0.8, top_k=5)
        assert numbers["top_ids"] == expected.topk(5).indices.tolist()
        np.testing.assert_allclose(numbers["top_probabilities"], expected.topk(5).values, rtol=1e-5)
        rows.append(row)
    assert rows == [6, 7, 8, 8]  # the first pixel of each next row; the last frame keeps the last one
    assert all(frame[2] is None for frame in actions.complete("digits-ar", 20, None, image, "", 4, 1, 1.0, 0, 3,
                                                              "every row"))


def test_browser_click_on_a_pixel_shows_the_panels(app, tmp_path, chromium):
    with browser_page(chromium, app.url, height=1600) as page:
        page.wait_for_function("() => document.querySelector('#view img')", timeout=60_000)
        page.get_by_role("tab", name="Inside the model").click()
        page.wait_for_function("() => document.querySelector('#inside-view img')", timeout=60_000)
        page.wait_for_function(IDLE, arg="#inside-view", timeout=60_000)
        box = page.locator("#inside-view img").bounding_box()
        # the view is 8 pixels a side: click the middle of row 3, column 6 (from 1)
        page.mouse.click(box["x"] + box["width"] * 5.5 / SIZE, box["y"] + box["height"] * 2.5 / SIZE)
        page.wait_for_function("() => document.querySelector('#inside-pixel textarea, #inside-pixel input')"
                               ".value === '3, 6'", timeout=30_000)
        for panel in ("#inside-distribution", "#inside-attention", "#inside-heads", "#inside-strip"):
            page.wait_for_function(f"() => document.querySelector('{panel} img')", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#inside-numbers').innerText.includes('row 3, column 6')",
                               timeout=30_000)
        assert "entropy" in page.inner_text("#inside-numbers")
        assert "embeddings" in page.inner_text("#inside-strip-text")
        page.locator("#inside-uncertainty-btn").click()
        page.wait_for_function("() => document.querySelector('#inside-uncertainty img')", timeout=60_000)
        assert "Mean uncertainty" in page.inner_text("#inside-uncertainty-text")

        page.get_by_role("tab", name="Complete").click()  # the option while a completion streams
        assert not page.locator("#drawing").is_visible()  # no empty panel until the option is ticked
        page.locator("#watch input").check()
        page.wait_for_selector("#drawing", state="visible", timeout=30_000)
        page.locator("#complete-btn").click()
        page.wait_for_function("() => document.querySelector('#progress').innerText.includes('Done')",
                               timeout=90_000)
        page.wait_for_function("() => document.querySelector('#drawing img')", timeout=30_000)
        # the panel's text is its own output: it may still show Gradio's "processing" when the progress says Done
        page.wait_for_function("() => document.querySelector('#drawing-text').innerText.includes('Sample 1 draws row 8')",
                               timeout=30_000)
        page.screenshot(path=str(tmp_path / "watching.png"), full_page=True)
        keep_screenshot(tmp_path / "watching.png")

        page.screenshot(path=str(tmp_path / "inside.png"), full_page=True)
        keep_screenshot(tmp_path / "inside.png")
