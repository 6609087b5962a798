"""The demo's "Watch it learn" tab (apps/watch.py): every checkpoint of a run completes the same square
with the same seed, and one pixel's distribution at each checkpoint, checked against the library through
gradio_client; Play stepping through the checkpoints in Debian's Chromium."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gradio_client.exceptions import AppError

from conftest import browser_page, keep_screenshot
from igpt_core import bits_per_token, complete, explain, load_dataset, open_run
from igpt_core.render import display_scale, grid
from tests.test_demo import IDLE, SIZE, app, as_input, client, read_png, runs  # noqa: F401

SQUARE = ""  # the picture's centre square


def example(app, name, index):
    """(the run, its palette ids of validation example `index`)."""
    run = open_run(name, app.runs)
    return run, run.palette.encode(load_dataset("digits", "val").images[index][None], SIZE)[0]


def panel_png(item) -> np.ndarray:
    """A gallery item's picture (gradio_client gives its path, or a file dict)."""
    image = item["image"]
    return read_png(image["path"] if isinstance(image, dict) else image)


def expected_panel(run, step, ids, keep_rows, n_samples, seed):
    """The library's completions at one checkpoint, drawn as the tab draws a panel: two samples a row."""
    model, palette, _ = run.load(step)
    samples = list(palette.decode(complete(model, ids, keep_rows, n_samples, seed=seed).numpy(), SIZE))
    return grid([samples[i : i + 2] for i in range(0, len(samples), 2)], pixel=display_scale(SIZE, 96))


@pytest.mark.parametrize("name", ["digits-ar", "digits-bert"])
def test_every_checkpoint_completes_the_square_with_the_same_seed(app, tmp_path, name):
    c = client(app, tmp_path)
    editor, *_ = c.predict(name, 3, api_name="/use_example")
    run, ids = example(app, name, 3)
    steps, val = run.checkpoints(), run.val_losses()
    assert len(steps) >= 4
    args = (name, 4, 3, 1.0, 0, 5, as_input(editor), SQUARE)  # keep 4 rows, 3 samples, seed 5
    job = c.submit(*args, api_name="/watch_complete")
    panels, status, slider, stage_text, stage, _ = job.result(timeout=120)
    assert len([out for out in job.outputs() if out[0]]) == len(steps), "one update per checkpoint"
    assert "done" in status and f"{len(steps)} of {len(steps)} checkpoints" in status
    assert len(panels) == len(steps), "one panel per checkpoint"
    for panel, step in zip(panels, steps):
        assert panel["caption"] == f"step {step} · val {bits_per_token(val[step]):.2f} bits/token"
        assert np.array_equal(panel_png(panel), expected_panel(run, step, ids, 4, 3, 5))
    assert len({panel_png(p).tobytes() for p in panels}) > 1, "training changes the completions"
    assert slider["value"] == slider["maximum"] == len(steps) and f"Checkpoint {len(steps)} of {len(steps)}" in stage_text
    assert np.array_equal(read_png(stage), panel_png(panels[-1]))

    again = c.predict(*args, api_name="/watch_complete")[0]
    assert [panel_png(p).tobytes() for p in again] == [panel_png(p).tobytes()
                                                                       for p in panels], "same seed, same panels"


def test_a_pixel_at_every_checkpoint_and_the_slider(app, tmp_path):
    c = client(app, tmp_path)
    editor, *_ = c.predict("digits-ar", 2, api_name="/use_example")
    run, ids = example(app, "digits-ar", 2)
    steps = run.checkpoints()
    t = 3 * SIZE + 2  # row 4, column 3 counted from 1
    view, every, panels, slider, text, _, bars = c.predict("4, 3", 0.8, 0, "digits-ar", 2, as_input(editor), SQUARE,
                                                   api_name="/watch_distribution")
    assert (read_png(view) == [0, 200, 255]).all(-1).any(), "the clicked pixel is outlined on the view"
    assert read_png(every).shape[1] > 4 * 200, "the distributions of the checkpoints side by side"
    assert read_png(bars).shape[0] >= 20 * 4
    assert panels == [], "nothing completed yet in this session"
    assert slider["value"] == 2 and slider["maximum"] == len(steps), "the slider stays where it was"
    assert f"Checkpoint 2 of {len(steps)}" in text, "the slider's checkpoint is shown"
    for index in (1, len(steps) // 2, len(steps)):
        text, panel, _ = c.predict(index, api_name="/watch_show")  # the session's state: no model runs
        model, _, _ = run.load(steps[index - 1])
        p = explain.next_pixel(model, ids, t, temperature=0.8)[int(ids[t])]
        assert f"Checkpoint {index} of {len(steps)}: step {steps[index - 1]} ·" in text
        assert f"row 4, column 3: the true colour has p = {float(p):.3f}" in text
        assert panel is None, "nothing completed yet in this session"

    with pytest.raises(AppError, match="outside the 8×8 image"):
        c.predict("9, 1", 1.0, 0, "digits-ar", 1, as_input(editor), SQUARE, api_name="/watch_distribution")


def test_panels_stay_with_their_picture(app, tmp_path):
    c = client(app, tmp_path)
    steps = open_run("digits-ar", app.runs).checkpoints()
    editor, *_ = c.predict("digits-ar", 2, api_name="/use_example")
    c.predict("digits-ar", 4, 1, 1.0, 0, 0, as_input(editor), SQUARE, api_name="/watch_complete")
    same = c.predict("2, 2", 1.0, 0, "digits-ar", 1, as_input(editor), SQUARE, api_name="/watch_distribution")
    assert len(same[2]) == len(steps), "a pixel of the completed picture keeps its panels"
    other, *_ = c.predict("digits-ar", 6, api_name="/use_example")
    moved = c.predict("2, 2", 1.0, 0, "digits-ar", 1, as_input(other), SQUARE, api_name="/watch_distribution")
    assert moved[2] == [] and moved[5] is None, "another picture: the panels of the last one are gone"


def test_play_steps_through_every_checkpoint(app, tmp_path):
    c = client(app, tmp_path)
    with pytest.raises(AppError, match="press Complete with every checkpoint"):
        c.predict(1, api_name="/watch_play")
    editor, *_ = c.predict("digits-ar", 1, api_name="/use_example")
    steps = open_run("digits-ar", app.runs).checkpoints()
    c.predict("digits-ar", 2, 2, 1.0, 0, 1, as_input(editor), SQUARE, api_name="/watch_complete")
    job = c.submit(len(steps), api_name="/watch_play")  # at the last checkpoint: plays from the first
    job.result(timeout=60)
    shown = [int(re.search(r"Checkpoint (\d+) of", out[1]).group(1)) for out in job.outputs()]
    assert shown == list(range(1, len(steps) + 1))
    assert [out[0]["value"] for out in job.outputs()] == shown, "the slider follows"


def test_browser_play_advances_the_checkpoint(app, tmp_path, chromium):
    steps = open_run("digits-ar", app.runs).checkpoints()
    with browser_page(chromium, app.url, height=1900) as page:
        page.wait_for_function("() => document.querySelector('#view img')", timeout=60_000)
        page.wait_for_function(IDLE, arg="#view", timeout=60_000)
        page.get_by_role("tab", name="Watch it learn").click()
        page.wait_for_function("() => document.querySelector('#watch-view img')", timeout=60_000)
        page.locator("#watch-btn").click()
        page.wait_for_function("() => document.querySelector('#watch-status').innerText.includes('done')",
                               timeout=120_000)
        assert page.locator("#watch-panels img").count() == len(steps)
        page.locator("#watch-view img").scroll_into_view_if_needed()  # the mouse only reaches what is shown
        box = page.locator("#watch-view img").bounding_box()  # click row 5, column 4 (from 1)
        page.mouse.click(box["x"] + box["width"] * 3.5 / SIZE, box["y"] + box["height"] * 4.5 / SIZE)
        page.wait_for_function("() => document.querySelector('#watch-distributions img')", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#watch-stage-text').innerText.includes('row 5, column 4')",
                               timeout=60_000)
        page.evaluate("""() => {
            window.__shown = [];
            const text = document.querySelector('#watch-stage-text');
            new MutationObserver(() => window.__shown.push(text.innerText))
                .observe(text, {subtree: true, childList: true, characterData: true});
        }""")
        page.locator("#watch-play").click()
        page.wait_for_function("() => document.querySelector('#watch-stage-text').innerText.includes('Checkpoint 3 of')",
                               timeout=60_000)
        page.screenshot(path=str(tmp_path / "watch-playing.png"), full_page=True)
        keep_screenshot(tmp_path / "watch-playing.png")
        last = f"Checkpoint {len(steps)} of {len(steps)}"
        page.wait_for_function(f"() => document.querySelector('#watch-stage-text').innerText.includes('{last}')",
                               timeout=60_000)
        shown = [int(m.group(1)) for text in page.evaluate("window.__shown")
                 if (m := re.search(r"Checkpoint (\d+) of", text))]
        # the text is redrawn several times per update, and once more as Play starts: read its distinct values
        distinct = [n for i, n in enumerate(shown) if i == 0 or n != shown[i - 1]]
        assert 1 in distinct and distinct[distinct.index(1):] == list(range(1, len(steps) + 1)), shown
        assert page.locator("#watch-checkpoint input[type=number]").input_value() == str(len(steps))
        page.screenshot(path=str(tmp_path / "watch-played.png"), full_page=True)
        keep_screenshot(tmp_path / "watch-played.png")

        # Play again (from the first) and Stop it early: the checkpoint stays where it stopped
        page.locator("#watch-play").click()
        page.wait_for_function("() => document.querySelector('#watch-stage-text').innerText.includes('Checkpoint 2 of')",
                               timeout=60_000)
        page.locator("#watch-stop").click()
        page.wait_for_timeout(4500)  # Play shows a checkpoint a second: unstopped, it would be at the last by now
        stopped_at = int(re.search(r"Checkpoint (\d+) of", page.inner_text("#watch-stage-text")).group(1))
        assert stopped_at < len(steps), stopped_at
