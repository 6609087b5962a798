"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated rather than written.

- cli.md, the command-line reference: `igpt_core.cli.build_parser()` walked at build time, so the
  page always says what `igpt COMMAND --help` says.
- notebooks/NAME.ipynb, one page per notebook in notebooks/, rendered by mkdocs-jupyter from its
  *executed* copy in $IGPT_EXECUTED_NOTEBOOKS (default build/notebooks, written by
  scripts/run_notebooks.py), with its outputs; they are listed under "Notebooks" in the navigation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def executed_folder() -> Path:
    """Where the executed notebooks are read from."""
    return Path(os.environ.get("IGPT_EXECUTED_NOTEBOOKS", ROOT / "build" / "notebooks")).resolve()


def notebook_names() -> list[str]:
    """Every notebook in notebooks/ (the sources decide which pages exist), in name order."""
    return sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))


def on_config(config):
    """Append a "Notebooks" section to the navigation, one entry per notebook."""
    config["nav"].append({"Notebooks": [f"notebooks/{name}" for name in notebook_names()]})
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into its pages
def on_files(files, config):
    """Add the generated CLI page and the executed notebooks to the site's files."""
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    folder = executed_folder()
    # A real file under a source folder, not File.generated: mkdocs-jupyter wraps each notebook's File
    # and finds its path again from src_dir and src_uri. So the folder is named "notebooks", like the URLs.
    if folder.name != "notebooks":
        raise PluginError(f"the executed notebooks' folder must be named 'notebooks', got {folder}")
    for name in notebook_names():
        if not (folder / name).exists():
            raise PluginError(f"{folder / name} is missing: execute the notebooks first "
                              f"(`make docs`, or python scripts/run_notebooks.py {folder})")
        files.append(File(f"notebooks/{name}", src_dir=str(folder.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


# -- the CLI reference ------------------------------------------------------------------------------


def cli_reference() -> str:
    """Markdown for every sub-command of `igpt`: its description and a table of its arguments."""
    from igpt_core.cli import build_parser

    parser = build_parser()
    lines = ["# Command line: `igpt`", "", parser.description or "", "",
             "Generated from the command's own argument parser: `igpt COMMAND --help` prints the same.", ""]
    commands = subcommands(parser)
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`igpt {name}`](#igpt-{name}) | {escape(help_text)} |" for name, help_text, _ in commands]
    for name, _, sub in commands:
        lines += ["", f"## igpt {name}", "", "```text", sub.format_usage().strip(), "```", "",
                  escape(sub.description or ""), "", *argument_table(sub)]
    if parser.epilog:
        lines += ["", parser.epilog]
    return "\n".join(lines) + "\n"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each sub-command, in the order `igpt --help` lists them.

    argparse has no public way to walk a parser; its sub-parsers action is read, as help generators do."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def argument_table(parser: argparse.ArgumentParser) -> list[str]:
    """One row per argument: how it is written, what it does (with its default and choices)."""
    rows = ["| argument | what it does |", "|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        spelled = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            spelled += f" {action.metavar or action.dest.upper()}"
        text = (action.help or "").replace("%(default)s", str(action.default))
        if action.choices and "one of" not in text:
            text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| `{spelled}` | {escape(text)} |")
    return rows


def escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
