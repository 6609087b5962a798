"""`igpt`: one command, with sub-commands for every step of the method. `igpt SUBCOMMAND --help` explains each.

Each sub-command is a parser builder (`add_NAME`) and a handler (`cmd_NAME`) in one of this package's
modules; the library is imported inside the handlers, so `igpt --help` stays quick. Errors caused by
input are printed as one line (`error: ...`) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from igpt_core import IgptError, LostPeersError

from . import apps, data, pretrained, probe, runs, sample, train

# In the order `igpt --help` lists them: from data to a trained model, to what it does and knows.
BUILDERS = [train.add_train, runs.add_runs, data.add_data, data.add_tokenize, sample.add_sample, sample.add_score,
            sample.add_surprise, sample.add_inside, probe.add_probe, probe.add_paper,
            probe.add_finetune, probe.add_classify,
            pretrained.add_import_hf, pretrained.add_import_openai, pretrained.add_export_hf, apps.add_demo, apps.add_dashboard]


def build_parser() -> argparse.ArgumentParser:
    """The `igpt` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT explorer: train iGPT on pixels, complete images, probe what the layers know.",
        epilog="Runs live under ./runs (or --runs-dir, or $IGPT_RUNS_DIR). `igpt COMMAND --help` explains each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in BUILDERS:
        add(sub)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except IgptError as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, LostPeersError):
            # The process group's threads still wait on the lost process: a normal interpreter exit runs
            # their destructors and can abort (SIGABRT) instead of exiting with status 2. Everything is
            # saved and closed by now, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise SystemExit(2) from None
