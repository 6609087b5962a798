"""The wheel ships the apps: built from a copy of the sources, installed into a folder, `igpt demo` serves
the page from the installed package in a folder that is not the checkout.

Nothing is downloaded: the wheel is built without build isolation (setuptools from this environment)
and installed with --no-deps into a target folder; its dependencies come from this environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import serve_process, stop_process
from test_demo import free_port

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the files the package is made of (building in the checkout would
    leave build/ and egg-info behind in it)."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("igpt_core", "apps"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    wheel, = (tmp_path / "dist").glob("igpt-*.whl")
    return wheel


def test_the_wheel_ships_the_apps_and_igpt_demo_runs_from_the_installed_package(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"igpt_apps/demo.py", "igpt_apps/dashboard.py", "igpt_core/cli/__init__.py"} <= names, sorted(names)
    assert not any(name.startswith(("apps/", "tests/")) for name in names)

    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"  # a folder with no checkout in it or above it
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), GRADIO_TEMP_DIR=str(tmp_path / "gradio"), OMP_NUM_THREADS="1")
    port = free_port()
    server, page = serve_process([str(site / "bin" / "igpt"), "demo", "--runs-dir", "runs", "--port", str(port)],
                                 port, cwd=elsewhere, env=env)
    try:
        assert "iGPT completion demo" in page
        apps = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children(server.pid)]
        assert [str(site / "igpt_apps" / "demo.py")] == [arg.decode() for cmd in apps for arg in cmd
                                                         if arg.endswith(b"demo.py")], apps
    finally:
        stop_process(server)
    assert not (elsewhere / "runs").exists(), "serving the page must not create the runs folder"


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]
