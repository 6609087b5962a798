"""`igpt runs`: the runs with their dataset, objective, size, steps and best validation bits/token;
imported runs are labelled as the pre-trained models they are."""

from __future__ import annotations

from .common import add_json, command, emit, runs_dir


def cmd_runs(args) -> None:
    from igpt_core import imported_label, scan_runs

    readable, problems = scan_runs(runs_dir(args))
    rows = [{**run.summary(), "label": imported_label(run)} for run in readable]
    rows = sorted(rows + [{"name": name, "error": why} for name, why in problems.items()], key=lambda row: row["name"])
    if args.json:
        emit(args, rows, "")
        return
    if not rows:
        print(f"no runs under {runs_dir(args)}/ — make one with `igpt train --dataset digits --preset tiny`")
        return
    print(f"{'name':24} {'dataset':14} {'objective':9} {'preset':6} {'res':>4} {'steps':>6} "
          f"{'best val bits/token':>19}")
    for r in rows:
        print(row_text(r))


def row_text(r: dict) -> str:
    """One run's line. An imported run shows its label after the columns, and its steps only when they
    are OpenAI's training steps (imports from Hugging Face hold one checkpoint, at step 0)."""
    if "error" in r:
        return f"{r['name']:24} (unreadable: {r['error']})"
    bits = "-" if r["best_val_bits_per_token"] is None else f"{r['best_val_bits_per_token']:.3f}"
    dataset, steps, label = str(r["dataset"]), str(r["steps"]), ""
    if r["label"]:
        dataset, label = "imported", f"  {r['label']}"
        steps = steps if r["steps"] else "-"
    return (f"{r['name']:24} {dataset[:14]:14} {r['objective']:9} {str(r['preset'] or '-'):6} "
            f"{r['resolution']:>4} {steps:>6} {bits:>19}{label}")


def add_runs(sub) -> None:
    p = command(sub, "runs", cmd_runs, "list runs with dataset, objective, preset, steps and best val bits/token")
    add_json(p, "print as JSON")
