"""The notebooks teach by asking: each has at least three self-checking exercises, and they use the
library's public API (`from igpt_core import ...`) only.

An exercise is three code cells, in order: a collapsed solution cell (`source_hidden`) that sets
`solution_N = ...`; the learner's cell, marked ✏️, that sets `my_... = solution_N` as committed (so the
notebook runs top to bottom); and a later cell that checks `my_...` against a measurement with an
`assert` and a message for the learner. Whether the checks pass is tests/test_notebooks.py's job: it
executes every notebook.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MIN_EXERCISES = 3


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def checked_names(source: str) -> set[str]:
    """Names that appear in an `assert ..., message` of this source."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assert) and node.msg is not None:
            names |= {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
    return names


def exercises(notebook: dict) -> list[str]:
    """The learner's variable of every complete exercise, in order."""
    cells = code_cells(notebook)
    found = []
    for i, cell in enumerate(cells[:-1]):
        source = "".join(cell["source"])
        solution = re.search(r"^(solution_\w+) = ", source, re.M)
        if not (cell["metadata"].get("jupyter", {}).get("source_hidden") and solution):
            continue
        answer = "".join(cells[i + 1]["source"])
        learner = re.search(rf"^(my_\w+) = {solution.group(1)}$", answer, re.M)
        if "✏️" not in answer or not learner:
            continue
        if any(learner.group(1) in checked_names("".join(c["source"])) for c in cells[i + 2:]):
            found.append(learner.group(1))
    return found


def deep_igpt_imports(notebook: dict) -> list[str]:
    """Imports that reach past the package's public surface (igpt_core.<module>)."""
    deep = []
    for cell in code_cells(notebook):
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("igpt_core."):
                deep.append(f"from {node.module} import ...")
            elif isinstance(node, ast.Import):
                deep += [f"import {a.name}" for a in node.names if a.name.startswith("igpt_core.")]
    return deep


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_has_self_checking_exercises(path):
    found = exercises(json.loads(path.read_text()))
    assert len(found) >= MIN_EXERCISES, f"{path.name}: {len(found)} complete exercises ({found}), want {MIN_EXERCISES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_import_the_public_api_only(path):
    assert deep_igpt_imports(json.loads(path.read_text())) == [], path.name


def cell(source: str, hidden: bool = False) -> dict:
    return {"cell_type": "code", "metadata": {"jupyter": {"source_hidden": True}} if hidden else {},
            "source": source.splitlines(keepends=True)}


def test_an_exercise_counts_only_with_all_three_parts():
    solution = cell("solution_1 = 4", hidden=True)
    answer = cell("# ✏️ YOUR PREDICTION\nmy_keys = solution_1")
    check = cell("assert my_keys == measured, 'Not quite'")
    assert exercises({"cells": [solution, answer, check]}) == ["my_keys"]
    assert exercises({"cells": [cell("solution_1 = 4"), answer, check]}) == []  # the solution shows
    assert exercises({"cells": [solution, cell("my_keys = solution_1"), check]}) == []  # no ✏️ marker
    assert exercises({"cells": [solution, answer, cell("assert my_keys == measured")]}) == []  # no message
    assert deep_igpt_imports({"cells": [cell("from igpt_core.probe import probe_run\nfrom igpt_core import render")]}) \
        == ["from igpt_core.probe import ..."]
