"""The teaching notebooks run top to bottom: small size, offline, one kernel per notebook.

`executed_notebooks` (conftest.py) runs every notebook once per test session with
scripts/run_notebooks.py, as a reader's Jupyter would (kernel "python3", working directory
notebooks/, IGPT_NOTEBOOK_SIZE=small, one thread, its own runs folder, the Hugging Face hub off).
Any cell error fails that notebook's test. The executed copies are what the docs site renders
(test_site.py). (That committed notebooks carry no outputs is checked in test_project.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

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
def test_notebook_runs_without_errors(path, executed_notebooks):
    folder, errors = executed_notebooks
    if errors[path.stem] is not None:
        raise errors[path.stem]
    executed = nbformat.read(folder / path.name, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code" and cell.source.strip()]
    assert all(cell.execution_count is not None for cell in code), "every code cell ran"
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
