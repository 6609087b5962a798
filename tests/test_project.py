"""The project's own files agree with each other: dependencies, commands, notebooks."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted.update({_name(r): r for r in extra})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = {}
    for item in env["dependencies"]:
        for requirement in item["pip"] if isinstance(item, dict) else [item]:
            if requirement not in ("pip", "-e .") and not requirement.startswith("python="):
                listed[_name(requirement).replace("pytorch", "torch")] = requirement
    assert set(listed) == set(wanted)
    for name, requirement in wanted.items():  # same lower bounds
        bound = re.search(r">=([\d.]+)", requirement).group(1)
        assert f">={bound}" in listed[name], (name, listed[name], requirement)


def test_constraints_pin_the_cpu_torch_and_every_direct_dependency():
    pins = {_name(line): line for line in (ROOT / "requirements/constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    assert pins["torch"] == "torch==2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        assert _name(requirement) in pins, requirement


def test_readme_states_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_committed_notebooks_carry_no_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name


def test_library_never_imports_ui_packages():
    for path in (ROOT / "igpt_core").rglob("*.py"):
        source = path.read_text()
        for package in ("gradio", "streamlit", "plotly"):
            assert not re.search(rf"^\s*(import|from) {package}\b", source, re.M), (path.name, package)


def test_light_modules_need_neither_torch_nor_scikit_learn():
    # Load them without the package's __init__ (which re-exports everything, torch included).
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType('igpt_core'); pkg.__path__ = [{str(ROOT / 'igpt_core')!r}]\n"
        "sys.modules['igpt_core'] = pkg\n"
        "for name in ('files', 'errors', 'progress', 'images', 'render'):\n"
        "    importlib.import_module('igpt_core.' + name)\n"
        "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
