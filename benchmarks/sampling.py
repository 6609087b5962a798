"""Completion throughput: igpt_core's KV-cache sampler against Hugging Face generate(), same weights.

    python benchmarks/sampling.py [--quick] [--threads 1 2] [--cases igpt-s] [--batches 1]

Prints JSON. For each case (the `tiny` preset at 16×16 with 16 colours, and iGPT-S shapes at 32×32
with 512 colours, random weights) and batch size (1 and 8), the bottom half of one image is
completed from its top half by `igpt_core.sample.complete` and by HF
`ImageGPTForCausalImageModeling.generate(do_sample=True, top_k=None, use_cache=True)`, starting
from SOS + the kept rows, up to max_length = n_positions + 1. Both models hold identical weights
(converted with igpt_core.pretrained). Runs of ours and HF's are interleaved so that machine load hits
both alike; `ratio` is the median over repeats of ours/HF, measured back to back.

Everything runs once per torch thread count in --threads (default: 1, and every core), since the
fastest kernels differ between them (see igpt_core.decoder); both sides get the same count.

Throughput counts generated pixels (batch × hidden pixels) per wall-clock second, prompt included.
`cpu_ratio` is the same ratio in CPU seconds of this process: steadier than wall-clock on a shared
machine (time spent waiting for a core is not counted).
`greedy_check` compares top_k=1 completions with HF's greedy generate on the first pixels; a
mismatch is reported with the logit gap between the two best colours there (a gap near 0 is an
fp32 argmax tie, not a bug).

The bound (batch 1, fp32): a pixel cannot take less time than reading the model's weights once.
`weights_bound_ms` is the time of the blocks' products alone (`x @ W` with the decoder's own (in, out)
matrices, 4 per layer), `cache_bound_ms` that of reading the KV cache once at the completion's
middle position (a sum over it; each step attends over all earlier positions), both timed in the
same interleaved rounds as the completions. `ms_per_pixel` is ours at batch 1 (sampling included);
`ratio_to_weights_bound` and `ratio_to_bound` (weights + cache) are medians of per-round ratios.

int8 (`precision="int8"`, approximate): `int8_ratio` is HF's time over ours with int8 weights, timed
in the same interleaved rounds. A model is quantised once, on its first int8 decoder
(`int8_quantise_seconds`), and later completions re-use it while its weights are unchanged, as in a
demo session; `int8_first_call_ratio` adds that one-off cost to every round.
`int8_greedy_agreement` compares int8 and fp32 top_k=1 completions of the same pixels (random
weights give nearly flat logits: a hard case for agreement). The section `int8_trained_run`
scores a trained digits run (trained here, or --run) with both: bits/token, the share of positions
where the most likely colour agrees given the same prefix, and greedy completions of test images.
--large adds iGPT-L shapes with int8 (benchmarks/int8_large.py, in its own process so that its
peak memory is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from igpt_core.decoder import Decoder
from igpt_core.pretrained import state_dict_from_hf
from igpt_core.likelihood import score
from igpt_core.model import IGPT, ModelConfig
from igpt_core.sample import complete, inpaint
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

CASES = {  # name: (model shape, repeats, repeats with --quick, pixels in the greedy check (None: all))
    "tiny": (dict(n_layer=4, n_embd=128, n_head=4, vocab_size=17, n_positions=16 * 16), 15, 1, None),
    "igpt-s": (dict(n_layer=24, n_embd=512, n_head=8, vocab_size=513, n_positions=32 * 32), 3, 1, 128),
}
TARGETS = {("tiny", 1): 3.0, ("igpt-s", 1): 2.0}  # the goals for `ratio` ("Fast completions")
INT8_TARGETS = {("igpt-s", 1): 3.0}  # the goal for `int8_ratio`, on 1 thread and on 2
BATCHES = (1, 8)


def models(shape: dict, seed: int = 0):
    """HF's model with its own random init, and ours holding the same weights."""
    torch.manual_seed(seed)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**shape)).eval()
    config = ModelConfig(**shape)
    ours = IGPT(config)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    return ours.eval(), hf


def timed(fn) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def hf_generate(hf, prompt: torch.Tensor, keep: int, batch: int, length: int, **options) -> torch.Tensor:
    """HF's completion of prompt[:keep]: its input is SOS + the kept pixels (HF adds no SOS itself)."""
    sos = hf.config.vocab_size - 1
    inputs = torch.cat([torch.tensor([sos]), prompt[:keep]]).expand(batch, -1)
    with torch.inference_mode():
        # an explicit mask: otherwise generate() takes every pad_token_id (here SOS) in the input for padding
        out = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_length=1 + length, use_cache=True,
                          pad_token_id=sos, **options)
    return out[:, 1:]  # drop SOS: (batch, length) palette ids


def greedy_check(ours, hf, prompt: torch.Tensor, keep: int, n: int) -> dict:
    """Our top_k=1 completion of the n pixels after `keep` against HF's greedy generate()."""
    T = prompt.numel()
    known = torch.ones(T, dtype=torch.bool)
    known[keep : keep + n] = False  # positions after the checked ones are fed, never sampled: cheap
    mine = inpaint(ours, prompt, known, 1, top_k=1, seed=0)[0, keep : keep + n]
    theirs = hf_generate(hf, prompt, keep, 1, keep + n, do_sample=False)[0, keep:]
    same = mine == theirs
    result = {"pixels": n, "equal": bool(same.all())}
    if not result["equal"]:
        first = int((~same).nonzero()[0])
        result["matching_prefix"] = first
        with torch.inference_mode():  # how close was the call at the first difference?
            logits, _ = ours(torch.cat([prompt[:keep], theirs]).unsqueeze(0))
        top2 = logits[0, keep + first].topk(2).values
        result["logit_gap_at_first_mismatch"] = float(top2[0] - top2[1])
    return result


def greedy_agreement(ours, prompt: torch.Tensor, keep: int, n: int) -> dict:
    """int8 against fp32 top_k=1 completions of the n pixels after `keep`."""
    known = torch.ones(prompt.numel(), dtype=torch.bool)
    known[keep : keep + n] = False
    fp32, int8 = (inpaint(ours, prompt, known, 1, top_k=1, seed=0, precision=p)[0, keep : keep + n]
                  for p in ("fp32", "int8"))
    same = fp32 == int8
    return {"pixels": n, "equal_fraction": round(float(same.float().mean()), 4),
            "matching_prefix": n if bool(same.all()) else int((~same).nonzero()[0])}


def bound_timers(ours, position: int, passes: int = 5):
    """(weights, cache): functions that time, as the median of `passes`, one pass of the fp32 blocks'
    products `x @ W` (what a batch-1 pixel must read) and one read of the KV cache up to `position`."""
    decoder = Decoder(ours, 1)
    config = ours.config
    # the decoder's own weights, in the plain (in, out) layout that `x @ W` streams
    state = ours.state_dict()
    matrices = [state[f"h.{i}.{name}"].T.contiguous() for i in range(config.n_layer)
                for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
    inputs = {m.shape[0]: torch.randn(1, m.shape[0]) for m in matrices}
    cache = decoder.kv.narrow(4, 0, position).zero_()

    def weights():
        for m in matrices:
            inputs[m.shape[0]] @ m

    def median_of(fn):
        return statistics.median(timed(fn)[0] for _ in range(passes))

    return lambda: median_of(weights), lambda: median_of(cache.sum)


def run_case(name: str, quick: bool, batches=BATCHES) -> dict:
    shape, repeats, quick_repeats, n_check = CASES[name]
    repeats = quick_repeats if quick else repeats
    ours, hf = models(shape)
    side = ours.config.image_size
    T, keep = side * side, (side // 2) * side
    prompt = torch.randint(0, ours.config.n_colors, (T,), generator=torch.Generator().manual_seed(1))
    n_check = T - keep if n_check is None else (32 if quick else n_check)
    quantise_s, _ = timed(lambda: Decoder(ours, 1, "int8"))  # once per model: later int8 decoders re-use it
    result = {"shape": shape, "image": f"{side}x{side}", "kept_pixels": keep, "generated_per_image": T - keep,
              "int8_quantise_seconds": round(quantise_s, 3),
              "greedy_check": greedy_check(ours, hf, prompt, keep, n_check),
              "int8_greedy_agreement": greedy_agreement(ours, prompt, keep, n_check), "batches": {}}
    for batch in batches:
        pixels = batch * (T - keep)
        runs = {  # name: one completion of the bottom half, for seed r
            "ours": lambda r: complete(ours, prompt, side // 2, batch, seed=r),
            "int8": lambda r: complete(ours, prompt, side // 2, batch, seed=r, precision="int8"),
            "hf": lambda r: hf_generate(hf, prompt, keep, batch, T, do_sample=True, top_k=None),
        }
        if name == "tiny":  # warm-up (first calls allocate, initialise kernels); the large case is warm by now
            [fn(-1) for fn in runs.values()]
        times = {key: [] for key in runs}
        bounds = {"weights": [], "cache": []}
        weights_bound, cache_bound = bound_timers(ours, (keep + T) // 2) if batch == 1 else (None, None)
        for r in range(repeats):  # interleaved, rotating who goes first
            order = list(runs)[r % 3:] + list(runs)[: r % 3]
            for key in order:
                times[key].append(timed(lambda: runs[key](r)))
            if batch == 1:
                bounds["weights"].append(weights_bound())
                bounds["cache"].append(cache_bound())
        (ours_s, ours_cpu), (int8_s, int8_cpu), (hf_s, hf_cpu) = (zip(*times[key]) for key in runs)
        result["batches"][str(batch)] = {
            "ours_px_per_s": round(pixels / statistics.median(ours_s), 1),
            "int8_px_per_s": round(pixels / statistics.median(int8_s), 1),
            "hf_px_per_s": round(pixels / statistics.median(hf_s), 1),
            "ratio": round(statistics.median(h / o for o, h in zip(ours_s, hf_s)), 2),
            "int8_ratio": round(statistics.median(h / o for o, h in zip(int8_s, hf_s)), 2),
            "int8_first_call_ratio": round(statistics.median(h / (o + quantise_s) for o, h in zip(int8_s, hf_s)), 2),
            "cpu_ratio": round(statistics.median(h / o for o, h in zip(ours_cpu, hf_cpu)), 2),
            "int8_cpu_ratio": round(statistics.median(h / o for o, h in zip(int8_cpu, hf_cpu)), 2),
            **({"target_ratio": TARGETS[name, batch]} if (name, batch) in TARGETS else {}),
            **({"target_int8_ratio": INT8_TARGETS[name, batch]} if (name, batch) in INT8_TARGETS else {}),
            **(bound_report(ours_s, bounds, pixels) if batch == 1 else {}),
            "ours_seconds": [round(s, 3) for s in ours_s],
            "int8_seconds": [round(s, 3) for s in int8_s],
            "hf_seconds": [round(s, 3) for s in hf_s],
        }
    return result


def bound_report(ours_s, bounds: dict, pixels: int) -> dict:
    """Our batch-1 time per pixel against the time of reading the weights (and the cache) once, per round."""
    per_pixel = [s / pixels for s in ours_s]
    return {
        "ms_per_pixel": round(1e3 * statistics.median(per_pixel), 2),
        "weights_bound_ms": round(1e3 * statistics.median(bounds["weights"]), 2),
        "cache_bound_ms": round(1e3 * statistics.median(bounds["cache"]), 2),
        "ratio_to_weights_bound": round(statistics.median(p / w for p, w in zip(per_pixel, bounds["weights"])), 2),
        "ratio_to_bound": round(statistics.median(p / (w + c) for p, w, c in
                                                  zip(per_pixel, bounds["weights"], bounds["cache"])), 2),
    }


def trained_run(run_name: str | None, runs_dir: str | None, quick: bool, folder: str) -> dict:
    """bits/token and agreement of int8 with fp32 on a trained run: --run, or a digits run trained in `folder`."""
    from igpt_core.data import load_dataset
    from igpt_core.runs import open_run
    from igpt_core.training import TrainConfig, start_run, train

    if run_name:
        run = open_run(run_name, runs_dir)
    else:
        steps, overrides = (40, dict(n_layer=2, n_embd=32, n_head=2)) if quick else (300, {})
        run = start_run("int8-check", "digits", "tiny", "ar", 16, train_config=TrainConfig(steps=steps),
                        model_overrides=overrides, runs_dir=folder)
        train(run, progress=False)
    model, palette, _ = run.load()
    images = load_dataset(run.info["dataset"], "test", resolution=model.config.image_size).images
    ids = torch.from_numpy(palette.encode(images, model.config.image_size))
    fp32, int8 = score(model, ids), score(model, ids, precision="int8")
    with torch.inference_mode():
        logits, _ = model(ids)
        sos = torch.full_like(ids[:, :1], model.config.sos_id)
        approx = Decoder(model, len(ids), "int8").feed(torch.cat([sos, ids[:, :-1]], 1), every_position=True)
    side = model.config.image_size
    greedy = [[complete(model, image, side // 2, 1, top_k=1, precision=p)[0] for p in ("fp32", "int8")]
              for image in ids[: 8 if quick else 64]]
    return {
        "run": run.name, "model": model.config.to_dict(), "test_images": len(ids),
        "bits_per_token": {"fp32": round(fp32["bits_per_token"], 5), "int8": round(int8["bits_per_token"], 5),
                           "relative_difference": round(int8["bits_per_token"] / fp32["bits_per_token"] - 1, 6),
                           "target": "within 1%"},
        "argmax_agreement_same_prefix": round(float((logits.argmax(-1) == approx.argmax(-1)).float().mean()), 4),
        "logits_max_abs_diff": round(float((logits - approx).abs().max()), 4),
        "greedy_completions": {"images": len(greedy),
                               "identical": sum(bool(torch.equal(a, b)) for a, b in greedy),
                               "pixels_equal_fraction": round(float(torch.stack(
                                   [(a == b).float().mean() for a, b in greedy]).mean()), 4)},
    }


def large(threads: int) -> dict:
    """benchmarks/int8_large.py in its own process (its peak memory is then its own)."""
    result = subprocess.run([sys.executable, "int8_large.py", "--threads", str(threads)], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    return json.loads(result.stdout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per case and a short greedy check (CI smoke)")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="torch thread counts to measure, each in turn (default: 1 and every core)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES),
                        help="batch sizes to time (default: 1 8)")
    parser.add_argument("--run", help="trained run to score with int8 and fp32 (default: train a digits run here)")
    parser.add_argument("--runs-dir", help="folder holding --run")
    parser.add_argument("--large", action="store_true", help="also complete with iGPT-L shapes in int8 (minutes)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    report = {"benchmark": "completion throughput, bottom half of one image, generated pixels per second",
              "command": "python benchmarks/sampling.py" + (" --quick" if args.quick else "")
              + " --threads " + " ".join(map(str, args.threads)) + " --cases " + " ".join(args.cases)
              + " --batches " + " ".join(map(str, args.batches))
              + (f" --run {args.run}" if args.run else "") + (" --large" if args.large else ""),
              "quick": args.quick, "machine": {**machine_facts(), "transformers": transformers.__version__},
              "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        report["threads"][str(threads)] = {name: run_case(name, args.quick, args.batches) for name in args.cases}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        report["int8_trained_run"] = trained_run(args.run, args.runs_dir, args.quick, folder)
    if args.large:
        report["int8_igpt_l"] = large(threads=1)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
