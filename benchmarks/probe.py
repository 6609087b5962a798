"""Probe-feature extraction: our one-pass `IGPT.features` against Hugging Face ImageGPTModel.

Both models hold identical weights (converted with igpt_core.pretrained.state_dict_to_hf). The task is the
probe's: the features of ALL layers (0..n_layer) of one checkpoint for a set of images, i.e. for
each layer l the mean over positions of block l's input norm (ln_f for l = n_layer).

- ours:   igpt_core.probe.extract_features — one forward pass per batch returns every layer.
- hf:     ImageGPTModel(..., output_hidden_states=True) — one pass; hidden_states[l] is the raw
          residual stream entering block l, so block l's ln_1 is applied, then the mean over
          positions (hidden_states[n_layer] already has ln_f applied).
- naive:  our model called once per layer (what a probe without a multi-layer API would do);
          timed on fewer images, reported per image.

Then the probe fit time (fit_probe: standardise + L-BFGS over the C grid) on the extracted
features, and a correctness check that ours and HF's features agree.

Then the probe grid at the default run's sizes (`igpt probe digits` after `igpt train`: 6
checkpoints × 5 layers, plus 5 random-init layers and raw pixels = 36 fits on 1294 / 144 / 359
digits, 128 features; here the "checkpoints" are randomly initialised models of that shape):

- ours:     igpt_core.probe.fit_probes — standardised features, the C grid with warm starts, each
            fit on one BLAS thread, one worker process per core (the same numbers as 1 process).
- sklearn:  one `LogisticRegression()` per layer with the library's defaults (C=1, max_iter=100, no
            scaling, the process's BLAS threads), as probe tutorials write it.

And paper-sized features (--paper-rows × --paper-width, e.g. 50 000 × 1536: CIFAR-10's training set
at iGPT-L's width): seconds per L-BFGS iteration of one C on 1 and on 2 BLAS threads, and the
time of the whole grid projected from the iterations the default-sized grid took. CPU only: no GPU
here to test a GPU fit on, and an L-BFGS in torch would not take scipy's steps, so its predictions
would not equal the CPU probe's.

And an iGPT-S row (random weights at iGPT-S's shapes: 24 layers × 512, 8 heads, 32×32, all 25
layers' features of --s-images images): ours in fp32, ours with precision "auto" (bf16 where the
hardware computes it natively: CUDA, CPUs with AVX512-BF16 or AMX), and HF's output_hidden_states
(fp32, as a user would call it) on identical inputs, with how close auto's features are to fp32's; the
median of --s-rounds rounds, all four methods in turn in each round (docs/performance.md quotes it with
OMP_NUM_THREADS=2).

    OMP_NUM_THREADS=1 python benchmarks/probe.py [--images 256] [--batch 16] [--naive-images 16] [--s-images 16]

Prints one JSON object. The main comparison, in fp32, defaults to n_layer=8, n_embd=256, 32×32.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

from igpt_core.model import IGPT, ModelConfig
from igpt_core.data import load_dataset
from igpt_core.pretrained import state_dict_to_hf
from igpt_core.probe import DEFAULT_CS, extract_features, fit_probe, fit_probes, warm_up_workers


def hf_model_from_ours(model: IGPT):
    from transformers import ImageGPTConfig, ImageGPTModel

    c = model.config
    config = ImageGPTConfig(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                            n_head=c.n_head, activation_function="quick_gelu", layer_norm_epsilon=c.layer_norm_epsilon,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = ImageGPTModel(config).eval()
    state = state_dict_to_hf(model.state_dict())
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]  # causal-mask buffers
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@torch.inference_mode()
def hf_features(hf, ids: torch.Tensor, sos: int, batch_size: int) -> np.ndarray:
    """All-layer probe features from HF's hidden states: (n_layer + 1, N, d)."""
    n = hf.config.n_layer
    out = []
    for batch in ids.split(batch_size):
        inputs = torch.cat([torch.full_like(batch[:, :1], sos), batch[:, :-1]], dim=1)  # SOS, as our AR input
        hidden = hf(input_ids=inputs, output_hidden_states=True).hidden_states
        feats = [hf.h[layer].ln_1(hidden[layer]).mean(1) for layer in range(n)] + [hidden[n].mean(1)]
        out.append(torch.stack(feats).numpy())
    return np.concatenate(out, axis=1)


def autocast_features(model: IGPT, ids: torch.Tensor, layers, batch_size: int) -> np.ndarray:
    """All-layer features from the model's own forward under plain torch.autocast(bfloat16): what bf16 gave
    before FeaturePass, kept as the row that shows what laying the weights out once buys."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return np.concatenate([model.features(ids[i : i + batch_size], layers).float().numpy()
                               for i in range(0, len(ids), batch_size)], axis=1)


def s_row(args) -> dict:
    """iGPT-S shapes: all-layer features in fp32, in precision "auto" (bf16 through FeaturePass where the CPU
    computes bf16), under plain autocast, and from HF, images per second."""
    from igpt_core.probe import feature_precision

    layers_, width, heads, size = (int(v) for v in args.s_shape.split(","))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=513, n_positions=size**2, n_layer=layers_, n_head=heads, n_embd=width)
    model = IGPT(config).eval()
    hf = hf_model_from_ours(model)
    ids = torch.randint(0, config.n_colors, (args.s_images, config.n_positions),
                        generator=torch.Generator().manual_seed(2))
    layers = list(range(config.n_layer + 1))
    methods = {  # each takes the images to extract the features of
        "ours_fp32": lambda x: extract_features(model, x, layers, batch_size=args.s_batch, precision="fp32"),
        "ours_auto": lambda x: extract_features(model, x, layers, batch_size=args.s_batch, precision="auto"),
        "ours_plain_autocast_bf16": lambda x: autocast_features(model, x, layers, args.s_batch),
        "hf_fp32": lambda x: hf_features(hf, x, config.sos_id, args.s_batch),
    }
    for method in methods.values():  # warm-up on one batch: first calls allocate and pick kernels (on every thread)
        method(ids[: args.s_batch])
    # Rounds of all four in turn: this machine's speed drifts by 10-20% within minutes, so each method's
    # median over the rounds is reported, and the ratios are of medians taken side by side.
    seconds = {name: [] for name in methods}
    values = {}
    for _ in range(args.s_rounds):
        for name, method in methods.items():
            t, values[name] = timed(lambda: method(ids))
            seconds[name].append(t)
    t_fp32, t_auto, t_autocast, t_hf = (float(np.median(seconds[name])) for name in methods)
    fp32, auto, theirs = values["ours_fp32"], values["ours_auto"], values["hf_fp32"]
    cosine = (auto * fp32).sum(-1) / (np.linalg.norm(auto, axis=-1) * np.linalg.norm(fp32, axis=-1))
    return {
        "shapes": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                   "image": f"{size}x{size}", "images": args.s_images, "batch": args.s_batch,
                   "layers_extracted": len(layers)},
        "auto_resolves_to": feature_precision("auto", "cpu", width),
        "rounds": args.s_rounds,
        "images_per_second": {"ours_fp32": round(args.s_images / t_fp32, 3), "ours_auto": round(args.s_images / t_auto, 3),
                              "ours_plain_autocast_bf16": round(args.s_images / t_autocast, 3),
                              "hf_fp32": round(args.s_images / t_hf, 3)},
        "images_per_second_each_round": {name: [round(args.s_images / t, 3) for t in ts] for name, ts in seconds.items()},
        "ratios": {"hf_over_ours_fp32": round(t_hf / t_fp32, 3), "hf_over_ours_auto": round(t_hf / t_auto, 3),
                   "fp32_over_auto": round(t_fp32 / t_auto, 3), "plain_autocast_over_auto": round(t_autocast / t_auto, 3)},
        "agreement": {"fp32_max_abs_diff_vs_hf": float(np.abs(fp32 - theirs).max()),
                      "auto_min_cosine_vs_fp32": float(cosine.min()),
                      "auto_per_layer_min_cosine": [round(float(c), 5) for c in cosine.min(axis=1)]},
    }


def timed(fn, repeats: int = 1):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def grid_jobs(checkpoints: int, layers: int, width: int) -> list:
    """The probe grid's fits at the default run's sizes: features of randomly initialised models of
    `layers` - 1 blocks × `width` on digits (16 grey levels as the palette), for `checkpoints` seeds
    plus the random-init reference, and the raw pixels."""
    data = {split: load_dataset("digits", split) for split in ("train", "val", "test")}
    ids = {split: torch.from_numpy(d.images[..., 0].reshape(len(d.images), -1) // 16) for split, d in data.items()}
    config = ModelConfig(vocab_size=17, n_positions=64, n_layer=layers - 1, n_head=4, n_embd=width)
    jobs = [(("raw_pixels",), tuple(a for split in ("train", "val", "test") for a in
                                    (data[split].images.reshape(len(data[split].images), -1).astype(np.float32),
                                     data[split].labels)))]
    for seed in range(checkpoints + 1):
        torch.manual_seed(seed)
        model = IGPT(config).eval()
        feats = {split: extract_features(model, x, list(range(layers)), precision="fp32") for split, x in ids.items()}
        jobs += [((seed, layer), tuple(a for split in ("train", "val", "test") for a in
                                       (feats[split][layer], data[split].labels))) for layer in range(layers)]
    return jobs


def tutorial_fits(jobs) -> dict:
    """One LogisticRegression() per feature set, scikit-learn's defaults, the process's threads."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the defaults' max_iter=100 often stops short: that is the point
        for key, (tx, ty, vx, vy, sx, sy) in jobs:
            clf = LogisticRegression().fit(tx, ty)
            out[key] = {"test_acc": float((clf.predict(sx) == sy).mean()), "iterations": int(clf.n_iter_.max())}
    return out


def grid_report(args) -> dict:
    warm_up_workers()  # as probe_run does: the workers' imports overlap the feature extraction
    jobs = grid_jobs(args.grid_checkpoints, args.grid_layers, args.grid_width)
    t_ours, ours = timed(lambda: fit_probes(jobs))
    t_one, one = timed(lambda: fit_probes(jobs, workers=1))
    t_tutorial, tutorial = timed(lambda: tutorial_fits(jobs))
    iterations = [sum(r["iterations"].values()) for r in ours.values()]
    return {
        "fits": len(jobs), "train": len(jobs[-1][1][0]), "features": args.grid_width, "Cs": list(DEFAULT_CS),
        "seconds": {"ours": round(t_ours, 2), "ours_in_one_process": round(t_one, 2),
                    "sklearn_one_default_fit_per_layer": round(t_tutorial, 2)},
        "ratios": {"sklearn_defaults_over_ours": round(t_tutorial / t_ours, 3),
                   "one_process_over_workers": round(t_one / t_ours, 3)},
        "workers_equal_one_process": ours == one,
        "mean_test_acc": {"ours": round(float(np.mean([r["test_acc"] for r in ours.values()])), 4),
                          "sklearn_defaults": round(float(np.mean([r["test_acc"] for r in tutorial.values()])), 4)},
        "lbfgs_iterations_per_fit": {"mean": round(float(np.mean(iterations)), 1), "max": int(max(iterations))},
    }


def paper_report(args, iterations_per_fit: float) -> dict:
    """Seconds per L-BFGS iteration on paper-sized features, on 1 and 2 BLAS threads."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, args.paper_rows)
    x = rng.normal(size=(args.paper_rows, args.paper_width)) + rng.normal(size=(10, args.paper_width))[y] * 0.3
    seconds = {}
    for threads in (1, 2):
        with threadpool_limits(threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=args.paper_iters)
            t, _ = timed(lambda: clf.fit(x, y))
            seconds[threads] = t / max(1, int(clf.n_iter_.max()))
    return {
        "rows": args.paper_rows, "features": args.paper_width, "classes": 10,
        "device": "cpu (no GPU here; see the module docstring)",
        "seconds_per_lbfgs_iteration": {"1_thread": round(seconds[1], 4), "2_threads": round(seconds[2], 4)},
        "two_threads_speedup": round(seconds[1] / seconds[2], 3),
        "projected_seconds_per_layer": round(seconds[1] * iterations_per_fit, 1),
        "projected_from_iterations_per_fit": iterations_per_fit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--naive-images", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--grid-checkpoints", type=int, default=6, help="probe grid: checkpoints (default run: 6)")
    parser.add_argument("--grid-layers", type=int, default=5, help="probe grid: layers per checkpoint (default run: 5)")
    parser.add_argument("--grid-width", type=int, default=128, help="probe grid: features (default run: 128)")
    parser.add_argument("--paper-rows", type=int, default=50_000)
    parser.add_argument("--paper-width", type=int, default=1536)
    parser.add_argument("--paper-iters", type=int, default=10, help="L-BFGS iterations timed at paper size")
    parser.add_argument("--s-images", type=int, default=16, help="iGPT-S row: images (0: leave the row out)")
    parser.add_argument("--s-batch", type=int, default=8, help="iGPT-S row: images per forward pass")
    parser.add_argument("--s-rounds", type=int, default=3, help="iGPT-S row: rounds of all methods (the median is reported)")
    parser.add_argument("--s-shape", default="24,512,8,32", help="iGPT-S row: layers,width,heads,image side")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=513, n_positions=args.size**2, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width)
    model = IGPT(config).eval()
    hf = hf_model_from_ours(model)
    ids = torch.randint(0, config.n_colors, (args.images, config.n_positions), generator=torch.Generator().manual_seed(1))
    layers = list(range(config.n_layer + 1))

    # warm-up both (first calls allocate and pick kernels)
    extract_features(model, ids[:2], layers, precision="fp32")
    hf_features(hf, ids[:2], config.sos_id, 2)

    # fp32, as HF's: the features must agree to 1e-4 (the bf16 comparison is the iGPT-S row's)
    t_ours, ours = timed(lambda: extract_features(model, ids, layers, batch_size=args.batch, precision="fp32"))
    t_hf, theirs = timed(lambda: hf_features(hf, ids, config.sos_id, args.batch))
    naive_ids = ids[: args.naive_images]
    t_naive, naive = timed(lambda: np.stack([extract_features(model, naive_ids, [layer], batch_size=args.batch,
                                                              precision="fp32")[0] for layer in layers]))
    t_ours_small = t_ours * args.naive_images / args.images  # per-image rate of the one-pass method

    diff = np.abs(ours - theirs)
    scale = np.abs(theirs).max()

    # Probe fit time on these features (random labels: the accuracy is meaningless, the time is not).
    labels = np.random.default_rng(0).integers(0, 10, args.images)
    n_train, n_val = int(0.625 * args.images), int(0.1875 * args.images)
    sl = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None))

    def fit_all():
        for layer in layers:
            x = ours[layer]
            fit_probe(x[sl[0]], labels[sl[0]], x[sl[1]], labels[sl[1]], x[sl[2]], labels[sl[2]])

    t_fit, _ = timed(fit_all)

    s_shapes = s_row(args) if args.s_images > 0 else None
    grid = grid_report(args)
    paper = paper_report(args, grid["lbfgs_iterations_per_fit"]["mean"])

    print(json.dumps({
        "task": "probe features of all layers of one checkpoint",
        "shapes": {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                   "image": f"{args.size}x{args.size}", "images": args.images, "batch": args.batch,
                   "layers_extracted": len(layers)},
        "machine": machine_facts(),
        "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "seconds": {
            "ours_one_pass": round(t_ours, 3),
            "hf_output_hidden_states": round(t_hf, 3),
            f"ours_one_pass_per_layer_calls_on_{args.naive_images}_images": round(t_naive, 3),
            "probe_fit_all_layers": round(t_fit, 3),
        },
        "images_per_second": {"ours": round(args.images / t_ours, 2), "hf": round(args.images / t_hf, 2),
                              "ours_one_call_per_layer": round(args.naive_images / t_naive, 2)},
        "ratios": {
            "hf_over_ours": round(t_hf / t_ours, 3),
            "one_call_per_layer_over_one_pass": round(t_naive / t_ours_small, 3),
            "fit_over_extraction": round(t_fit / t_ours, 4),
        },
        "probe_fit": {"train": n_train, "val": n_val, "test": args.images - n_train - n_val, "Cs": list(DEFAULT_CS),
                      "seconds_per_layer": round(t_fit / len(layers), 3)},
        "agreement": {
            "max_abs_diff_vs_hf": float(diff.max()),
            "max_abs_feature": float(scale),
            "per_layer_max_abs_diff": [float(d) for d in diff.max(axis=(1, 2))],
            "naive_equals_one_pass": bool(np.allclose(naive, ours[:, : args.naive_images], rtol=1e-5, atol=1e-6)),
            "allclose_atol_1e-4": bool(np.allclose(ours, theirs, rtol=0, atol=1e-4)),
        },
        "igpt_s": s_shapes,
        "probe_grid": grid,
        "paper_sized": paper,
    }, indent=2))


if __name__ == "__main__":
    main()
