"""Execute every teaching notebook once, at small size and offline, and keep the executed copies.

    python scripts/run_notebooks.py build/notebooks     # what `make docs` renders

The test suite (tests/test_notebooks.py) calls `execute_notebooks` too, into its own temporary
folder, and the docs-site test renders those copies: each notebook runs once per test run.

Each notebook runs as a reader's Jupyter would run it (kernel "python3", working directory
notebooks/), with IGPT_NOTEBOOK_SIZE=small, one thread per kernel, its own runs folder and the
Hugging Face hub switched off (so notebook 5's guarded hub cell takes its offline path). Two
kernels run at once: each has one thread, so one at a time would leave a core idle.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

from igpt_core.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNELS_AT_ONCE = 2
CELL_TIMEOUT_S = 300


def notebook_paths() -> list[Path]:
    """Every notebook in notebooks/, in name order."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def kernel_environment(runs: Path) -> dict[str, str]:
    """The environment of one notebook's kernel: small sizes, one thread, offline, its own runs folder."""
    return dict(os.environ, IGPT_NOTEBOOK_SIZE="small", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                IGPT_RUNS_DIR=str(runs),
                # Import this checkout's igpt_core, whatever is installed in the environment.
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


async def execute_one(path: Path, out_dir: Path, runs: Path, gate: asyncio.Semaphore) -> Exception | None:
    """Run one notebook; write the executed copy (outputs up to the failing cell, if one fails) to
    out_dir/NAME.ipynb. Returns the first cell error, or None."""
    async with gate:
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                         resources={"metadata": {"path": str(path.parent)}})
        error = None
        try:
            await client.async_execute(env=kernel_environment(runs))
        except Exception as err:  # CellExecutionError names the cell; a timeout or dead kernel fails too
            error = err
        atomic_write(out_dir / path.name, lambda tmp: nbformat.write(notebook, tmp))
        return error


def execute_notebooks(out_dir: Path, runs_dir: Path, paths: list[Path] | None = None) -> dict[str, Exception | None]:
    """Execute the notebooks (default: all of notebooks/), KERNELS_AT_ONCE at a time, into out_dir;
    each uses runs_dir/NAME as its runs folder. Returns {notebook name: its first cell error or None}."""
    paths = notebook_paths() if paths is None else paths
    out_dir.mkdir(parents=True, exist_ok=True)

    async def execute_all():
        gate = asyncio.Semaphore(KERNELS_AT_ONCE)
        return await asyncio.gather(*(execute_one(path, out_dir, runs_dir / path.stem, gate) for path in paths))

    return dict(zip((path.stem for path in paths), asyncio.run(execute_all())))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Execute every notebook in notebooks/ and keep the executed copies.")
    parser.add_argument("out", help="folder for the executed notebooks (e.g. build/notebooks)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="igpt-notebook-runs-") as runs:
        errors = execute_notebooks(Path(args.out), Path(runs))
    for name, error in errors.items():
        print(f"{name}: {'ok' if error is None else 'FAILED'}")
    failed = [name for name, error in errors.items() if error is not None]
    if failed:
        sys.exit(f"notebooks with a cell error: {', '.join(failed)} (the executed copies in {args.out} show it)")


if __name__ == "__main__":
    main()
