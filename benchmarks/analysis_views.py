"""How fast are the dashboard's "Inside the representations" views? Prints JSON.

1. CKA maps at a paper-like size (random features, e.g. iGPT-S: 25 layers of width 512 on 1,000 images):
   `igpt_core.analysis.cka_matrix`, which summarises each layer once (U-centred Gram matrices), against
   what a user would otherwise write: linear CKA pair by pair (Kornblith et al. 2019's recipe), on the
   same features, with the largest difference between the two maps.
2. With --run: the library calls each view makes on a probed run's cached features (the default run:
   `igpt train --dataset digits --preset tiny --colors 16 --steps 300`, then `igpt probe digits-tiny-ar`),
   and the dashboard page rendered by Streamlit's AppTest: first (nothing cached) and again (cached).

    python benchmarks/analysis_views.py [--layers 25 --width 512 --images 1000] [--run NAME --runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from igpt_core import analysis  # noqa: E402
from igpt_core.probe import load_probe_results  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "dashboard.py"


def seconds(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return round(time.perf_counter() - start, 4), result


def cka_maps(layers: int, width: int, images: int) -> dict:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(images, width))
    features = {layer: base + layer * rng.normal(size=(images, width)) for layer in range(layers)}
    ours_s, ours = seconds(analysis.cka_matrix, features)

    def pairwise():
        return np.array([[analysis.linear_cka(features[a], features[b]) for b in range(layers)] for a in range(layers)])

    pairwise_s, theirs = seconds(pairwise)
    return {"layers": layers, "width": width, "images": images, "ours_s": ours_s, "pairwise_s": pairwise_s,
            "speedup": round(pairwise_s / ours_s, 1), "max_abs_diff": float(np.abs(ours - theirs).max())}


def views(run: str, runs_dir: str) -> dict:
    table = load_probe_results(run, runs_dir=runs_dir)
    best = table.best()
    step, layer = best["step"], best["layer"]
    read_s, found = seconds(analysis.probed_features, run, step, max_images=analysis.CKA_IMAGES, runs_dir=runs_dir)
    layers_s, _ = seconds(analysis.cka_matrix, found.features)
    training_s, over = seconds(analysis.run_cka_over_training, run, runs_dir=runs_dir)
    projection_s, frames = seconds(lambda: analysis.pca_over_training(
        analysis.layer_over_training(run, layer, max_images=1000, runs_dir=runs_dir).by_step))
    confusion_s, _ = seconds(lambda: analysis.per_class_accuracy(table.confusion(step, layer)))
    return {"run": run, "checkpoints": len(table.steps), "layers": len(found.features), "images": len(found.labels),
            "read_one_checkpoint_s": read_s, "cka_between_layers_s": layers_s, "cka_over_training_s": training_s,
            "projection_over_training_s": projection_s, "confusion_s": confusion_s}


def page(runs_dir: str) -> dict:
    """The whole page and section 6 alone, rendered by AppTest: with Streamlit's caches empty, again
    (cached), and after choosing another layer (its projection is computed; the CKA maps are cached)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["IGPT_RUNS_DIR"] = str(Path(runs_dir).resolve())
    at = AppTest.from_file(str(APP), default_timeout=300)
    import_s, _ = seconds(at.run)  # the first run also imports torch, streamlit's runtime, plotly...
    section = sys.modules["dashboard_analysis"]  # the page imports it by path, at every run
    original, spent = section.inside_the_representations, []

    def timed(*args):
        spent.append(seconds(original, *args)[0])

    section.inside_the_representations = timed
    out = {"page_first_run_with_imports_s": import_s}
    st.cache_data.clear()
    out["page_uncached_s"], _ = seconds(at.run)
    out["section_uncached_s"] = spent[-1]
    out["page_cached_s"], _ = seconds(at.run)
    out["section_cached_s"] = spent[-1]
    layer = next(s for s in at.select_slider if (s.key or "").startswith("inside_layer:"))
    other = next(v for v in layer.options if str(v) != str(layer.value))
    out["page_other_layer_s"], _ = seconds(layer.set_value(int(other)).run)
    out["section_other_layer_s"] = spent[-1]
    out["exceptions"] = [e.value for e in at.exception]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=25)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--run", help="a probed run: time the views on its cached features, and the page")
    parser.add_argument("--runs-dir")
    args = parser.parse_args()
    report = {"threads": os.environ.get("OMP_NUM_THREADS"), "cka_maps": cka_maps(args.layers, args.width, args.images)}
    if args.run:
        report["views"] = views(args.run, args.runs_dir)
        report["page"] = page(args.runs_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
