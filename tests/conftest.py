"""Shared fixtures: tiny trained runs on the embedded digits data, made once per test session;
the Chromium that browser tests drive."""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import sync_playwright

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub

from igpt_core.train import TrainConfig, start_run, train  # noqa: E402

TINY = dict(n_layer=2, n_embd=32, n_head=2)


def make_run(runs_dir, name="tiny", objective="ar", steps=40, **train_options):
    config = TrainConfig(steps=steps, batch_size=32, eval_every=10, **train_options)
    run = start_run(name, "digits", "tiny", objective, 16, train_config=config, model_overrides=TINY, runs_dir=runs_dir)
    train(run, progress=False)
    return run


@pytest.fixture(scope="session", autouse=True)
def temp_dir_inside_pytests(tmp_path_factory):
    """The system temp folder, for this session and the processes it starts, is one of pytest's own.

    gradio_client downloads each file of a result into a new tempfile.gettempdir()/<40 hex> folder
    and moves it from there, leaving the folder behind, empty: hundreds of them in /tmp per test run.
    """
    temp = tmp_path_factory.mktemp("system-temp")
    before_env, before_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(temp), str(temp)
    yield temp
    tempfile.tempdir = before_dir
    if before_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before_env


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_run(runs_dir):
    """An AR digits run: 2 layers, width 32, 40 steps, checkpoints log-spaced."""
    return make_run(runs_dir, "tiny")


@pytest.fixture(scope="session")
def bert_run(runs_dir):
    return make_run(runs_dir, "tiny-bert", objective="bert", steps=20)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random, so that a swapped, untransposed or dropped tensor shows (the default
    init zeroes the output head): norm gains around 1, everything else around 0, none exactly 0.
    Works on our IGPT and on Hugging Face's ImageGPT alike (their norms are the "ln_" tensors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if "ln_" in name else 0.0
            p.copy_(mean + std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


# -- browser tests -------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium for playwright. Missing, the test skips on a developer's machine but fails
    where $CI is set: a CI machine without the browser must not pass the browser tests silently."""
    if not Path(CHROMIUM).exists():
        message = f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so a missing browser is a failure")
        pytest.skip(message)
    return CHROMIUM


@contextlib.contextmanager
def browser_page(chromium: str, url: str, height: int = 1300, timeout: float = 90_000):
    """A headless Chromium page opened on `url`, 1400 pixels wide; the browser is closed afterwards,
    whatever the test did."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url, timeout=timeout)
            yield page
        finally:
            browser.close()


def keep_screenshot(path: Path) -> None:
    """Copy a screenshot to $IGPT_SCREENSHOT_DIR, if set, for a developer who wants to look at it."""
    folder = os.environ.get("IGPT_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


# -- apps served by their own process -------------------------------------------------------------------


def serve_process(command: list, port: int, seconds: float = 180, **popen) -> tuple[subprocess.Popen, str]:
    """Start an app's server in its own process group; return it and its page once the page answers."""
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return server, response.read().decode()
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_process(server)
                raise AssertionError(f"{command[0]} did not serve {url}: {server.stdout.read().decode()[-2000:]}") \
                    from None
            time.sleep(0.5)


def stop_process(server: subprocess.Popen) -> None:
    """Stop a server started by serve_process, with everything it started."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
