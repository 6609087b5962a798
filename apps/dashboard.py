"""Probe dashboard: what do the layers of our Image GPT runs know? (Streamlit)

    streamlit run apps/dashboard.py                      # runs from $IGPT_RUNS_DIR or ./runs
    streamlit run apps/dashboard.py -- --runs-dir DIR    # or name the folder
    igpt dashboard                                       # the same, via the CLI

A thin shell over igpt_core: it reads what `igpt train`, `igpt probe` and `igpt finetune` stored in
the run folders (metrics.jsonl, probes/<dataset>.json, run.json) and charts it, the paper's way
(Chen et al. 2020, Figures 2-3): probe accuracy by layer per checkpoint, validation loss against
best-layer probe accuracy, AR against BERT, linear probe against fine-tuning, training curves,
where the attention heads look (attention distance per layer and head, attention/distance.json), and
inside the representations (accuracy heat map, confusion, CKA, PCA over training: dashboard_analysis.py).
Nothing is recomputed on page load; the only computations are the "Compute missing probes" button,
which calls `igpt_core.probe.probe_run`, and the attention-distance buttons, which call
`igpt_core.explain.run_distances`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import streamlit as st

from igpt_core import IgptError, Run
from igpt_core.explain import load_distances
from igpt_core import load_probe_results
from igpt_core import runs_root, scan_runs

if __package__:  # imported as the package igpt_apps
    from .dashboard_charts import (best_by_checkpoint, depth_chart, distance_chart, distance_frame, finetune_chart,
                                   layer_chart, loss_vs_accuracy_chart, metrics_frame, probe_frame, training_chart)
    from .dashboard_paper import paper_section
    from .dashboard_probing import TRAIN_COMMAND, compute_distances, compute_probes
    from .dashboard_analysis import file_stamps, inside_the_representations
else:  # run by path (`streamlit run apps/dashboard.py`, as `igpt dashboard` does)
    # Its folder goes on sys.path: Streamlit and Python put it there, but a worker process that re-runs this
    # file as its __main__ (multiprocessing's forkserver does, e.g. for the probe's fits) may not have it.
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dashboard_charts import (best_by_checkpoint, depth_chart, distance_chart, distance_frame, finetune_chart,
                                  layer_chart, loss_vs_accuracy_chart, metrics_frame, probe_frame, training_chart)
    from dashboard_paper import paper_section
    from dashboard_probing import TRAIN_COMMAND, compute_distances, compute_probes
    from dashboard_analysis import file_stamps, inside_the_representations

PROBE_COMMAND = "igpt probe digits"
PLOTLY_CONFIG = {"displaylogo": False}
# One colour per run, the same in every chart that compares runs.
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


# -- where the runs are -------------------------------------------------------------------------------


def runs_dir_from_args(argv: list[str]) -> Path:
    """`-- --runs-dir DIR` after the script name wins, then $IGPT_RUNS_DIR (set by `igpt dashboard`), then ./runs."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir")
    args, _ = parser.parse_known_args(argv)
    return runs_root(args.runs_dir)


# -- reading runs (cached; the key includes file stamps, so new results written by the CLI show up) ------


def run_stamp(path: Path) -> tuple:
    """The stamps (names, sizes, mtimes) of the files the page reads from a run folder."""
    return file_stamps([path / "run.json", path / "metrics.jsonl", *sorted((path / "probes").glob("*.json"))])


@st.cache_data(show_spinner=False, max_entries=256)
def read_run(path: str, stamp: tuple) -> dict:
    """Everything the page shows about one readable run, as plain data. Problems with its metrics or
    probe files become `warnings`: the run is still shown as far as it can be read."""
    run = Run(Path(path))
    out = unusable_run(run.path, None)
    info, config = run.info, run.model_config  # readable: load_runs asks only for runs that scan_runs could read
    out.update(kind=info.get("kind", "pretrained"), dataset=info.get("dataset"), objective=config.objective,
               n_layer=config.n_layer, base_run=info.get("base_run"), base_step=info.get("base_step"),
               test_acc=info.get("test_acc"), val_acc=info.get("val_acc"))
    if note := run.format_note():
        out["warnings"].append(note)
    try:
        out["metrics"] = [row for row in run.metrics() if isinstance(row, dict) and "step" in row]
    except OSError as err:
        out["warnings"].append(f"run {run.name!r}: metrics.jsonl could not be read ({err})")
    for file in sorted((run.path / "probes").glob("*.json")):
        try:
            table = load_probe_results(run, file.stem)
        except IgptError as err:
            out["warnings"].append(str(err))
            continue
        except OSError as err:  # deleted mid-read
            out["warnings"].append(f"run {run.name!r}: {file} could not be read ({err})")
            continue
        if table is not None:
            out["probes"][table.dataset] = table
    return out


def unusable_run(path: Path, error: str | None) -> dict:
    """A run as the page shows it before (or instead of) reading it: `error` says why it cannot be used."""
    return {"name": path.name, "error": error, "warnings": [], "probes": {}, "metrics": [],
            "has_probe_files": any((path / "probes").glob("*.json"))}


def load_runs(runs_dir: Path, extra_names: list[str]) -> dict[str, dict]:
    """{name: read_run(...)} for every readable run; the unreadable ones with the library's one-line reason;
    and the names selected earlier whose folder is gone."""
    readable, problems = scan_runs(runs_dir)
    runs = {run.name: read_run(str(run.path), run_stamp(run.path)) for run in readable}
    runs.update({name: unusable_run(runs_dir / name, why) for name, why in problems.items()})
    for name in extra_names:
        if name not in runs:
            path = runs_dir / name
            runs[name] = unusable_run(path, f"run {name!r} no longer exists at {path} (deleted or moved?)")
    return runs


# -- page pieces ----------------------------------------------------------------------------------------


def table_with_download(frame: pd.DataFrame, file_name: str, key: str) -> None:
    st.dataframe(frame, hide_index=True, width="stretch")
    st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=file_name, mime="text/csv",
                       key=f"csv:{key}", on_click="ignore", icon=":material/download:")


def how_to_make_probes(names: list[str]) -> None:
    runs = names or ["digits"]
    st.info("Probe results come from `igpt probe RUN`, which stores them in `runs/RUN/probes/DATASET.json`. "
            "To make a first run and its probes:")
    st.code(f"{TRAIN_COMMAND}\n{PROBE_COMMAND}" if not names else
            "\n".join(f"igpt probe {name}" for name in runs), language="bash")
    st.caption("…or compute them from here with **Compute missing probes** in the sidebar.")


def where_the_heads_look(runs_dir: Path, good: list[str]) -> None:
    """Section 5: attention distance per layer and head, one line per checkpoint, from stored results."""
    st.header("5 · Where the heads look")
    st.caption("How far each head looks: the mean Euclidean distance, in pixels, between a query pixel and the "
               "pixels it attends to, weighted by attention and averaged over queries and validation images (the "
               "attention-distance plot of vision-transformer papers). Dashed: a head that spreads its weight "
               "evenly over every pixel it may see; below it a head looks near, above it far.")
    for name in good:
        try:
            table = load_distances(name, runs_dir=runs_dir)
            steps = Run(runs_dir / name).checkpoints()
        except IgptError as err:
            st.warning(str(err), icon=":material/warning:")
            continue
        done = set() if table is None else {r["step"] for r in table["rows"]}
        missing = [s for s in steps if s not in done]
        if table is not None and table["rows"]:
            frame = distance_frame(name, table)
            st.plotly_chart(distance_chart(name, table, frame), key=f"chart:distance:{name}", config=PLOTLY_CONFIG)
            table_with_download(frame, f"attention-distance_{name}.csv", f"distance:{name}")
        else:
            st.caption(f"No attention distances stored for {name} yet.")
        if missing and st.button(f"Compute the missing attention distances of {name} ({len(missing)} checkpoint"
                                 f"{'s' if len(missing) > 1 else ''})", key=f"distance_go:{name}"):
            compute_distances(runs_dir, name, missing)


# -- the page -------------------------------------------------------------------------------------------


class View(NamedTuple):
    """What the sidebar chose, for the page's sections."""

    runs: dict[str, dict]  # every run read, by name
    chosen: list[str]
    good: list[str]  # the chosen runs that could be read
    probed: list[str]  # the good runs with probe results on `dataset`
    dataset: str | None
    metric: str  # "test_acc" or "val_acc"
    metric_label: str
    colors: dict[str, str]  # one colour per run, the same in every chart


def choose(runs: dict[str, dict]) -> View:
    """The sidebar's choices (runs, probe dataset, test or validation accuracy), with each run's warnings."""
    st.sidebar.header("Runs")
    names = sorted(runs)
    with_probes = [n for n in names if runs[n]["has_probe_files"]]  # damaged ones too: their warning shows

    def describe(n: str) -> str:
        r = runs[n]
        if r["error"]:
            return n
        return f"{n} ({r['objective'].upper()}, {r['n_layer']} layers{', classifier' if r['kind'] == 'classifier' else ''})"

    chosen = st.sidebar.multiselect(
        "runs to show", names, default=with_probes or [n for n in names if not runs[n]["error"]], key="runs",
        format_func=describe, help="Default: the runs that have probe results (all runs if none has any).")
    for name in names:  # unreadable runs are reported whether chosen or not; other problems when chosen
        if runs[name]["error"]:
            st.warning(runs[name]["error"], icon=":material/warning:")
        elif name in chosen:
            for text in runs[name]["warnings"]:
                st.warning(text, icon=":material/warning:")
    good = [n for n in chosen if not runs[n]["error"]]
    datasets = sorted({d for n in good for d in runs[n]["probes"]})
    dataset = None
    if datasets:
        own = [runs[n]["dataset"] for n in good if runs[n]["dataset"] in datasets]
        dataset = st.sidebar.selectbox("probe dataset", datasets,
                                       index=datasets.index(own[0]) if own else 0, key="dataset")
    use_val = st.sidebar.toggle("show validation accuracy (instead of test)", key="use_val",
                                help="Best layers are always chosen on validation accuracy.")
    metric = "val_acc" if use_val else "test_acc"
    metric_label = "validation accuracy" if use_val else "test accuracy"
    colors = {n: RUN_COLORS[i % len(RUN_COLORS)] for i, n in enumerate(good)}
    probed = [n for n in good if dataset in runs[n]["probes"]]
    return View(runs, chosen, good, probed, dataset, metric, metric_label, colors)


def accuracy_by_layer(view: View) -> None:
    """Chart 1: probe accuracy by layer, one line per checkpoint, for each probed run."""
    runs, probed, dataset, metric, metric_label = view.runs, view.probed, view.dataset, view.metric, view.metric_label
    if not probed:
        return
    st.header("1 · Probe accuracy by layer")
    st.caption(f"One line per checkpoint, coloured by training step; ★ = the checkpoint's best layer "
               f"(chosen on validation accuracy); dashed: a probe on raw pixels; dotted: a probe on a "
               f"randomly initialised model of the same shape. Showing {metric_label}.")
    for name in probed:
        table = runs[name]["probes"][dataset]
        all_steps = table.steps
        key, seen = f"steps:{name}", f"steps-seen:{name}"
        if key in st.session_state and st.session_state.get(seen) != all_steps:
            # Checkpoints probed since the last run (the button, or `igpt probe`) join the selection.
            fresh = set(all_steps) - set(st.session_state.get(seen) or [])
            st.session_state[key] = sorted((set(st.session_state[key]) & set(all_steps)) | fresh)
        st.session_state[seen] = all_steps
        steps = st.multiselect(f"checkpoints of {name}", all_steps, key=key,
                               default=None if key in st.session_state else all_steps,
                               format_func=lambda s: f"step {s}")
        frame = probe_frame(name, table, steps)
        st.plotly_chart(layer_chart(name, runs[name], table, frame, metric, dataset), key=f"chart:layers:{name}",
                        config=PLOTLY_CONFIG)
        table_with_download(frame, f"probe-by-layer_{name}_{dataset}.csv", f"layers:{name}")


def loss_vs_accuracy(view: View) -> None:
    """Chart 2: validation loss against best-layer accuracy per checkpoint, with Spearman ρ per run."""
    runs, probed, dataset, metric, colors = view.runs, view.probed, view.dataset, view.metric, view.colors
    if not probed:
        return
    st.header("2 · Better generative models learn better features")
    frame = pd.concat([best_by_checkpoint(n, runs[n], runs[n]["probes"][dataset]) for n in probed],
                      ignore_index=True)
    # One ρ per run: losses of different runs (palettes, datasets, AR vs BERT's masked-pixel loss) are not
    # on one scale, so pooling their checkpoints would mix incomparable numbers.
    rhos = {name: runs[name]["probes"][dataset].loss_accuracy_rho(metric) for name in probed}
    st.plotly_chart(loss_vs_accuracy_chart(frame, metric, rhos, colors), key="chart:loss-vs-acc",
                    config=PLOTLY_CONFIG)
    per_run = [f"{name}: ρ = {'n/a' if r is None else f'{r:+.2f}'} "
               f"({int(frame[frame.run == name].val_loss.notna().sum())} checkpoints)" for name, r in rhos.items()]
    st.caption("One point per checkpoint (labelled by its training step); its best layer is chosen on "
               "validation accuracy. Spearman rank correlation between val loss and best-layer accuracy, per "
               "run — a negative ρ means lower loss goes with better features, as in the paper: "
               + "; ".join(per_run) + (" (n/a: fewer than 3 checkpoints)." if None in rhos.values() else ".")
               + (" Losses of runs with different palettes, datasets or objectives are not on one scale (BERT's "
                  "is on masked pixels only)." if len(probed) > 1 else ""))
    missing = int(frame.val_loss.isna().sum())
    if missing:
        st.caption(f"{missing} checkpoint(s) have no stored validation loss and are not plotted.")
    table_with_download(frame, f"val-loss-vs-probe_{dataset}.csv", "loss-vs-acc")


def ar_vs_bert_and_finetuning(view: View) -> None:
    """Section 3: AR against BERT by relative depth, and the best probe against fine-tuning."""
    runs, good, probed = view.runs, view.good, view.probed
    finetuned = [n for n, r in runs.items() if not r["error"] and r.get("kind") == "classifier"
                 and r.get("base_run") in good]
    if not (probed or finetuned):
        return
    st.header("3 · AR vs BERT, and linear probe vs fine-tuning")
    objectives = {runs[n]["objective"] for n in probed}
    if {"ar", "bert"} <= objectives:
        ar_vs_bert(view)
    elif probed:
        have = ", ".join(sorted(o.upper() for o in objectives))
        st.info(f"The chosen probed runs are all {have}: choose runs of both objectives to compare AR and "
                "BERT (train one with `igpt train --dataset digits --preset tiny --objective bert "
                "--name digits-bert`, then `igpt probe digits-bert`).")
    if finetuned:
        probe_vs_finetuning(view, finetuned)
    elif probed:
        st.caption("No fine-tuned classifiers of the chosen runs: `igpt finetune RUN` makes one "
                   "(it appears here as a bar next to the best probe).")


def ar_vs_bert(view: View) -> None:
    """Chart 3a: each probed run's best checkpoint, accuracy by relative depth, AR solid and BERT dashed."""
    runs, probed, dataset, metric, colors = view.runs, view.probed, view.dataset, view.metric, view.colors
    records = []
    for name in probed:
        table = runs[name]["probes"][dataset]
        step = table.best()["step"]  # the checkpoint of the run's best probe
        for r in sorted((r for r in table.rows if r["step"] == step), key=lambda r: r["layer"]):
            records.append({"run": name, "objective": runs[name]["objective"], "step": step,
                            "layer": r["layer"], "relative_depth": r["layer"] / table.n_layer,
                            "val_acc": r["val_acc"], "test_acc": r["test_acc"]})
    frame = pd.DataFrame.from_records(records)
    st.plotly_chart(depth_chart(frame, metric, colors), key="chart:ar-vs-bert", config=PLOTLY_CONFIG)
    st.caption("Solid: autoregressive runs; dashed: BERT runs. The paper finds AR features probe better "
               "than BERT's, with the best layers in the middle of the network.")
    table_with_download(frame, f"ar-vs-bert_{dataset}.csv", "ar-vs-bert")


def probe_vs_finetuning(view: View, finetuned: list[str]) -> None:
    """Chart 3b: for each base run, its best linear probe beside its fine-tuned classifiers."""
    runs, good, dataset = view.runs, view.good, view.dataset
    records = []
    for base in [n for n in good if any(runs[c]["base_run"] == n for c in finetuned)]:
        table = runs[base]["probes"].get(dataset)
        best = table.best() if table else None
        if best:
            records.append({"base_run": base, "method": "best linear probe", "run": base,
                            "dataset": dataset, "step": best["step"], "layer": best["layer"],
                            "val_acc": best["val_acc"], "test_acc": best["test_acc"]})
        for clf in sorted(c for c in finetuned if runs[c]["base_run"] == base):
            r = runs[clf]
            records.append({"base_run": base, "method": f"fine-tuned ({clf})", "run": clf,
                            "dataset": r.get("dataset"), "step": r.get("base_step"), "layer": None,
                            "val_acc": r.get("val_acc"), "test_acc": r.get("test_acc")})
    frame = pd.DataFrame.from_records(records)
    for col in ("val_acc", "test_acc"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    st.plotly_chart(finetune_chart(frame), key="chart:finetune", config=PLOTLY_CONFIG)
    st.caption("Fine-tuning trains the whole network with a linear head on mean-pooled ln_f features "
               "(L_CLF + L_GEN); the probe only fits a logistic regression on frozen features. `step` is "
               "the pre-training checkpoint each started from.")
    table_with_download(frame, "probe-vs-finetune.csv", "finetune")


def training_curves(view: View) -> None:
    """Chart 4: training and validation loss of the chosen runs."""
    runs, good, colors = view.runs, view.good, view.colors
    st.header("4 · Training curves")
    frames = [metrics_frame(n, runs[n]["metrics"]) for n in good if runs[n]["metrics"]]
    if frames:
        frame = pd.concat(frames, ignore_index=True)
        st.plotly_chart(training_chart(frame, colors), key="chart:training", config=PLOTLY_CONFIG)
        st.caption("Thin lines: training loss per step (noisy: one batch each); dashed with markers: loss on the "
                   "held-out validation split. Bits per token = nats / ln 2 per palette token, i.e. per whole "
                   "RGB pixel (in the table; a third of it per sub-pixel); the palette is lossy, so neither is "
                   "comparable with bits/dim on raw 8-bit pixels.")
        table_with_download(frame, "training-curves.csv", "training")
    else:
        st.info("No training metrics for the chosen runs (metrics.jsonl is written by `igpt train`).")


def main() -> None:
    st.set_page_config(page_title="iGPT probe dashboard", page_icon=":material/insights:", layout="wide")
    runs_dir = runs_dir_from_args(sys.argv[1:])
    st.title("Image GPT probe dashboard")
    st.caption("How linearly separable are the classes in each layer's features, at each checkpoint? "
               "(Chen et al. 2020, *Generative Pretraining from Pixels*, Figures 2–3) · "
               f"runs from `{runs_dir.resolve()}`")

    runs = load_runs(runs_dir, list(st.session_state.get("runs", [])))
    if not runs:
        st.warning(f"No runs under `{runs_dir.resolve()}` yet.")
        st.info("Train a run, probe it, then reload this page:")
        st.code(f"{TRAIN_COMMAND}\n{PROBE_COMMAND}", language="bash")
        st.caption("The dashboard reads runs from `$IGPT_RUNS_DIR` (set by `igpt dashboard --runs-dir DIR`) or "
                   "`streamlit run apps/dashboard.py -- --runs-dir DIR`.")
        return

    view = choose(runs)
    compute_probes(runs_dir, runs, view.chosen, view.dataset)
    if not view.chosen:
        st.info("Choose one or more runs in the sidebar.")
        return
    unprobed = [n for n in view.good if n not in view.probed]
    if not view.probed:
        st.subheader("No probe results for the chosen runs yet")
        how_to_make_probes(unprobed)
    elif unprobed:
        st.caption("No probe results on this dataset for: " + ", ".join(unprobed)
                   + f" — `igpt probe RUN{'' if view.dataset is None else ' --dataset ' + view.dataset}` makes them.")

    accuracy_by_layer(view)
    loss_vs_accuracy(view)
    ar_vs_bert_and_finetuning(view)
    training_curves(view)
    where_the_heads_look(runs_dir, view.good)
    inside_the_representations(view, runs_dir)
    paper_section(runs_dir, view.good)


if __name__ == "__main__":
    main()
