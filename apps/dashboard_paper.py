"""Dashboard section: the paper's probe figures as `igpt paper` wrote them (runs/<run>/paper/<dataset>.csv).

The same two charts as the command's PNG (Chen et al. 2020, Figure 3): accuracy by layer, one line per
checkpoint, for each run; and best-layer accuracy against validation loss, one line per run. Nothing
is computed here: the CSVs are read as they are.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from igpt_core import PAPER_FOLDER

PLOTLY_CONFIG = {"displaylogo": False}


def paper_frames(runs_dir: Path, names: list[str]) -> dict[str, pd.DataFrame]:
    """{dataset: the rows of every chosen run's CSV on it}; unreadable CSVs are left out."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for name in names:
        for path in sorted((runs_dir / name / PAPER_FOLDER).glob("*.csv")):
            try:
                frame = pd.read_csv(path)
            except (OSError, ValueError):
                continue
            if frame.empty or not {"dataset", "step", "layer", "test_acc", "val_loss", "best"} <= set(frame.columns):
                continue
            frames.setdefault(str(frame["dataset"].iloc[0]), []).append(frame)
    return {dataset: pd.concat(parts, ignore_index=True) for dataset, parts in frames.items()}


def by_layer_chart(frame: pd.DataFrame, name: str) -> go.Figure:
    """Figure 3, left: one run's test accuracy by layer, one line per checkpoint, ★ at its best layer."""
    fig = go.Figure()
    for step, rows in frame.groupby("step"):
        rows = rows.sort_values("layer")
        fig.add_scatter(x=rows["layer"], y=100 * rows["test_acc"], mode="lines+markers", name=f"step {step}")
        best = rows[rows["best"].astype(bool)]
        fig.add_scatter(x=best["layer"], y=100 * best["test_acc"], mode="markers", showlegend=False,
                        marker={"symbol": "star", "size": 14}, hovertext=f"step {step}: best layer (on val)")
    fig.update_layout(title=f"{name}: linear probe accuracy by layer", xaxis_title="layer (0 = embeddings)",
                      yaxis_title="test accuracy (%)", height=380)
    return fig


def loss_chart(frame: pd.DataFrame) -> go.Figure:
    """Figure 3, right: each checkpoint's best-layer accuracy against its validation loss, one line per run."""
    fig = go.Figure()
    best = frame[frame["best"].astype(bool) & frame["val_loss"].notna()]
    for name, rows in best.groupby("run"):
        rows = rows.sort_values("step")
        fig.add_scatter(x=rows["val_loss"], y=100 * rows["test_acc"], mode="lines+markers+text", name=str(name),
                        text=[str(s) for s in rows["step"]], textposition="top right")
    fig.update_layout(title="better generative models learn better features", height=380,
                      xaxis_title="validation loss (nats per token)", yaxis_title="best-layer test accuracy (%)")
    return fig


def paper_section(runs_dir: Path, names: list[str]) -> None:
    """Section 6: the charts of `igpt paper` for the chosen runs, one probe dataset at a time."""
    st.header("7 · The paper's Figure 3")
    frames = paper_frames(runs_dir, names)
    if not frames:
        st.caption("No figures from `igpt paper` for the chosen runs yet: `igpt paper RUN... --dataset DATASET` "
                   "draws them (PNG and CSV in runs/RUN/paper/) and they show here.")
        return
    datasets = sorted(frames)
    dataset = datasets[0] if len(datasets) == 1 else st.selectbox("dataset of `igpt paper`", datasets, key="paper")
    frame = frames[dataset]
    st.caption(f"From runs/RUN/paper/ ({dataset}): the best layer of each checkpoint is chosen on validation "
               "accuracy; losses of runs with different palettes or datasets are not on one scale.")
    for name, rows in frame.groupby("run"):
        st.plotly_chart(by_layer_chart(rows, str(name)), key=f"chart:paper-layers:{name}", config=PLOTLY_CONFIG)
    st.plotly_chart(loss_chart(frame), key="chart:paper-loss", config=PLOTLY_CONFIG)
