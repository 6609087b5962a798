"""`igpt demo` (the Gradio completion demo) and `igpt dashboard` (the Streamlit probe dashboard).

The apps are the package igpt_apps (apps/ in the repository, installed by `pip install "igpt[apps]"`);
each runs in a process of its own, with this command's runs folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from igpt_core import IgptError

from .common import command, runs_dir

MEMORY_HELP = ("memory for the models it keeps loaded, as a size (e.g. 4GB, 512MB) or a fraction of this "
               "machine's RAM (e.g. 0.5); the least recently used are released beyond it (default: the library's)")


def app_file(name: str, needs: str) -> Path:
    """The file of app NAME in the igpt_apps package, once its framework (`needs`) is known to be installed."""
    install = 'pip install "igpt[apps]"'
    if importlib.util.find_spec(needs) is None:
        raise IgptError(f"the {name} needs {needs}, which is not installed: {install}")
    package = importlib.util.find_spec("igpt_apps")
    script = Path(package.origin).parent / f"{name}.py" if package and package.origin else None
    if script is None or not script.is_file():
        raise IgptError(f"the {name} app (package igpt_apps) is not installed with igpt_core: {install}")
    return script


def run_app(args, command_line: list[str]) -> None:
    """Run an app in its own process with this runs folder; exit with its status."""
    env = dict(os.environ, IGPT_RUNS_DIR=str(runs_dir(args).resolve()))
    raise SystemExit(subprocess.call(command_line, env=env))


def cmd_demo(args) -> None:
    script = app_file("demo", "gradio")
    memory = [] if args.model_memory is None else ["--model-memory", args.model_memory]
    run_app(args, [sys.executable, str(script), "--port", str(args.port), "--host", args.host, *memory])


def cmd_dashboard(args) -> None:
    script = app_file("dashboard", "streamlit")
    run_app(args, [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(args.port),
                   "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
                   "--server.fileWatcherType", "none",
                   "--client.toolbarMode", "minimal"])  # no "Deploy" button: this is a local tool


def add_demo(sub) -> None:
    p = command(sub, "demo", cmd_demo, "open the browser completion demo (Gradio) on http://127.0.0.1:7860")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--model-memory", metavar="SIZE", help=MEMORY_HELP)


def add_dashboard(sub) -> None:
    p = command(sub, "dashboard", cmd_dashboard, "open the probe dashboard (Streamlit) on http://127.0.0.1:8501")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1")
