"""`igpt runs`: the runs with their dataset, objective, size, steps and best validation bits/dim."""

from __future__ import annotations

from .common import add_json, command, emit, runs_dir


def cmd_runs(args) -> None:
    from igpt_core import scan_runs

    readable, problems = scan_runs(runs_dir(args))
    rows = sorted([run.summary() for run in readable] + [{"name": name, "error": why} for name, why in problems.items()],
                  key=lambda row: row["name"])
    if args.json:
        emit(args, rows, "")
        return
    if not rows:
        print(f"no runs under {runs_dir(args)}/ — make one with `igpt train --dataset digits --preset tiny`")
        return
    print(f"{'name':24} {'dataset':14} {'objective':9} {'preset':6} {'res':>4} {'steps':>6} {'best val bits/dim':>17}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} (unreadable: {r['error']})")
            continue
        bpd = "-" if r["best_val_bpd"] is None else f"{r['best_val_bpd']:.3f}"
        print(f"{r['name']:24} {str(r['dataset'])[:14]:14} {r['objective']:9} {str(r['preset']):6} "
              f"{r['resolution']:>4} {r['steps']:>6} {bpd:>17}")


def add_runs(sub) -> None:
    p = command(sub, "runs", cmd_runs, "list runs with dataset, objective, preset, steps and best val bits/dim")
    add_json(p, "print as JSON")
