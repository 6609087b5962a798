"""Quantising images to palette ids: igpt_core.palette.Palette.encode against Hugging Face's processor.

- ours: Palette(clusters).encode(images, 32) — a 2^24-entry table (32 MB, int16) of nearest-colour
        ids, filled on demand a cell of 4 × 4 × 4 colours at a time: each batch costs exact float64
        distances for the cells it meets first, every colour of such a cell to the few centres that
        can be nearest in it (coarser cells' candidate lists are kept per palette), then one lookup
        per pixel.
- hf:   transformers ImageGPTImageProcessorPil(clusters=..., size 32×32)(images)["input_ids"] —
        float32 distances from every pixel to every cluster, per call.

Images: natural-looking 32×32 crops from the bundled photos (igpt_core.data "photos", train split);
clusters: 512 uniformly random colours in [-1, 1] (seeded). Both sides see the same images in the same
batches, and the ids are compared (a mismatch is counted and checked against exact float64
distances: HF's float32 arithmetic can flip near-ties).

Reported separately, because they differ by orders of magnitude:
- cold:  a fresh Palette, first pass over the images (the table starts empty: the honest
         first-call cost, including allocating the table);
- warm:  the same images again (every colour already in the table: lookups only);
- unseen: other crops with the warm table (new images after the palette has seen a dataset).
Rounds interleave ours and HF's passes; ratios are per round, then the median.

    OMP_NUM_THREADS=1 python benchmarks/quantize.py [--quick] [--images 2000] [--batch 100] [--rounds 3]

Prints one JSON object. Target: ours >= 50× HF's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)


def batches(images: np.ndarray, size: int):
    return [images[i : i + size] for i in range(0, len(images), size)]


def run_ours(palette, images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    ids = np.concatenate([palette.encode(b, 32) for b in batches(images, batch)])
    return time.perf_counter() - t0, ids


def run_hf(processor, images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = [np.stack(processor(list(b), return_tensors=None)["input_ids"]) for b in batches(images, batch)]
    return time.perf_counter() - t0, np.concatenate(out)


def true_nearest(clusters: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Exact nearest cluster per uint8 pixel (N, 3), by float64 distances."""
    x = rgb.astype(np.float64) / 127.5 - 1.0
    d = ((x[:, None, :] - clusters.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1)


def compare(name: str, ours: np.ndarray, hf: np.ndarray, images: np.ndarray, clusters: np.ndarray) -> dict:
    differ = np.flatnonzero(ours.ravel() != hf.ravel())
    result = {"pixels": int(ours.size), "identical": bool(differ.size == 0), "mismatched_pixels": int(differ.size)}
    if differ.size:
        rgb = images.reshape(-1, 3)[differ]
        truth = true_nearest(clusters, rgb)
        result["ours_exact_at_mismatches"] = int((ours.ravel()[differ] == truth).sum())
        result["hf_exact_at_mismatches"] = int((hf.ravel()[differ] == truth).sum())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 images, 2 rounds")
    parser.add_argument("--images", type=int, help="images per pass (default 2000; quick 500)")
    parser.add_argument("--batch", type=int, default=100, help="images per call, both sides (default 100)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--colors", type=int, default=512)
    args = parser.parse_args()
    n = args.images or (500 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 3)

    from transformers import ImageGPTImageProcessorPil

    from igpt_core.data import load_dataset
    from igpt_core.palette import Palette

    crops = load_dataset("photos", "train").images  # 4096 crops, 32×32
    if 2 * n > len(crops):
        raise SystemExit(f"--images at most {len(crops) // 2} (the photos' train split has {len(crops)} crops)")
    images, unseen = crops[:n], crops[n : 2 * n]
    clusters = np.random.default_rng(0).uniform(-1, 1, size=(args.colors, 3)).astype(np.float32)
    processor = ImageGPTImageProcessorPil(clusters=clusters, size={"height": 32, "width": 32})

    timings = {key: [] for key in ("ours_cold", "ours_warm", "ours_unseen_warm_table", "hf", "hf_unseen")}
    checks = {}
    for r in range(rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        for side in order:
            if side == "ours":
                palette = Palette(clusters)  # fresh: empty table
                t, ids_cold = run_ours(palette, images, args.batch)
                timings["ours_cold"].append(t)
                t, ids_warm = run_ours(palette, images, args.batch)
                timings["ours_warm"].append(t)
                t, ids_unseen = run_ours(palette, unseen, args.batch)
                timings["ours_unseen_warm_table"].append(t)
                assert np.array_equal(ids_cold, ids_warm)
            else:
                t, hf_ids = run_hf(processor, images, args.batch)
                timings["hf"].append(t)
                if r == 0:  # HF on the unseen crops too, once: for the ids check and its own rate
                    t, hf_unseen = run_hf(processor, unseen, args.batch)
                    timings["hf_unseen"].append(t)
        if r == 0:
            checks["images"] = compare("images", ids_cold, hf_ids, images, clusters)
            checks["unseen"] = compare("unseen", ids_unseen, hf_unseen, unseen, clusters)

    def rate(key):
        return n / statistics.median(timings[key])

    hf_rate = rate("hf")
    per_round = {key: [round(h / o, 1) for o, h in zip(timings[key], timings["hf"])]
                 for key in ("ours_cold", "ours_warm", "ours_unseen_warm_table")}
    result = {
        "benchmark": "palette quantisation: Palette.encode vs transformers ImageGPTImageProcessorPil",
        "quick": args.quick,
        "machine": machine_facts(),
        "images_per_pass": n,
        "image_size": 32,
        "colors": args.colors,
        "batch": args.batch,
        "rounds": rounds,
        "ids_check": checks,
        "images_per_s": {"hf": hf_rate, "hf_unseen": rate("hf_unseen"), "ours_cold": rate("ours_cold"),
                         "ours_warm": rate("ours_warm"), "ours_unseen_warm_table": rate("ours_unseen_warm_table")},
        "speedup_vs_hf": {"cold": rate("ours_cold") / hf_rate, "warm": rate("ours_warm") / hf_rate,
                          "unseen_warm_table": rate("ours_unseen_warm_table") / hf_rate},
        "speedup_per_round": per_round,
        "seconds": {key: [round(t, 4) for t in value] for key, value in timings.items()},
        "target": ">= 50x HF images/s",
        "meets_target": {"cold": rate("ours_cold") >= 50 * hf_rate, "warm": rate("ours_warm") >= 50 * hf_rate},
        "note": "cold includes allocating the 32 MB table and exact distances for every distinct colour of the pass",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
