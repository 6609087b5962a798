"""Shared fixtures: tiny trained runs on the embedded digits data, made once per test session;
the Chromium that browser tests drive; a local HTTP server for downloads."""

import contextlib
import http.server
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import sync_playwright

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub

from igpt_core.training import TrainConfig, start_run, train  # noqa: E402

# The scripts in scripts/ (figures, notebook execution) are tested as the modules they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

TINY = dict(n_layer=2, n_embd=32, n_head=2)

# The second tier (`make test` runs both; `make test-fast` only the first): files whose tests start real
# servers, a browser, notebooks, scripts, benchmarks or a process per test. Single tests elsewhere carry @pytest.mark.slow
# (torchrun).
SLOW_FILES = {
    "test_dashboard.py", "test_dashboard_analysis.py", "test_dashboard_heads.py",  # Streamlit + Chromium
    "test_demo.py", "test_demo_hub.py", "test_demo_inside.py", "test_demo_watch.py", "test_soak.py",  # Gradio
    "test_notebooks.py", "test_site.py", "test_figures.py",  # notebooks, the docs site, make figures
    "test_benchmarks.py", "test_distributed.py",  # benchmark scripts, torchrun
    "test_cli.py", "test_packaging.py",  # a fresh `igpt` process per test (~3-7 s each), a wheel built
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


APPS = Path(__file__).resolve().parents[1] / "apps"


def app_module(name: str):
    """apps/NAME.py of this checkout, imported as igpt_apps.NAME, as the installed package is (so its
    siblings are imported as a package's are); importing it must do nothing by itself. igpt_apps is
    bound to this checkout's apps/ first: an editable install elsewhere may map the name to another."""
    package = sys.modules.get("igpt_apps")
    if package is None or Path(package.__file__).parent != APPS:
        for loaded in [key for key in sys.modules if key.startswith("igpt_apps.")]:
            del sys.modules[loaded]
        spec = importlib.util.spec_from_file_location("igpt_apps", APPS / "__init__.py",
                                                      submodule_search_locations=[str(APPS)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["igpt_apps"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"igpt_apps.{name}")


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


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory) -> tuple[Path, dict]:
    """Every notebook in notebooks/ executed once per test session (scripts/run_notebooks.py):
    (the folder of executed copies, {notebook name: its first cell error or None}). The notebook
    tests check the errors; the docs-site test renders the copies."""
    from run_notebooks import execute_notebooks

    out = tmp_path_factory.mktemp("executed") / "notebooks"  # named as the site's hook expects
    return out, execute_notebooks(out, tmp_path_factory.mktemp("notebook-runs"))


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server to start on, or to be refused by)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class FileServer(http.server.ThreadingHTTPServer):
    """Serves `files` ({URL path: bytes}) on 127.0.0.1 as a file server would: honours Range requests
    (unless `ranges` is set False: then it always sends the whole file), cuts the first transfer of the
    path `cut` halfway (the connection closes), and records (path, Range header) of every request in
    `requests`."""

    def __init__(self, files: dict[str, bytes], cut: str | None = None):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files, self.cut, self.requests, self.ranges = files, cut, [], True
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def fetched(self, path: str) -> int:
        """How many times `path` was asked for."""
        return sum(asked == path for asked, _ in self.requests)


class FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        asked = self.headers.get("Range") if server.ranges else None
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.path == server.cut:
            server.cut = None
            self.wfile.write(data[: len(data) // 2])  # then the connection closes: a cut download
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve_files():
    """start(files, cut=None) -> a running `FileServer`; every server started is stopped after the test."""
    servers = []

    def start(files: dict[str, bytes], cut: str | None = None) -> FileServer:
        server = FileServer(files, cut)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
