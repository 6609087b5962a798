"""Every notebook runs in what `make notebooks` installs: `pip install -e ".[apps,notebooks]"`.

The packages a notebook imports (read with ast from its code cells) must be installed by the
project's base dependencies, its `apps` and `notebooks` extras, or what those depend on in turn
(IPython comes with ipykernel, for instance). Dependencies are followed through the installed
packages' own metadata, so a package that is only here because the dev extra put it here does not count.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAKE_NOTEBOOKS_EXTRAS = ("apps", "notebooks")  # the Makefile's `pip install -e ".[apps,notebooks]"`
THIS_PROJECT = "igpt_core"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def notebook_imports(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the notebook's code cells."""
    cells = json.loads(path.read_text())["cells"]
    found = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source, filename=path.name)):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def installed_by(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, following each one's own dependencies."""
    seen: set[str] = set()
    todo = [(Requirement(text), "") for text in requirements]
    while todo:
        requirement, wanted_by_extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": wanted_by_extra}):
            continue
        name = canonical(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen |= {key, name}
        try:
            dependencies = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # a marker-free requirement that is not installed here: nothing further to follow
        for text in dependencies:
            dependency = Requirement(text)
            # A dependency of an extra counts only when that extra was asked for.
            extras = [""] + sorted(requirement.extras)
            for extra in extras:
                if not dependency.marker or dependency.marker.evaluate({"extra": extra}):
                    todo.append((dependency, extra))
                    break
    return {key for key in seen if "[" not in key}


def project_requirements(extras) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]


def missing_packages(imports: set[str], installed: set[str]) -> dict[str, str]:
    """{import name: why} for the imports that `installed` does not provide."""
    providers = metadata.packages_distributions()  # import name -> distributions, e.g. sklearn -> scikit-learn
    missing = {}
    for name in sorted(imports - set(sys.stdlib_module_names) - {THIS_PROJECT, "__future__"}):
        distributions = {canonical(d) for d in providers.get(name, [])}
        if not distributions:
            missing[name] = "no installed distribution provides it"
        elif not distributions & installed:
            missing[name] = f"comes from {', '.join(sorted(distributions))}, which the extras do not install"
    return missing


def test_every_notebook_import_is_installed_by_make_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    installed = installed_by(project_requirements(MAKE_NOTEBOOKS_EXTRAS))
    problems = {path.name: missing_packages(notebook_imports(path), installed) for path in NOTEBOOKS}
    problems = {name: missing for name, missing in problems.items() if missing}
    assert not problems, (f"notebooks import packages that `pip install -e .[{','.join(MAKE_NOTEBOOKS_EXTRAS)}]` "
                          f"does not install (add them to the notebooks extra): {problems}")


def test_the_check_finds_a_package_the_extras_leave_out():
    # Base dependencies alone: matplotlib (notebooks extra) and pandas (apps extra) are missing,
    # IPython is missing (ipykernel brings it), numpy and scikit-learn's sklearn are not.
    installed = installed_by(project_requirements(()))
    missing = missing_packages({"matplotlib", "pandas", "IPython", "numpy", "sklearn", "PIL", "os"}, installed)
    assert set(missing) == {"matplotlib", "pandas", "IPython"}


def test_imports_are_read_from_code_cells_only(tmp_path):
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["import markdown_is_not_code\n"]},
        {"cell_type": "code", "source": ["%matplotlib inline\n", "import numpy as np, os.path\n",
                                         "from PIL import Image\n", "from . import local\n"]},
        {"cell_type": "code", "source": ["def f():\n", "    import sklearn.linear_model\n"]},
    ]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(notebook))
    assert notebook_imports(path) == {"numpy", "os", "PIL", "sklearn"}
