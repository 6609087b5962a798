"""The teaching notebooks run top to bottom: small size, offline, one kernel per notebook.

Each notebook is executed with nbclient as a reader's Jupyter would run it (kernel "python3", working
directory notebooks/), with IGPT_NOTEBOOK_SIZE=small, one thread per process and the Hugging Face hub
switched off, so the guarded hub cell of notebook 5 takes its offline path. Any cell error fails the
test. (That committed notebooks carry no outputs is checked in test_project.py.)
"""

from __future__ import annotations

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_errors(path, tmp_path, monkeypatch):
    # The kernel inherits this environment.
    monkeypatch.setenv("IGPT_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("IGPT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Import the working tree's igpt_core, whatever is installed in the environment.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
