"""Reproduce the pre-registered probe study of docs/findings.md: train, probe, score (a)(b)(c).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 nice -n 19 python docs/findings/run_study.py \
        --runs-dir /tmp/findings-runs --only moved-ar --seeds 0,1,2

Each (setting, seed) is one `igpt train` and one `igpt probe` (run as child processes, so their CPU
time is measured); finished runs and cached features are re-used, so the script can be stopped and
started again. `--report` only re-reads the probe tables and rewrites results.json and the table.
The metrics are the protocol's (docs/findings.md): every choice (C, layer) on validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
COMMON = ["--preset", "tiny", "--colors", "16", "--batch-size", "32", "--lr", "0.003", "--eval-every", "50"]
CHECKPOINTS = "25,50,100,150,200,300"
MARGIN = 0.02  # (a) and (b): two points of test accuracy
RHO_MAX = -0.8  # (c)

# name -> what `igpt train` gets, what is probed, the seeds the protocol plans (in the order run).
SETTINGS = {
    "moved-ar": dict(title="translated digits, AR", dataset="digits-moved", probe="digits-moved", seeds=(0, 1, 2),
                     train=["--steps", "300", "--checkpoints", CHECKPOINTS]),
    "photos-faces": dict(title="photos 16×16 → lfw faces vs non-faces", dataset="photos", probe="lfw", seeds=(0,),
                         train=["--steps", "300", "--checkpoints", CHECKPOINTS, "--resolution", "16"]),
    "digits-ar": dict(title="default digits 8×8 (control)", dataset="digits", probe="digits", seeds=(0, 1, 2),
                      train=["--steps", "300", "--checkpoints", CHECKPOINTS]),
    "moved-bert": dict(title="translated digits, BERT", dataset="digits-moved", probe="digits-moved", seeds=(0,),
                       train=["--steps", "300", "--checkpoints", CHECKPOINTS, "--objective", "bert"]),
    # seeds 1 and 2 added after seed 0 had been read (docs/findings.md, deviations): three seeds or no "yes"
    "moved-deep": dict(title="translated digits, 8 blocks × 64", dataset="digits-moved", probe="digits-moved",
                       seeds=(0, 1, 2), train=["--steps", "300", "--checkpoints", CHECKPOINTS,
                                          "--set", "n_layer=8", "--set", "n_embd=64"]),
    "moved-long": dict(title="translated digits, AR, 900 steps", dataset="digits-moved", probe="digits-moved",
                       seeds=(0,), train=["--steps", "900", "--checkpoints", "25,50,100,200,300,450,600,900"]),
}


def lfw_folder(runs_dir: Path) -> Path:
    """scikit-image's lfw_subset (100 faces, then 100 non-faces, 25×25 grey) as a class-per-folder tree."""
    import skimage.data
    from PIL import Image

    root = runs_dir / "lfw_subset"
    if not (root / "non-face").is_dir():
        tmp = runs_dir / ".lfw_subset.tmp"
        images = np.rint(skimage.data.lfw_subset() * 255).astype(np.uint8)
        for i, image in enumerate(images):
            folder = tmp / ("face" if i < 100 else "non-face")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
        os.replace(tmp, root)
    return root


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def igpt(*args: str) -> dict:
    """Run one `igpt` sub-command; its wall and CPU seconds."""
    start, cpu = time.perf_counter(), child_cpu_seconds()
    command = [sys.executable, "-m", "igpt_core.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": child_cpu_seconds() - cpu}


def run_one(name: str, seed: int, runs_dir: Path) -> None:
    """Train and probe one (setting, seed); the costs go to the run's folder beside its results."""
    setting, run = SETTINGS[name], f"{name}-s{seed}"
    cost_path = runs_dir / run / "study-cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    if "train" not in cost:
        cost["train"] = igpt("train", "--runs-dir", str(runs_dir), "--dataset", setting["dataset"], "--name", run,
                             "--seed", str(seed), *COMMON, *setting["train"], "--overwrite", "--json")
        cost_path.write_text(json.dumps(cost))
    # The last checkpoint first, so that (a) and (b) exist even if the budget runs out before (c);
    # the second call re-uses its cached features.
    for part, checkpoints in (("probe_last", "last"), ("probe", "all")):
        if part not in cost:
            cost[part] = igpt("probe", run, "--runs-dir", str(runs_dir), "--dataset", probe_dataset(name, runs_dir),
                              "--checkpoints", checkpoints, "--layers", "all", "--json")
            cost_path.write_text(json.dumps(cost))


def probe_dataset(name: str, runs_dir: Path) -> str:
    probe = SETTINGS[name]["probe"]
    return f"folder:{lfw_folder(runs_dir)}" if probe == "lfw" else probe


def score(table) -> dict:
    """The protocol's (a), (b), (c) for one `igpt_core.probe.ProbeTable`.

    Best layers come from `ProbeTable.best` (validation accuracy; ties go to the shallower layer).
    """
    from igpt_core.probe import spearman

    n_layer, steps = table.n_layer, sorted({r["step"] for r in table.rows})
    by_layer = {r["layer"]: r for r in table.rows if r["step"] == steps[-1]}
    best = table.best(steps[-1])
    ends = max(by_layer[0]["test_acc"], by_layer[n_layer]["test_acc"])
    raw = table.references["raw_pixels"]["test_acc"]
    per_step = [table.best(step) for step in steps]
    # (c) needs six checkpoints; spearman() is None when either side has no spread.
    rho = spearman([r["val_loss"] for r in per_step], [r["test_acc"] for r in per_step]) if len(steps) >= 6 else None
    inside = 1 <= best["layer"] <= n_layer - 1
    return {
        "n_layer": n_layer, "final_step": steps[-1], "best_layer": best["layer"], "best_test": best["test_acc"],
        "test_by_layer": [by_layer[layer]["test_acc"] for layer in range(n_layer + 1)],
        "raw_pixels_test": raw, "random_init_best_test": max(r["test_acc"] for r in table.references["random_init"]),
        "a_margin": best["test_acc"] - ends, "a": bool(inside and best["test_acc"] - ends >= MARGIN - 1e-9),
        "b_margin": best["test_acc"] - raw, "b": bool(best["test_acc"] - raw >= MARGIN - 1e-9),
        "c_rho": float("nan") if rho is None else rho, "c": None if rho is None else bool(rho <= RHO_MAX),
        "n_checkpoints": len(steps),
        "curve": [{"step": r["step"], "val_loss": r["val_loss"], "best_layer": r["layer"], "test_acc": r["test_acc"]}
                  for r in per_step],
    }


def collect(runs_dir: Path) -> dict:
    """Every setting of the protocol, with the seeds that have a probe table (none: not run)."""
    from igpt_core.probe import load_probe_results

    results = {}
    for name, setting in SETTINGS.items():
        seeds = []
        for seed in setting["seeds"]:
            run = runs_dir / f"{name}-s{seed}"
            cost_path = run / "study-cost.json"
            cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
            if "probe_last" not in cost and "probe" not in cost:
                continue
            table = load_probe_results(run.name, probe_dataset(name, runs_dir), runs_dir=runs_dir)
            cpu = sum(part["cpu_s"] for part in cost.values())
            seeds.append({"seed": seed, **score(table), "cpu_min": cpu / 60})
        results[name] = {"title": setting["title"], "planned_seeds": list(setting["seeds"]), "runs": seeds}
    return results


def spread(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:+.3g}"
    return f"{np.mean(values):+.3g} ({min(values):+.3g}…{max(values):+.3g})"


SEEDS_FOR_YES = 3  # the "each over 3 seeds": a setting planned with fewer can only hint


def verdict(runs: list[dict], key: str, planned: int) -> str:
    """yes: held in every planned seed, three at least; hint: in every seed run, but fewer; else no."""
    runs = [r for r in runs if r[key] is not None]  # (c) is not measured before six checkpoints are probed
    if not runs:
        return "not measured"
    held = sum(r[key] for r in runs)
    word = "yes" if held == len(runs) == planned >= SEEDS_FOR_YES else ("hint" if held == len(runs) else "no")
    return f"{word} ({held}/{len(runs)})"


def markdown(results: dict) -> str:
    """The results table of docs/findings.md: margins in points of test accuracy, mean (min…max)."""
    lines = ["| setting | seeds run | best layer l* (of 0..L) | (a) l* − best end, pts | (b) l* − pixels, pts "
             "| (c) ρ(val loss, best test acc) | best / pixels test acc | CPU min (train + probe) |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results.values():
        runs, planned = result["runs"], len(result["planned_seeds"])
        if not runs:
            lines.append(f"| {result['title']} | not run (planned {planned}) | | | | | | |")
            continue
        pts = lambda key: spread([100 * r[key] for r in runs])  # noqa: E731
        layers = ", ".join(f"{r['best_layer']}/{r['n_layer']}" for r in runs)
        accs = ", ".join(f"{100 * r['best_test']:.1f} / {100 * r['raw_pixels_test']:.1f}" for r in runs)
        cpu = ", ".join(f"{r['cpu_min']:.1f}" for r in runs)
        lines.append(
            f"| {result['title']} | {', '.join(str(r['seed']) for r in runs)} of {planned} | {layers} "
            f"| {pts('a_margin')} → {verdict(runs, 'a', planned)} | {pts('b_margin')} → {verdict(runs, 'b', planned)} "
            f"| {spread([r['c_rho'] for r in runs])} → {verdict(runs, 'c', planned)} | {accs} | {cpu} |")
    return "\n".join(lines) + "\n\n" + per_layer(results) + "\n" + across_checkpoints(results)


def per_layer(results: dict) -> str:
    """Every run's test accuracy by layer at its final checkpoint, with the two references."""
    width = max((r["n_layer"] for result in results.values() for r in result["runs"]), default=0)
    lines = ["**Per layer, final checkpoint (test accuracy, %; l = 0 embeddings … L = ln_f; * = best by validation):**",
             "", "| run | " + " | ".join(f"l{i}" for i in range(width + 1)) + " | raw pixels | random init (best layer) |",
             "|---|" + "---|" * (width + 3)]
    for result in results.values():
        for r in result["runs"]:
            cells = [f"{100 * acc:.1f}" + ("*" if i == r["best_layer"] else "") for i, acc in enumerate(r["test_by_layer"])]
            cells += [""] * (width + 1 - len(cells))
            lines.append(f"| {result['title']}, seed {r['seed']} | " + " | ".join(cells)
                         + f" | {100 * r['raw_pixels_test']:.1f} | {100 * r['random_init_best_test']:.1f} |")
    return "\n".join(lines) + "\n"


def across_checkpoints(results: dict) -> str:
    """Each run's checkpoints: validation loss → best layer by validation accuracy, its test accuracy."""
    lines = ["**Across checkpoints (validation loss → best layer by validation accuracy, its test accuracy):**", ""]
    for result in results.values():
        for r in result["runs"]:
            steps = ", ".join(str(c["step"]) for c in r["curve"])
            points = ", ".join(f"{c['val_loss']:.3f} → l{c['best_layer']} {100 * c['test_acc']:.1f}" for c in r["curve"])
            lines.append(f"- {result['title']}, seed {r['seed']} (steps {steps}): {points}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/findings-runs"))
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings, in order")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: each setting's planned ones)")
    parser.add_argument("--report", action="store_true", help="only score the finished runs and write the report")
    args = parser.parse_args(argv)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.only.split(","):
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else SETTINGS[name]["seeds"]
            for seed in seeds:
                print(f"== {name} seed {seed}", flush=True)
                run_one(name, seed, args.runs_dir)
    results = collect(args.runs_dir)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
