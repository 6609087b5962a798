"""The dashboard's section 6, "Inside the representations": what the probes and their cached features
show beyond one accuracy per layer.

- probe accuracy as a layer × checkpoint heat map, the best probe marked;
- the test confusion matrix of one (layer, checkpoint) probe, with each class's accuracy;
- linear CKA between layers at one checkpoint, and of each layer with itself at the last checkpoint;
- a PCA projection of one layer's features coloured by class, played over the checkpoints.

Nothing runs the model: the numbers come from the stored probe results and the features `igpt probe`
cached (`igpt_core.analysis`). The CKA maps and projections are cached by Streamlit, keyed by the
stamps of the run's probe files, so a new `igpt probe` shows up and an unchanged run costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from igpt_core import Run, analysis

PLOTLY_CONFIG = {"displaylogo": False}
PROJECTION_IMAGES = 1000  # points per frame: more makes the animation sluggish in the browser
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"]


def step_label(step: int) -> str:
    """131000 -> "131,000": imported OpenAI checkpoints have six-digit steps."""
    return f"{step:,}"


# -- tables and charts (no Streamlit) -------------------------------------------------------------------------


def accuracy_frame(table) -> pd.DataFrame:
    """Every probed (checkpoint, layer) with its accuracies; `best` marks the best probe (by val acc)."""
    best = table.best()
    return pd.DataFrame.from_records(
        [{"step": r["step"], "layer": r["layer"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
          "best": r is best} for r in table.rows], columns=["step", "layer", "val_acc", "test_acc", "best"])


def layer_axis_title(n_layer: int) -> str:
    return f"layer (0 = embeddings, {n_layer} = final norm ln_f)"


def accuracy_heatmap(name: str, table, frame: pd.DataFrame, metric: str) -> go.Figure:
    """Layer (rows) × checkpoint (columns) probe accuracy; ★ = the best probe, chosen on val accuracy."""
    label = "test accuracy" if metric == "test_acc" else "validation accuracy"
    grid = frame.pivot(index="layer", columns="step", values=metric).sort_index().sort_index(axis=1)
    x = [step_label(s) for s in grid.columns]
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(float), x=x, y=grid.index.to_numpy(), colorscale="Viridis", zmin=0, zmax=1,
        colorbar=dict(title=dict(text=label), tickformat=".0%"), name=label,
        texttemplate="%{z:.0%}" if grid.size <= 400 else None,
        hovertemplate=f"step %{{x}}<br>layer %{{y}}<br>{label} %{{z:.3f}}<extra></extra>"))
    best = frame[frame.best]
    if len(best):
        fig.add_trace(go.Scatter(
            x=[step_label(int(best.step.iloc[0]))], y=[int(best.layer.iloc[0])], mode="markers",
            name="best probe (by val acc)", marker=dict(symbol="star", size=22, color="white",
                                                        line=dict(color="black", width=1.5)),
            hovertemplate=f"best probe: step %{{x}}, layer %{{y}}<br>{label} {best[metric].iloc[0]:.3f}"
                          "<extra></extra>"))
    fig.update_layout(
        title=dict(text=f"Probe {label} by layer and checkpoint — {name}"),
        xaxis=dict(title=dict(text="checkpoint (training step)"), type="category"),
        yaxis=dict(title=dict(text=layer_axis_title(table.n_layer)), dtick=1),
        legend=dict(orientation="h", yanchor="top", y=-0.22, x=0), margin=dict(t=60, b=10),
        height=max(320, 60 + 28 * grid.shape[0]))
    return fig


def confusion_frame(counts: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Rows = true class, one column of counts per predicted class, then the class's accuracy."""
    frame = pd.DataFrame(counts, columns=[f"predicted {c}" for c in classes])
    frame.insert(0, "true class", classes)
    frame["per_class_accuracy"] = analysis.per_class_accuracy(counts)
    return frame


def confusion_chart(title: str, counts: np.ndarray, classes: list[str]) -> go.Figure:
    accuracy = analysis.per_class_accuracy(counts)
    fig = go.Figure(go.Heatmap(
        z=counts, x=classes, y=classes, colorscale="Blues", name="confusion",
        texttemplate="%{z}" if len(classes) <= 30 else None, colorbar=dict(title=dict(text="images")),
        hovertemplate="true %{y}, predicted %{x}: %{z} images<extra></extra>"))
    fig.update_layout(
        title=dict(text=title), height=max(360, 120 + 26 * len(classes)), margin=dict(t=60, b=10),
        xaxis=dict(title=dict(text="predicted class"), type="category"),
        yaxis=dict(title=dict(text="true class (its accuracy)"), type="category", autorange="reversed",
                   tickmode="array", tickvals=classes,
                   ticktext=[f"{c} ({'–' if a != a else f'{a:.0%}'})" for c, a in zip(classes, accuracy)]))
    return fig


def cka_layers_frame(step: int, layers: list[int], values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame.from_records([{"step": step, "layer_a": a, "layer_b": b, "cka": values[i, j]}
                                      for i, a in enumerate(layers) for j, b in enumerate(layers)])


def cka_training_frame(result: analysis.CkaOverTraining) -> pd.DataFrame:
    return pd.DataFrame.from_records([{"layer": layer, "step": step, "reference_step": result.reference,
                                       "cka": result.values[i, j]}
                                      for i, layer in enumerate(result.layers) for j, step in enumerate(result.steps)])


def cka_heatmap(title: str, z: np.ndarray, x: list, y: list, x_name: str, y_name: str,
                x_title: str | None = None) -> go.Figure:
    """A CKA map; `x_name`/`y_name` ("layer", "checkpoint") label the hover, `x_title` the axis (default x_name)."""
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=y, colorscale="Magma", zmin=0, zmax=1, name="CKA", colorbar=dict(title=dict(text="CKA")),
        texttemplate="%{z:.2f}" if z.size <= 400 else None,
        hovertemplate=f"{x_name} %{{x}}<br>{y_name} %{{y}}<br>CKA %{{z:.3f}}<extra></extra>"))
    fig.update_layout(title=dict(text=title), height=max(320, 90 + 30 * len(y)), margin=dict(t=60, b=10),
                      xaxis=dict(title=dict(text=x_title or x_name), type="category"),
                      yaxis=dict(title=dict(text=y_name), type="category"))
    return fig


def projection_frame(frames: dict[int, np.ndarray], labels: np.ndarray, classes: list[str],
                     images: np.ndarray) -> pd.DataFrame:
    """One row per (checkpoint, image): the image's index in the split, its class and its 2-D position."""
    return pd.DataFrame.from_records(
        [{"step": step, "image": int(i), "label": int(c), "class": classes[int(c)], "pc1": p[0], "pc2": p[1]}
         for step, coords in frames.items() for i, c, p in zip(images, labels, coords)])


def projection_traces(coords: np.ndarray, labels: np.ndarray, classes: list[str]) -> list[go.Scatter]:
    """One trace per class, so that the legend names the classes and colours stay the same in every frame."""
    return [go.Scatter(x=coords[labels == c, 0], y=coords[labels == c, 1], mode="markers", name=name,
                       marker=dict(size=6, opacity=0.75, color=CLASS_COLORS[c % len(CLASS_COLORS)]),
                       hovertemplate=f"{name}<extra></extra>")
            for c, name in enumerate(classes)]


def projection_chart(title: str, frames: dict[int, np.ndarray], labels: np.ndarray, classes: list[str]) -> go.Figure:
    """A plotly animation: one frame per checkpoint, a slider over them and a play button."""
    steps = sorted(frames)
    every = np.concatenate([frames[s] for s in steps])
    pad = 0.05 * (every.max(0) - every.min(0) + 1e-9)
    lo, hi = every.min(0) - pad, every.max(0) + pad  # fixed axes: the points move, not the frame
    slider_steps = [dict(method="animate", label=step_label(s), args=[[str(s)], dict(
        mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))]) for s in steps]
    play = dict(label="▶ Play", method="animate", args=[None, dict(
        frame=dict(duration=700, redraw=True), transition=dict(duration=300), fromcurrent=True, mode="immediate")])
    pause = dict(label="❚❚ Pause", method="animate", args=[[None], dict(
        frame=dict(duration=0, redraw=False), transition=dict(duration=0), mode="immediate")])
    fig = go.Figure(data=projection_traces(frames[steps[0]], labels, classes),
                    frames=[go.Frame(name=str(s), data=projection_traces(frames[s], labels, classes))
                            for s in steps])
    fig.update_layout(
        title=dict(text=title), height=560, margin=dict(t=60, b=10),
        xaxis=dict(title=dict(text="principal component 1"), range=[lo[0], hi[0]], zeroline=False),
        yaxis=dict(title=dict(text="principal component 2"), range=[lo[1], hi[1]], zeroline=False),
        legend=dict(title=dict(text="class")),
        updatemenus=[dict(type="buttons", direction="left", x=0, y=-0.12, xanchor="left", yanchor="top",
                          showactive=False, buttons=[play, pause])],
        sliders=[dict(active=0, steps=slider_steps, x=0.2, len=0.8, y=-0.08, yanchor="top",
                      currentvalue=dict(prefix="checkpoint: step ", font=dict(size=14)))])
    return fig


# -- cached computations (keyed by the run's probe files, so new results show up) -----------------------------


def file_stamps(files) -> tuple:
    """Names, sizes and mtimes of `files`: a cache key that changes when the CLI writes new results."""
    out = []
    for f in files:
        try:
            s = f.stat()
            out.append((f.name, s.st_size, s.st_mtime_ns))
        except OSError:  # missing, or deleted while we looked
            out.append((f.name, None, None))
    return tuple(out)


def probe_stamp(path: Path) -> tuple:
    """The stamps of what the analyses read: probe tables, cached features, checkpoints."""
    return file_stamps(sorted([*path.glob("probes/*.json"), *path.glob("probes/features/*.npz"),
                               *path.glob("checkpoints/*")]))


@st.cache_data(show_spinner=False, max_entries=64)
def cka_between_layers(path: str, dataset: str, step: int, stamp: tuple) -> tuple[list[int], np.ndarray] | None:
    """(layers, layer × layer CKA) at one checkpoint, or None if its features are not cached."""
    found = analysis.probed_features(Run(Path(path)), step, dataset, max_images=analysis.CKA_IMAGES)
    return None if found is None else (sorted(found.features), analysis.cka_matrix(found.features))


@st.cache_data(show_spinner=False, max_entries=16)
def cka_with_last(path: str, dataset: str, stamp: tuple) -> analysis.CkaOverTraining:
    return analysis.run_cka_over_training(Run(Path(path)), dataset)


@st.cache_data(show_spinner=False, max_entries=64)
def projection(name: str, path: str, dataset: str, layer: int, names: tuple | None, stamp: tuple) -> tuple:
    """(the animated PCA chart as a plain figure dict, its CSV table, the number of images, checkpoints
    without cached features); (None, None, 0, missing) if none has them. The figure is kept as a dict:
    building a plotly Figure validates every frame's every trace, which takes longer than the PCA."""
    found = analysis.layer_over_training(Run(Path(path)), layer, dataset, max_images=PROJECTION_IMAGES)
    if not found.by_step:
        return None, None, 0, found.missing
    frames = analysis.pca_over_training(found.by_step)
    classes = class_names(names, int(found.labels.max()) + 1)
    fig = projection_chart(f"PCA of layer {layer}'s features — {name}, coloured by class", frames, found.labels,
                           classes)
    table = projection_frame(frames, found.labels, classes, found.images)
    return fig.to_dict(), table, len(found.labels), found.missing


# -- the section ----------------------------------------------------------------------------------------------


def csv_button(frame: pd.DataFrame, file_name: str, key: str) -> None:
    st.download_button("Download CSV", frame.to_csv(index=False).encode(), file_name=file_name, mime="text/csv",
                       key=f"csv:{key}", on_click="ignore", icon=":material/download:")


def show(fig: go.Figure | dict, key: str) -> None:
    st.plotly_chart(fig, key=f"chart:{key}", config=PLOTLY_CONFIG)


def make_features(name: str, dataset: str, steps: list[int]) -> None:
    """Say which command caches the missing features (nothing here runs the model)."""
    st.info(f"No cached features for checkpoint{'s' if len(steps) > 1 else ''} "
            f"{', '.join(map(step_label, steps))} of {name}: probing caches them. Run:")
    st.code(f"igpt probe {name} --dataset {dataset} --checkpoints {','.join(map(str, steps))}", language="bash")


def class_names(names, n: int) -> list[str]:
    """The stored class names (a probe table's), or the labels as numbers if they are missing or too few."""
    return [str(c) for c in names] if names and len(names) >= n else [str(i) for i in range(n)]


def inside_the_representations(view, runs_dir: Path) -> None:
    """Section 6: the probe grid as a heat map, a probe's confusion, CKA maps and a projection over training."""
    if not view.probed:
        return
    st.header("6 · Inside the representations")
    st.caption("Beyond one accuracy per layer: where in the network and in training the classes separate, "
               "which classes a probe confuses, how similar the layers' features are (linear CKA), and how one "
               "layer's features move during training. From the stored probe results and the features "
               "`igpt probe` cached; nothing here runs the model.")
    name = st.selectbox("run", view.probed, key="inside_run") if len(view.probed) > 1 else view.probed[0]
    table, dataset = view.runs[name]["probes"][view.dataset], view.dataset
    frame = accuracy_frame(table)
    show(accuracy_heatmap(name, table, frame, view.metric), f"inside-acc:{name}")
    st.caption(f"Each cell is one probe ({view.metric_label}); ★ = the best probe of the run, chosen on "
               "validation accuracy as the paper does.")
    csv_button(frame, f"probe-grid_{name}_{dataset}.csv", f"inside-acc:{name}")

    best = table.best()
    steps, layers = table.steps, sorted({r["layer"] for r in table.rows})
    left, right = st.columns(2)
    step = left.select_slider("checkpoint", steps, value=best["step"], key=f"inside_step:{name}",
                              format_func=step_label, help="For the confusion matrix and the layer × layer CKA.")
    layer = right.select_slider("layer", layers, value=best["layer"], key=f"inside_layer:{name}",
                                help="For the confusion matrix and the projection.")
    stamp = probe_stamp(runs_dir / name)
    confusion_view(name, table, step, layer)
    cka_views(name, str(runs_dir / name), dataset, step, stamp)
    projection_view(name, table, str(runs_dir / name), dataset, layer, stamp)


def confusion_view(name: str, table, step: int, layer: int) -> None:
    st.subheader("Which classes does the probe confuse?")
    try:
        counts = table.confusion(step, layer)
    except KeyError:
        st.info(f"Layer {layer} was not probed at step {step:,}: `igpt probe {name} --checkpoints {step} "
                f"--layers {layer}` probes it.")
        return
    if counts is None:
        st.info(f"No confusion matrix is stored for layer {layer} at step {step:,} (probed before they were kept): "
                f"`igpt probe {name} --checkpoints {step}` stores one.")
        return
    classes = class_names(table.class_names, len(counts))[:len(counts)]
    accuracy = analysis.per_class_accuracy(counts)
    title = f"Test confusion matrix — {name}, layer {layer} at step {step_label(step)}"
    show(confusion_chart(title, counts, classes), f"inside-confusion:{name}")
    worst = int(np.nanargmin(accuracy)) if np.isfinite(accuracy).any() else None
    st.caption("Rows: the true class, with the probe's accuracy on it; columns: the class the probe predicted."
               + (f" Hardest class here: {classes[worst]} ({accuracy[worst]:.0%})." if worst is not None else ""))
    csv_button(confusion_frame(counts, classes), f"confusion_{name}_step{step}_layer{layer}.csv",
               f"inside-confusion:{name}")


def cka_views(name: str, path: str, dataset: str, step: int, stamp: tuple) -> None:
    st.subheader("How similar are the layers? (linear CKA)")
    st.caption("Linear CKA (Kornblith et al. 2019) compares two layers' features of the same test images: 1 when "
               "one is a rotation and rescaling of the other, near 0 when unrelated (unbiased estimator, at most "
               f"{analysis.CKA_IMAGES:,} images).")
    between = cka_between_layers(path, dataset, step, stamp)
    left, right = st.columns(2)
    with left:
        if between is None:
            make_features(name, dataset, [step])
        else:
            layers, values = between
            show(cka_heatmap(f"CKA between layers — {name} at step {step_label(step)}", values, layers, layers,
                             "layer", "layer"), f"inside-cka-layers:{name}")
            csv_button(cka_layers_frame(step, layers, values), f"cka-layers_{name}_step{step}.csv",
                       f"inside-cka-layers:{name}")
    result = cka_with_last(path, dataset, stamp)
    with right:
        if result.steps:
            x_title = f"checkpoint (each layer against itself at step {step_label(result.reference)})"
            show(cka_heatmap(f"CKA with the last checkpoint — {name}", result.values,
                             [step_label(s) for s in result.steps], result.layers, "step", "layer", x_title),
                 f"inside-cka-training:{name}")
            csv_button(cka_training_frame(result), f"cka-over-training_{name}.csv", f"inside-cka-training:{name}")
            st.caption("A layer that reaches 1 early settled early in training; one that stays low kept changing.")
        if result.missing:
            make_features(name, dataset, result.missing)


def projection_view(name: str, table, path: str, dataset: str, layer: int, stamp: tuple) -> None:
    st.subheader(f"Layer {layer}'s features over training (PCA)")
    names = tuple(table.class_names) if table.class_names else None
    fig, frame, images, missing = projection(name, path, dataset, layer, names, stamp)
    if fig is not None:
        show(fig, f"inside-projection:{name}")
        st.caption(f"The first two principal components of layer {layer}'s probe features on {images:,} test "
                   "images, one frame per checkpoint: press ▶ Play or drag the slider. PCA is linear, the question "
                   "a linear probe asks; each axis's sign is kept from frame to frame, so the points move instead "
                   "of flipping.")
        csv_button(frame, f"pca_{name}_layer{layer}.csv", f"inside-projection:{name}")
    if missing:
        st.caption(f"Left out, without cached features: checkpoint{'s' if len(missing) > 1 else ''} "
                   f"{', '.join(map(step_label, missing))} (`igpt probe {name} --dataset {dataset} --checkpoints "
                   f"{','.join(map(str, missing))}` caches them).")
