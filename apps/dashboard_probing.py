"""The dashboard's two buttons that compute: "Compute missing probes" (`probe.probe_run`, for the
missing layers of one checkpoint) and the attention distances (`explain.run_distances`), each with
live progress on the page."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from igpt_core import IgptError, Run
from igpt_core.explain import run_distances
from igpt_core import probe_run

TRAIN_COMMAND = "igpt train --dataset digits --preset tiny --name digits"


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
    st.cache_data.clear()  # the page's cached run readings (read_run), so the new probes show
    st.rerun()


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
