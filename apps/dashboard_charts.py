"""The dashboard's tables and charts: the numbers behind each chart as a pandas frame, and the chart as
a plotly figure. No Streamlit here: the page (dashboard.py) lays them out."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from igpt_core import ProbeTable

RAW_COLOR, RANDOM_COLOR = "#7f7f7f", "#d62728"
OBJECTIVE_DASH = {"ar": "solid", "bert": "dash"}
# Viridis without its last, pale-yellow tenth: every checkpoint's line stays visible on white.
STEP_SCALE = [[i / 10, sample_colorscale("Viridis", [0.9 * i / 10])[0]] for i in range(11)]


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
    """One row per logged step of a run's metrics.jsonl. Runs logged before the rename wrote
    bits/token under "val_bpd"; they are read into the same column so old runs still chart."""
    columns = ["run", "step", "loss", "lr", "val_loss", "val_bits_per_token"]
    records = [{"run": name, **{k: m.get(k) for k in columns[1:5]},
                "val_bits_per_token": m.get("val_bits_per_token", m.get("val_bpd"))} for m in metrics]
    return pd.DataFrame.from_records(records, columns=columns)


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
