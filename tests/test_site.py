"""The documentation site builds offline and reads well in a browser.

MkDocs builds the site (mkdocs.yml) from docs/, the CLI's own parser and the notebooks as the
notebook tests executed them (`executed_notebooks`, once per test session; this file runs after
test_notebooks.py). A local http.server serves it; Chromium opens every page and checks that every
picture loaded, that no notebook cell shows an error, that the notebooks carry their outputs, and
that no page asks for anything outside 127.0.0.1 (no web fonts, no analytics).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import browser_page, keep_screenshot, serve_process, stop_process
from test_demo import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["index", "quickstart", "paper", "cli", "api", "recipes", "findings", "performance", "design"]
NOTEBOOK_PAGES = [f"notebooks/{path.stem}" for path in sorted((ROOT / "notebooks").glob("*.ipynb"))]

# A notebook cell's error renders as IPython's traceback: "Traceback (most recent call last)", or for a
# syntax error "Cell In[3], line 1" and the message.
ERRORS = """() => [...document.querySelectorAll('.jp-OutputArea-output')]
    .filter(e => /Traceback \\(most recent call last\\)|Cell In\\[\\d+\\], line \\d+/.test(e.innerText))
    .map(e => e.innerText.slice(0, 300))"""
BROKEN_IMAGES = """() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => i.getAttribute('src').slice(0, 80))"""


@pytest.fixture(scope="module")
def site(executed_notebooks, tmp_path_factory) -> Path:
    folder, _ = executed_notebooks
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, IGPT_EXECUTED_NOTEBOOKS=str(folder), NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--site-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_site_has_every_page_and_the_cli_reference_every_command(site):
    for page in PAGES + NOTEBOOK_PAGES:
        assert (site / f"{page}.html").exists(), page
    from igpt_core.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    cli = (site / "cli.html").read_text()
    missing = [name for name in commands if f"igpt {name}" not in cli]
    assert not missing, missing
    api = (site / "api.html").read_text()
    assert "open_run" in api and "complete" in api


def test_every_page_shows_its_pictures_and_no_notebook_error_offline(site, chromium, tmp_path):
    port = free_port()
    server, _ = serve_process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(site)], port)
    outside = []
    try:
        with browser_page(chromium, f"http://127.0.0.1:{port}/index.html") as page:
            page.on("request", lambda request: outside.append(request.url)
                    if urlparse(request.url).hostname not in ("127.0.0.1", None) else None)
            for name in PAGES + NOTEBOOK_PAGES:
                page.goto(f"http://127.0.0.1:{port}/{name}.html", wait_until="load")
                assert page.evaluate(BROKEN_IMAGES) == [], name
                assert page.evaluate(ERRORS) == [], name
                if name.startswith("notebooks/"):
                    assert page.locator(".jp-OutputArea-output").count() > 0, f"{name}: no outputs rendered"
                shot = tmp_path / f"site-{name.replace('/', '-')}.png"
                page.screenshot(path=str(shot), full_page=False)
                keep_screenshot(shot)
    finally:
        stop_process(server)
    assert outside == [], outside
