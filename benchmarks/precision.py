"""How much bf16 features move probe accuracy, against fp32, and how much any change that small moves it.

For each run (RUN or RUN:DATASET) and each of its checkpoints, the probe's features of every layer are
computed twice, in fp32 and in bf16 (forced, whatever "auto" would pick for the run's width), and a
probe is fitted on each, exactly as `igpt probe` does (C chosen on the validation split). Two more
fits tell what the difference means:

- "noise": fp32 features plus random noise of the same size as bf16's error, image by image (the
  norm of bf16 − fp32 for that image and layer, in a random direction). If this moves accuracy as
  much as bf16 does, the change is the probe's sensitivity to any perturbation of that size, not a
  bias that bf16 brings;
- "bf16_at_fp32_C": bf16 features with C fixed to the one fp32's probe chose, which removes the
  changes that come only from the validation split choosing another C.

Prints JSON: per checkpoint and layer the four test accuracies, then per run the largest and mean
absolute change of each kind, in points. After `make default-run` (and `make probe-demo` for the
translated digits), from the repository root:

    python benchmarks/precision.py digits digits-moved
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

from igpt_core.errors import IgptError
from igpt_core.probe.features import extract_features
from igpt_core.probe.fit import DEFAULT_CS, fit_probes
from igpt_core.probe.run import probe_inputs
from igpt_core.runs import open_run

SPLITS = ("train", "val", "test")


def features(model, ids: dict, layers, precision: str) -> dict:
    """{split: float32 (len(layers), N, d)}."""
    return {split: extract_features(model, ids[split], layers, batch_size=64, precision=precision) for split in SPLITS}


def noise_like(fp32: dict, bf16: dict, seed: int) -> dict:
    """fp32 plus Gaussian noise whose norm, per image and layer, equals that of bf16 − fp32."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in SPLITS:
        error = np.linalg.norm(bf16[split] - fp32[split], axis=-1, keepdims=True)
        direction = rng.standard_normal(fp32[split].shape).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        out[split] = fp32[split] + error * direction
    return out


def jobs(kind: str, feats: dict, labels: dict, layers, step: int):
    for i, layer in enumerate(layers):
        arrays = []
        for split in SPLITS:
            arrays += [feats[split][i], labels[split]]
        yield (kind, step, layer), tuple(arrays)


def at_fp32_C(results: dict, bf16: dict, labels: dict, layers, step: int) -> dict:
    """{layer: fit} of bf16 features with C fixed to the one fp32's probe chose for that layer."""
    by_C = {}
    for key, arrays in jobs("bf16", bf16, labels, layers, step):
        by_C.setdefault(results[("fp32", *key[1:])]["C"], []).append((key[2], arrays))
    fixed = {}
    for C, group in by_C.items():
        fixed.update(fit_probes(group, Cs=(C,)))
    return fixed


def measure_run(name: str, dataset: str | None, runs_dir: str, seed: int, last: int) -> dict:
    run = open_run(name, runs_dir)
    dataset = dataset or run.info["dataset"]
    inputs = probe_inputs(run, dataset, None, None, seed, 0, DEFAULT_CS, "fp32")
    layers = list(range(run.model_config.n_layer + 1))
    rows, timings = [], {"fp32": 0.0, "bf16": 0.0}
    steps = run.checkpoints()[-last:] if last else run.checkpoints()
    for step in steps:
        model = run.load(step)[0]
        t0 = time.perf_counter()
        fp32 = features(model, inputs.ids, layers, "fp32")
        t1 = time.perf_counter()
        bf16 = features(model, inputs.ids, layers, "bf16")
        timings["fp32"] += t1 - t0
        timings["bf16"] += time.perf_counter() - t1
        noisy = noise_like(fp32, bf16, seed=step)
        results = fit_probes([*jobs("fp32", fp32, inputs.labels, layers, step), *jobs("bf16", bf16, inputs.labels, layers, step),
                              *jobs("noise", noisy, inputs.labels, layers, step)])
        fixed = at_fp32_C(results, bf16, inputs.labels, layers, step)
        for i, layer in enumerate(layers):
            C = results[("fp32", step, layer)]["C"]
            error = np.linalg.norm(bf16["test"][i] - fp32["test"][i], axis=-1) / np.linalg.norm(fp32["test"][i], axis=-1)
            rows.append({
                "step": step, "layer": layer,
                "fp32": round(100 * results[("fp32", step, layer)]["test_acc"], 2),
                "bf16": round(100 * results[("bf16", step, layer)]["test_acc"], 2),
                "noise": round(100 * results[("noise", step, layer)]["test_acc"], 2),
                "bf16_at_fp32_C": round(100 * fixed[layer]["test_acc"], 2),
                "C_fp32": C, "C_bf16": results[("bf16", step, layer)]["C"],
                "feature_relative_error_mean": float(error.mean()),
            })
    return summary(name, dataset, run, inputs, rows, timings, len(steps))


def summary(name: str, dataset: str, run, inputs, rows: list, timings: dict, checkpoints: int) -> dict:
    def change(kind: str) -> dict:
        d = np.abs([r[kind] - r["fp32"] for r in rows])
        return {"max_points": round(float(d.max()), 2), "mean_points": round(float(d.mean()), 2),
                "within_0.5_points": f"{int((d <= 0.5).sum())}/{len(d)}"}

    n_test = inputs.settings["n_test"]
    return {
        "run": name, "dataset": dataset, "width": run.model_config.n_embd, "layers": run.model_config.n_layer + 1,
        "checkpoints": checkpoints, "test_images": n_test, "one_test_image_points": round(100 / n_test, 2),
        "feature_seconds": {k: round(v, 2) for k, v in timings.items()},
        "change_vs_fp32": {kind: change(kind) for kind in ("bf16", "noise", "bf16_at_fp32_C")},
        "C_changed": f"{sum(r['C_fp32'] != r['C_bf16'] for r in rows)}/{len(rows)}",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", default=["digits"],
                        help="RUN or RUN:DATASET (default dataset: the run's own); default: digits, the default run")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--seed", type=int, default=0, help="the probe's seed, as igpt probe --seed")
    parser.add_argument("--checkpoints", type=int, default=0, help="measure only the last K checkpoints (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reports = []
    for spec in args.runs:
        name, _, dataset = spec.partition(":")
        try:
            reports.append(measure_run(name, dataset or None, args.runs_dir, args.seed, args.checkpoints))
        except IgptError as err:  # e.g. no such run: `make default-run` trains the default one
            raise SystemExit(f"precision.py: {err}")
    print(json.dumps({"task": "probe accuracy with bf16 features against fp32", "machine": machine_facts(),
                      "runs": reports}, indent=1))


if __name__ == "__main__":
    main()
