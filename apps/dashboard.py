"""Probe dashboard: what do the layers of our Image GPT runs know? (Streamlit)

    streamlit run apps/dashboard.py                      # runs from $IGPT_RUNS_DIR or ./runs
    streamlit run apps/dashboard.py -- --runs-dir DIR    # or name the folder
    igpt dashboard                                       # the same, via the CLI

A thin shell over igpt_core: it reads what `igpt train`, `igpt probe` and `igpt finetune` stored in
the run folders (metrics.jsonl, probes/<dataset>.json, run.json) and charts it, the paper's way
(Chen et al. 2020, Figures 2-3): probe accuracy by layer per checkpoint, validation loss against
best-layer probe accuracy, AR against BERT, linear probe against fine-tuning, training curves,
and where the attention heads look (attention distance per layer and head, attention/distance.json).
Nothing is recomputed on page load; the only computations are the "Compute missing probes" button,
which calls `igpt_core.probe.probe_run`, and the attention-distance buttons, which call
`igpt_core.explain.run_distances`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.colors import sample_colorscale

from igpt_core.errors import IgptError
from igpt_core.explain import load_distances, run_distances
from igpt_core.probe import ProbeTable, load_probe_results, probe_run
from igpt_core.runs import Run, list_runs, runs_root

TRAIN_COMMAND = "igpt train --dataset digits --preset tiny --name digits"
PROBE_COMMAND = "igpt probe digits"
RAW_COLOR, RANDOM_COLOR = "#7f7f7f", "#d62728"
OBJECTIVE_DASH = {"ar": "solid", "bert": "dash"}
# Viridis without its last, pale-yellow tenth: every checkpoint's line stays visible on white.
STEP_SCALE = [[i / 10, sample_colorscale("Viridis", [0.9 * i / 10])[0]] for i in range(11)]
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
    """Names, sizes and mtimes of the files the page reads from a run folder."""
    files = [path / "run.json", path / "metrics.jsonl", *sorted((path / "probes").glob("*.json"))]
    out = []
    for f in files:
        try:
            s = f.stat()
            out.append((f.name, s.st_size, s.st_mtime_ns))
        except OSError:
            out.append((f.name, None, None))
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=256)
def read_run(path: str, stamp: tuple) -> dict:
    """Everything the page shows about one run, as plain data. Problems become `warnings` (the run is
    still shown as far as it can be read) or `error` (the run cannot be used at all)."""
    run = Run(Path(path))
    out = {"name": run.name, "error": None, "warnings": [], "probes": {}, "metrics": [],
           "has_probe_files": any((run.path / "probes").glob("*.json"))}
    if not (run.path / "run.json").is_file():
        out["error"] = f"run {run.name!r} no longer exists at {run.path} (deleted or moved?)"
        return out
    try:
        info, config = run.info, run.model_config
    except IgptError as err:  # an unreadable run.json: the library's message says which part and what to do
        out["error"] = str(err)
        return out
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


def load_runs(runs_dir: Path, extra_names: list[str]) -> dict[str, dict]:
    """{name: read_run(...)} for every run folder, plus names selected earlier whose folder is gone."""
    runs = {r.name: read_run(str(r.path), run_stamp(r.path)) for r in list_runs(runs_dir)}
    for name in extra_names:
        if name not in runs:
            path = runs_dir / name
            runs[name] = read_run(str(path), run_stamp(path))
    return runs


# -- tables (the numbers behind each chart) ------------------------------------------------------------


def probe_frame(name: str, table: ProbeTable, steps: list[int]) -> pd.DataFrame:
    """Chart 1's table: one row per (checkpoint, layer), then the raw-pixel and random-init references."""
    records = []
    for step in steps:
        rows = sorted((r for r in table.rows if r["step"] == step), key=lambda r: r["layer"])
        if not rows:
            continue
        best = table.best(step)["layer"]
        for r in rows:
            records.append({"run": name, "series": "checkpoint", "step": step, "layer": r["layer"],
                            "val_loss": r.get("val_loss"), "val_acc": r["val_acc"], "test_acc": r["test_acc"],
                            "C": r.get("C"), "best_layer": r["layer"] == best})
    refs = table.references
    raw = refs.get("raw_pixels")
    if raw:
        records.append({"run": name, "series": "raw pixels", "val_acc": raw["val_acc"], "test_acc": raw["test_acc"],
                        "C": raw.get("C")})
    for r in sorted(refs.get("random_init") or [], key=lambda r: r["layer"]):
        records.append({"run": name, "series": "random init", "layer": r["layer"], "val_acc": r["val_acc"],
                        "test_acc": r["test_acc"], "C": r.get("C")})
    columns = ["run", "series", "step", "layer", "val_loss", "val_acc", "test_acc", "C", "best_layer"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for col in ("step", "layer"):
        frame[col] = frame[col].astype("Int64")
    return frame


def best_by_checkpoint(name: str, run: dict, table: ProbeTable) -> pd.DataFrame:
    """Chart 2's table: per checkpoint, its validation loss and its best layer's accuracies."""
    records = []
    for best in table.best_by_step():
        step = best["step"]
        records.append({"run": name, "objective": run["objective"], "step": step, "val_loss": best.get("val_loss"),
                        "best_layer": best["layer"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]})
    return pd.DataFrame.from_records(
        records, columns=["run", "objective", "step", "val_loss", "best_layer", "val_acc", "test_acc"])


def metrics_frame(name: str, metrics: list[dict]) -> pd.DataFrame:
    columns = ["run", "step", "loss", "lr", "val_loss", "val_bpd"]
    return pd.DataFrame.from_records([{"run": name, **{k: m.get(k) for k in columns[1:]}} for m in metrics],
                                     columns=columns)


# -- charts ---------------------------------------------------------------------------------------------


def step_colors(all_steps: list[int]) -> tuple[dict[int, str], float, float]:
    """A colour per training step, on a log scale over all of the run's probed checkpoints."""
    logs = {s: math.log10(max(s, 1)) for s in all_steps}
    lo, hi = min(logs.values()), max(logs.values())
    span = (hi - lo) or 1.0
    return {s: sample_colorscale(STEP_SCALE, [(v - lo) / span])[0] for s, v in logs.items()}, lo, hi


def layer_chart(name: str, run: dict, table: ProbeTable, frame: pd.DataFrame, metric: str, dataset: str) -> go.Figure:
    n_layer = table.n_layer
    label = "test accuracy" if metric == "test_acc" else "validation accuracy"
    all_steps = table.steps
    colors, lo, hi = step_colors(all_steps)
    fig = go.Figure()
    points = frame[frame.series == "checkpoint"]
    for step, rows in points.groupby("step", sort=True):
        fig.add_trace(go.Scatter(
            x=rows.layer.astype(int).to_numpy(), y=rows[metric].to_numpy(float), mode="lines+markers",
            name=f"step {step}", legendgroup=f"step {step}", line=dict(color=colors[step], width=2),
            marker=dict(size=6), hovertemplate=f"step {step}<br>layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"))
    best = points[points.best_layer.astype(bool)]
    if len(best):
        fig.add_trace(go.Scatter(
            x=best.layer.astype(int).to_numpy(), y=best[metric].to_numpy(float), mode="markers",
            name="best layer (by val acc)", customdata=best.step.astype(int).to_numpy(),
            marker=dict(symbol="star", size=16, color=[colors[s] for s in best.step],
                        line=dict(color="black", width=1)),
            hovertemplate=f"best layer of step %{{customdata}}: layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"))
    raw = frame[frame.series == "raw pixels"]
    if len(raw):
        value = float(raw[metric].iloc[0])
        fig.add_trace(go.Scatter(x=[0, n_layer], y=[value, value], mode="lines", name="raw pixels",
                                 line=dict(color=RAW_COLOR, dash="dash", width=2),
                                 hovertemplate=f"raw pixels: {label} %{{y:.3f}}<extra></extra>"))
    rand = frame[frame.series == "random init"]
    if len(rand):
        fig.add_trace(go.Scatter(x=rand.layer.astype(int).to_numpy(), y=rand[metric].to_numpy(float),
                                 mode="lines+markers", name="random init", marker=dict(size=5),
                                 line=dict(color=RANDOM_COLOR, dash="dot", width=2),
                                 hovertemplate=f"random init<br>layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"))
    if len(all_steps) > 1:  # a colour bar reading colour as training step
        ticks = all_steps if len(all_steps) <= 8 else all_steps[:: math.ceil(len(all_steps) / 8)]
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
            marker=dict(colorscale=STEP_SCALE, cmin=lo, cmax=hi, color=[lo], showscale=True,
                        colorbar=dict(title=dict(text="training step"), x=1.02, xanchor="left", len=0.8,
                                      tickvals=[math.log10(max(s, 1)) for s in ticks],
                                      ticktext=[str(s) for s in ticks]))))
    fig.update_layout(
        title=dict(text=f"Linear-probe {label} by layer — {name} ({run['objective'].upper()}, {n_layer} layers, "
                        f"probed on {dataset})"),
        xaxis=dict(title=dict(text=f"layer (0 = embeddings, {n_layer} = final norm ln_f)"), dtick=1,
                   range=[-0.3, n_layer + 0.3]),
        yaxis=dict(title=dict(text=label), range=[0, 1.04], dtick=0.1, tickformat=".0%"),
        legend=dict(orientation="h", yanchor="top", y=-0.22, x=0), margin=dict(t=60, b=10), height=460,
        hovermode="closest",
    )
    return fig


def loss_vs_accuracy_chart(frame: pd.DataFrame, metric: str, rhos: dict[str, float | None], colors: dict) -> go.Figure:
    label = "test accuracy" if metric == "test_acc" else "validation accuracy"
    fig = go.Figure()
    for name, rows in frame.groupby("run", sort=False):
        rows = rows.sort_values("step")
        fig.add_trace(go.Scatter(
            x=rows.val_loss.to_numpy(float), y=rows[metric].to_numpy(float), mode="lines+markers+text", name=name,
            text=[f"{s}" for s in rows.step], textposition="top center",
            customdata=rows[["step", "best_layer"]].to_numpy(),
            line=dict(width=1, color=colors[name], dash=OBJECTIVE_DASH.get(rows.objective.iloc[0], "solid")),
            marker=dict(size=10, color=colors[name]),
            hovertemplate=(f"{name}<br>step %{{customdata[0]}} (best layer %{{customdata[1]}})<br>"
                           f"val loss %{{x:.4f}} nats/token<br>{label} %{{y:.3f}}<extra></extra>")))
    shown = [f"{'n/a' if r is None else f'{r:+.2f}'} ({name})" for name, r in rhos.items()]
    rho_text = ", ".join(shown) if len(shown) <= 3 else "per run in the caption"
    fig.update_layout(
        title=dict(text=f"Validation loss vs best-layer probe {label} — Spearman ρ = {rho_text}"),
        xaxis=dict(title=dict(text="val loss (nats/token)")),
        yaxis=dict(title=dict(text=f"best-layer {label}"), tickformat=".0%"),
        legend=dict(title=dict(text="run"), orientation="h", yanchor="top", y=-0.2, x=0),
        margin=dict(t=60, b=10), height=440,
    )
    return fig


def depth_chart(frame: pd.DataFrame, metric: str, colors: dict) -> go.Figure:
    label = "test accuracy" if metric == "test_acc" else "validation accuracy"
    fig = go.Figure()
    for name, rows in frame.groupby("run", sort=False):
        objective = rows.objective.iloc[0]
        fig.add_trace(go.Scatter(
            x=rows.relative_depth.to_numpy(float), y=rows[metric].to_numpy(float), mode="lines+markers",
            name=f"{name} ({objective.upper()}, step {rows.step.iloc[0]})",
            line=dict(dash=OBJECTIVE_DASH.get(objective, "dot"), width=2, color=colors[name]),
            customdata=rows.layer.to_numpy(int),
            hovertemplate=f"{name}<br>layer %{{customdata}} (depth %{{x:.2f}})<br>{label} %{{y:.3f}}<extra></extra>"))
    fig.update_layout(
        title=dict(text=f"AR vs BERT: probe {label} by relative depth (each run's best checkpoint)"),
        xaxis=dict(title=dict(text="relative depth (layer / number of layers; 0 = embeddings, 1 = ln_f)"),
                   range=[-0.03, 1.03]),
        yaxis=dict(title=dict(text=label), range=[0, 1.04], dtick=0.1, tickformat=".0%"),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin=dict(t=60, b=10), height=420,
    )
    return fig


def finetune_chart(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    labels = [f"{r.base_run}: {r.method}" for r in frame.itertuples()]
    for col, name, color in (("test_acc", "test accuracy", "#1f77b4"), ("val_acc", "validation accuracy", "#aec7e8")):
        values = frame[col].astype(float)
        fig.add_trace(go.Bar(x=labels, y=values.to_numpy(), name=name, marker_color=color,
                             text=[f"{v:.1%}" if v == v else "" for v in values], textposition="outside"))
    fig.update_layout(
        title=dict(text="Linear probe (best layer and checkpoint) vs fine-tuning"), barmode="group",
        xaxis=dict(title=dict(text="run: method")), yaxis=dict(title=dict(text="accuracy"), tickformat=".0%",
                                                               range=[0, 1.1]),
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0), margin=dict(t=60, b=10), height=420,
    )
    return fig


def training_chart(frame: pd.DataFrame, colors: dict) -> go.Figure:
    fig = go.Figure()
    for name, rows in frame.groupby("run", sort=False):
        color = colors[name]
        train = rows[rows.loss.notna()]
        if len(train):
            fig.add_trace(go.Scatter(x=train.step.to_numpy(int), y=train.loss.to_numpy(float), mode="lines",
                                     name=f"{name}: train loss", line=dict(color=color, width=1), opacity=0.55,
                                     hovertemplate="step %{x}<br>train loss %{y:.4f}<extra>" + name + "</extra>"))
        val = rows[rows.val_loss.notna()]
        if len(val):
            fig.add_trace(go.Scatter(x=val.step.to_numpy(int), y=val.val_loss.to_numpy(float), mode="lines+markers",
                                     name=f"{name}: val loss", line=dict(color=color, width=2.5, dash="dash"),
                                     marker=dict(size=7),
                                     hovertemplate="step %{x}<br>val loss %{y:.4f}<extra>" + name + "</extra>"))
    fig.update_layout(
        title=dict(text="Training curves: train and validation loss"),
        xaxis=dict(title=dict(text="training step (optimizer updates)")),
        yaxis=dict(title=dict(text="loss (nats/token)")),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin=dict(t=60, b=10), height=420,
    )
    return fig


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


def probe_from_the_page(runs_dir: Path, name: str, dataset: str, step: int, layers: list[int],
                        options: dict) -> str | None:
    """Run `probe_run` for the missing layers of one checkpoint, with live progress in the sidebar;
    the success message, or None after showing the error."""
    with st.sidebar.status(f"Probing {name} at step {step} on {dataset}…", expanded=True) as status:
        st.write(f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}: features, then one "
                 "logistic regression per layer (and the raw-pixel / random-init references if missing)")
        t0 = time.perf_counter()
        bar = st.progress(0.0, text="extracting features (one forward pass for all layers)…")

        def show(done, total):
            bar.progress(done / total, text=f"{done}/{total} layers fitted")

        try:
            result = probe_run(name, dataset, checkpoints=[step], layers=layers, runs_dir=runs_dir,
                               progress=False, on_progress=show, **options)
        except IgptError as err:
            status.update(label=f"Probing {name} failed", state="error")
            st.error(str(err))
            return None
        except Exception as err:  # noqa: BLE001 — keep the page alive; show what went wrong
            status.update(label=f"Probing {name} failed", state="error")
            st.error(f"probing failed unexpectedly: {type(err).__name__}: {err}")
            return None
        status.update(label=f"Probed {name} at step {step}", state="complete")
    best = result.best(step)
    text = f"Probed {name} at step {step} in {time.perf_counter() - t0:.0f} s"
    if best:
        text += f": best layer {best['layer']}, test accuracy {best['test_acc']:.1%}"
    if result.note:
        text += f" ({result.note})"
    return text


def compute_probes(runs_dir: Path, runs: dict[str, dict], chosen: list[str], dataset: str | None) -> None:
    """Sidebar form: probe the missing layers of one checkpoint with `probe_run`, then refresh the page."""
    st.sidebar.header("Compute missing probes")
    message = st.session_state.pop("probe_message", None)
    if message:
        getattr(st.sidebar, message[0])(message[1])
    names = [n for n in [*chosen, *sorted(runs)] if not runs[n]["error"]]
    names = list(dict.fromkeys(names))  # the chosen runs first, no repeats
    if not names:
        st.sidebar.caption(f"No runs to probe: train one first with `{TRAIN_COMMAND}`.")
        return
    name = st.sidebar.selectbox("run to probe", names, key="probe_run")
    run = runs[name]
    try:
        steps = Run(runs_dir / name).checkpoints()
    except OSError:
        steps = []
    if not steps:
        st.sidebar.caption(f"Run {name!r} has no checkpoints to probe (train it with `igpt train --name {name}`).")
        return
    probe_dataset = dataset if dataset in run["probes"] else run.get("dataset")
    table = run["probes"].get(probe_dataset)
    n_layer = run["n_layer"]
    done = {}
    for r in table.rows if table else []:
        done.setdefault(r["step"], set()).add(r["layer"])

    def describe(step):
        have = len(done.get(step, ()))
        return f"step {step} — " + ("all layers probed" if have == n_layer + 1 else
                                    "not probed" if not have else f"{have}/{n_layer + 1} layers probed")

    unprobed = [s for s in steps if len(done.get(s, ())) < n_layer + 1]
    step = st.sidebar.selectbox("checkpoint", steps, index=steps.index(unprobed[-1] if unprobed else steps[-1]),
                                format_func=describe, key=f"probe_step:{name}")
    missing = [layer for layer in range(n_layer + 1) if layer not in done.get(step, set())]
    st.sidebar.caption(f"dataset: {probe_dataset}; layers to probe: "
                       + (", ".join(map(str, missing)) if missing else "none"))
    # Keep the stored table's settings, so probe_run adds rows to it instead of replacing it.
    settings = table.settings if table else {}
    options = {k: settings[k] for k in ("bert_masks", "seed") if k in settings}
    if settings.get("Cs"):
        options["Cs"] = tuple(settings["Cs"])
    max_train = st.sidebar.number_input(
        "training images for the probe (0 = all)", min_value=0, step=100, value=int(settings.get("max_train") or 0),
        key=f"probe_max_train:{name}:{probe_dataset}",
        help="Fewer is faster. Probes made with a different number are not mixed: changing it for a dataset "
             "that is already probed replaces the stored table.")
    if not st.sidebar.button("Compute probes", key="probe_go", disabled=not missing, type="primary"):
        return
    options["max_train"] = int(max_train) or None
    text = probe_from_the_page(runs_dir, name, probe_dataset, step, missing, options)
    if text is None:
        return
    st.session_state["probe_message"] = ("success", text)
    read_run.clear()
    st.rerun()


# -- where the heads look: attention distance per layer and head -------------------------------------------


def distance_frame(name: str, table: dict) -> pd.DataFrame:
    """The stored attention distances of one run: one row per checkpoint, layer and head."""
    columns = ["run", "step", "layer", "head", "distance"]
    return pd.DataFrame.from_records([{"run": name, **{k: r[k] for k in columns[1:]}} for r in table["rows"]],
                                     columns=columns)


def distance_chart(name: str, table: dict, frame: pd.DataFrame) -> go.Figure:
    """Mean attention distance by layer, one line per checkpoint (mean over heads), each head a dot."""
    colors, lo, hi = step_colors(sorted(frame.step.unique().tolist()) or [1])
    fig = go.Figure()
    for step, rows in frame.groupby("step", sort=True):
        mean = rows.groupby("layer").distance.mean()
        fig.add_trace(go.Scatter(x=mean.index.to_numpy(), y=mean.to_numpy(), mode="lines+markers", name=f"step {step}",
                                 legendgroup=f"step {step}", line=dict(color=colors[step], width=2),
                                 hovertemplate=f"step {step}<br>layer %{{x}}: mean over heads %{{y:.2f}} px<extra></extra>"))
        fig.add_trace(go.Scatter(x=rows.layer.to_numpy(), y=rows.distance.to_numpy(), mode="markers", showlegend=False,
                                 legendgroup=f"step {step}", marker=dict(color=colors[step], size=5, opacity=0.6),
                                 customdata=rows["head"].to_numpy(),
                                 hovertemplate=f"step {step}<br>layer %{{x}}, head %{{customdata}}: %{{y:.2f}} px"
                                               "<extra></extra>"))
    n_layer = int(table["n_layer"])
    fig.add_trace(go.Scatter(x=[1, n_layer], y=[table["uniform"]] * 2, mode="lines", name="uniform attention",
                             line=dict(color=RAW_COLOR, dash="dash", width=2),
                             hovertemplate="equal weight on every visible pixel: %{y:.2f} px<extra></extra>"))
    fig.update_layout(
        title=dict(text=f"Attention distance by layer — {name} ({str(table['objective']).upper()}, {n_layer} layers, "
                        f"{table['images']} {table['dataset']} validation images)"),
        xaxis=dict(title=dict(text="layer"), dtick=1, range=[0.7, n_layer + 0.3]),
        yaxis=dict(title=dict(text="mean distance to the attended pixels (pixels)"), rangemode="tozero"),
        legend=dict(orientation="h", yanchor="top", y=-0.22, x=0), margin=dict(t=60, b=10), height=420)
    return fig


def compute_distances(runs_dir: Path, name: str, missing: list[int]) -> None:
    """The button's work: `explain.run_distances` for the missing checkpoints, with a progress bar."""
    with st.status(f"Attention distances of {name}…", expanded=True) as status:
        bar = st.progress(0.0, text=f"{len(missing)} checkpoint(s) to measure")
        try:
            run_distances(name, missing, runs_dir=runs_dir,
                          on_progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total} checkpoints"))
        except IgptError as err:
            status.update(label=f"Measuring {name} failed", state="error")
            st.error(str(err))
            return
        status.update(label=f"Measured {name}", state="complete")
    st.rerun()


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
                   "held-out validation split. Bits per dimension = nats / ln 2 per palette token (in the "
                   "table); the palette is lossy, so these are not comparable with bits/dim on raw 8-bit pixels.")
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


if __name__ == "__main__":
    main()
