"""The teaching notebooks run top to bottom: small size, offline, one kernel per notebook.

Each notebook is executed with nbclient as a reader's Jupyter would run it (kernel "python3", working
directory notebooks/), with IGPT_NOTEBOOK_SIZE=small, one thread per process, its own runs folder and
the Hugging Face hub switched off, so the guarded hub cell of notebook 5 takes its offline path. Any
cell error fails that notebook's test. Two kernels run at once: each has one thread, so one at a time
left a core idle for the ~6 minutes the notebooks take in a row. (That committed notebooks carry no
outputs is checked in test_project.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_has_the_size_knob_and_uses_the_library():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        assert notebook["metadata"]["kernelspec"]["name"] == "python3", path.name
        source = "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
        assert 'os.environ.get("IGPT_NOTEBOOK_SIZE", "small")' in source, path.name
        assert "from igpt_core" in source, path.name


KERNELS_AT_ONCE = 2


@pytest.fixture(scope="module")
def notebook_errors(tmp_path_factory) -> dict[str, Exception | None]:
    """Every notebook executed, KERNELS_AT_ONCE at a time: {notebook: its first cell error or None}."""
    env = dict(os.environ, IGPT_NOTEBOOK_SIZE="small", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               # Import the working tree's igpt_core, whatever is installed in the environment.
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    async def execute(path: Path, gate: asyncio.Semaphore) -> Exception | None:
        async with gate:
            notebook = nbformat.read(path, as_version=4)
            client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                             resources={"metadata": {"path": str(path.parent)}})
            runs = tmp_path_factory.mktemp(path.stem) / "runs"
            try:
                await client.async_execute(env=dict(env, IGPT_RUNS_DIR=str(runs)))  # the kernel's environment
            except Exception as err:  # CellExecutionError names the cell; a timeout or dead kernel fails too
                return err
            return None

    async def execute_all():
        gate = asyncio.Semaphore(KERNELS_AT_ONCE)
        return await asyncio.gather(*(execute(path, gate) for path in NOTEBOOKS))

    return dict(zip((path.stem for path in NOTEBOOKS), asyncio.run(execute_all())))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, notebook_errors):
    error = notebook_errors[path.stem]
    if error is not None:
        raise error
