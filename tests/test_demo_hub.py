"""OpenAI's models in the demo, offline, as the Hugging Face hub would serve them.

A hub cache is built in a temporary $HF_HOME exactly as `huggingface_hub` lays it out
(`hub/models--openai--imagegpt-small/snapshots/<40-hex>/` plus `refs/main`), holding a small random
`ImageGPTForCausalImageModeling` at iGPT's 32×32, 512 colours. With HF_HUB_OFFLINE=1, `openai/imagegpt-small`
is imported by its hub id through the CLI, and through the demo's model picker in Chromium, where a
crop of a built-in photo is then completed. The demo and the CLI run as their own processes, so they
read that $HF_HOME the way a user's would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from igpt_core import open_run
from igpt_core.data import builtin_photos
from igpt_core.images import crop
from conftest import browser_page, serve_process, stop_process
from test_demo import GREY, IDLE, free_port, grid_cells, read_png, shrink
from test_hf import hf_model, save_hf_folder

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
SIZE, COLOURS = 32, 512


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """$HF_HOME with openai/imagegpt-small in its hub cache: random weights, 2 layers of width 32."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / "models--openai--imagegpt-small"
    snapshot = repo / "snapshots" / REVISION
    model = hf_model(0, vocab_size=COLOURS + 1, n_positions=SIZE * SIZE, n_embd=32, n_layer=2, n_head=2)
    save_hf_folder(model, snapshot)  # save_pretrained of the model and of its image processor (512 clusters)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return home


def offline_env(hub_home: Path, tmp_path: Path) -> dict:
    return dict(os.environ, HF_HOME=str(hub_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
                GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")


def test_cli_imports_the_hub_id_from_the_cache_offline(hub_home, tmp_path):
    runs = tmp_path / "runs"
    env = offline_env(hub_home, tmp_path)
    command = [sys.executable, "-m", "igpt_core.cli", "import-hf", "openai/imagegpt-small", "--name", "igpt-s",
               "--runs-dir", str(runs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = open_run("igpt-s", runs).summary()
    assert summary["resolution"] == SIZE and summary["colors"] == COLOURS
    listing = subprocess.run([sys.executable, "-m", "igpt_core.cli", "runs", "--runs-dir", str(runs)], env=env,
                             capture_output=True, text=True, timeout=120)
    # labelled as the pre-trained model it is; its one checkpoint (step 0) is no training steps of ours
    assert re.search(r"igpt-s\s+imported\s+ar\s+-\s+32\s+-\s+-\s+openai/imagegpt-small · pre-trained \(imported\)",
                     listing.stdout), listing.stdout
    # a model that is not in the cache: one line, exit status 2, no run left behind
    missing = subprocess.run(command[:4] + ["openai/imagegpt-medium", "--name", "igpt-m", "--runs-dir", str(runs)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert not (runs / "igpt-m").exists()


def serve_demo(runs: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`python apps/demo.py` in its own process group, once its page answers."""
    port = free_port()
    server, _ = serve_process([sys.executable, str(ROOT / "apps" / "demo.py"), "--port", str(port), "--runs-dir",
                               str(runs)], port, env=env)
    return server, f"http://127.0.0.1:{port}"


def choose(page, label: str) -> None:
    page.locator("#run input").click()
    page.get_by_role("option", name=label).click()  # the option whose text contains label


def test_pick_openai_small_in_the_demo_offline_and_complete_a_photo(hub_home, tmp_path, chromium):
    runs = tmp_path / "runs"
    runs.mkdir()
    server, url = serve_demo(runs, offline_env(hub_home, tmp_path))
    try:
        with browser_page(chromium, url) as page:
            page.wait_for_selector("#run input", timeout=60_000)
            assert "No trained models yet" in page.inner_text("#no-runs")
            page.locator("#run input").click()
            page.wait_for_selector("[role=option]", timeout=30_000)
            options = page.get_by_role("option").all_inner_texts()
            assert any("openai/imagegpt-small" in o and "imported when chosen" in o for o in options), options
            assert any("openai/imagegpt-medium" in o and "offline" in o for o in options), options

            # a model that is not on this machine: one clear line, and the page keeps working
            page.get_by_role("option", name="openai/imagegpt-medium").click()
            page.wait_for_function("() => document.querySelector('#facts').innerText.includes('HF_HUB_OFFLINE')",
                                   timeout=60_000)
            assert len(page.inner_text("#facts").strip().splitlines()) == 1

            choose(page, "openai/imagegpt-small")
            page.wait_for_function("() => document.querySelector('#facts').innerText.includes('(imported)')",
                                   timeout=120_000)
            assert (runs / "openai-imagegpt-small" / "run.json").is_file(), "imported once, into the runs folder"
            page.wait_for_function("() => document.querySelector('#run input').value.includes('imported as run')",
                                   timeout=60_000)  # the picker says so, and the no-runs notice goes
            page.wait_for_selector("#no-runs", state="hidden", timeout=30_000)
            photos = builtin_photos()
            page.wait_for_function(f"() => document.querySelectorAll('#examples img').length === {len(photos)}",
                                   timeout=60_000)
            cat = list(photos).index("cat")
            page.locator("#examples img").nth(cat).click()
            page.wait_for_function("() => document.querySelector('#square input').value !== ''", timeout=60_000)
            for selector in ("#view", "#picture"):
                page.wait_for_function(IDLE, arg=selector, timeout=60_000)
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "openai-chosen.png"), full_page=True)

            page.locator("#complete-btn").click()  # the defaults: the bottom half, 4 samples
            page.wait_for_function("() => document.querySelector('#progress').innerText.includes('Done')",
                                   timeout=300_000)
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "openai-completed.png"), full_page=True)
            (tmp_path / "grid.png").write_bytes(page.request.get(page.locator("#grid img").get_attribute("src")).body())
            (tmp_path / "view.png").write_bytes(page.request.get(page.locator("#view img").get_attribute("src")).body())
    finally:
        stop_process(server)
    palette = open_run("openai-imagegpt-small", runs).palette
    assert len(palette) == COLOURS
    expected = palette.view(crop(photos["cat"], None), SIZE)[2]  # the cat's centre square, at 32×32
    assert np.array_equal(shrink(read_png(tmp_path / "view.png"), SIZE), expected)
    cells = grid_cells(tmp_path / "grid.png", 4, SIZE)
    assert np.array_equal(cells[1], expected) and (cells[2][SIZE // 2 :] == GREY).all()
    for sample in cells[3:]:
        assert np.array_equal(sample[: SIZE // 2], expected[: SIZE // 2]), "the kept top half comes back unchanged"
        assert not (sample[SIZE // 2 :] == GREY).all(-1).all(), "the bottom half was generated"
