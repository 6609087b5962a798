"""What every sub-command shares: how a sub-command is declared, the options many of them take, and
how results are printed (text, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRECISION_HELP = ("arithmetic of the model's forward passes: auto (bfloat16 where this machine computes it "
                  "fast, else float32), fp32 or bf16 (default auto)")


def command(sub, name: str, handler, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command that runs handler(args), with --runs-dir, as every command has."""
    parser = sub.add_parser(name, help=help_text, description=description or help_text)
    parser.add_argument("--runs-dir", help="folder holding the runs (default: $IGPT_RUNS_DIR or ./runs)")
    parser.set_defaults(func=handler)
    return parser


def runs_dir(args) -> Path:
    """The runs folder the command was given, or the default one."""
    from igpt_core import runs_root

    return runs_root(args.runs_dir)


def emit(args, result, text: str) -> None:
    """The result as JSON with --json, else the text for people."""
    print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else text)


def int_list(text: str) -> list[int]:
    """An argparse type: "1,2,3" -> [1, 2, 3]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def steps_or_all(text: str):
    """An argparse type: "all", "last" or comma-separated integers."""
    return text if text in ("all", "last") else int_list(text)


def add_json(parser, help_text: str = "print the result as JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help_text)


def add_data_dir(parser) -> None:
    parser.add_argument("--data-dir", help="where dataset files live (default $IGPT_DATA_DIR or ./data)")


def add_device(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")


def add_precision(parser) -> None:
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help=PRECISION_HELP)


def add_int8(parser) -> None:
    parser.add_argument("--int8", action="store_true",
                        help="decode with int8 weights: faster on CPUs, approximate (autoregressive runs only)")


def add_model(parser) -> None:
    """The options of a command that loads one checkpoint of a run."""
    parser.add_argument("run", help="run name (see `igpt runs`)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    add_device(parser)
    add_json(parser)


def load_model(args):
    """(run, model, palette) of the checkpoint the command names."""
    from igpt_core import open_run
    from igpt_core import pick_device

    run = open_run(args.run, runs_dir(args))
    model, palette, _ = run.load(args.step, device=pick_device(args.device))
    return run, model, palette
