"""iGPT-L on a CPU with int8 weights: one completion, its time and its peak memory.

    python benchmarks/int8_large.py [--pixels N] [--threads T]

iGPT-L (48 layers, width 1536, 16 heads, 512 colours at 32×32; 1.36B parameters) needs 5.4 GB for
its float32 weights alone. Here the model exists only on PyTorch's meta device (shapes, no data);
`Decoder.from_weights` asks for one weight at a time, each made on the spot (random, at the
model's own initialisation scales) and quantised to int8 before the next is made, so the float32
model is never in memory. Then the bottom half of one image is completed from its top half at
batch 1 (sampling at temperature 1, as `igpt_core.sample.complete` does).

Prints one JSON object: seconds to build (make + quantise), prompt, per generated pixel and in
all; the int8 weights' size; the process's peak resident memory (getrusage: the whole process,
Python and torch included), against the 2.5 GB target. Run it in its own process (as
benchmarks/sampling.py --large does) so that its peak is its own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import time

import torch

from igpt_core.decoder import Decoder
from igpt_core.model import IGPT, ModelConfig
from igpt_core.sample import sample_logits
from machine import machine_facts  # benchmarks/machine.py (scripts run from this folder)

IGPT_L = dict(n_layer=48, n_embd=1536, n_head=16, vocab_size=513, n_positions=32 * 32)
TARGET_PEAK_GB = 2.5


def state_shapes(config: ModelConfig) -> dict:
    """IGPT's state-dict shapes, from a model on the meta device (no memory for its data)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in IGPT(config).state_dict().items()}


def random_weights(config: ModelConfig, seed: int = 0):
    """weight(name): a fresh random tensor of that state-dict entry's shape, at IGPT's init scales."""
    shapes = state_shapes(config)
    generator = torch.Generator().manual_seed(seed)

    def weight(name: str) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shapes[name])
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            return torch.ones(shapes[name])
        std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
        return torch.randn(shapes[name], generator=generator).mul_(std)  # lm_head too: logits that vary

    return weight


def int8_bytes(decoder: Decoder) -> int:
    return sum(m.shape.numel() for layer in decoder.layers for m in layer[::2])  # one byte per weight


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports kB


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def map_large_blocks() -> None:
    """Have glibc give every block of 1 MB or more its own mapping, returned to the OS when freed.

    By default it raises that threshold as blocks are freed (up to 32 MB), so the folding's
    temporaries land in its heap, where the int8 weights made after them pin them: measured
    0.8 GB of freed-but-kept memory after building iGPT-L (RSS 2.51 GB, 1.71 after malloc_trim).
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release_freed_heap() -> None:
    """Hand back to the OS whatever freed heap pages remain (glibc's malloc_trim)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, help="pixels to generate (default: the bottom half, 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    map_large_blocks()
    config = ModelConfig(**IGPT_L)
    T, keep = config.n_positions, config.n_positions // 2
    pixels = T - keep if args.pixels is None else args.pixels
    start = time.perf_counter()
    decoder = Decoder.from_weights(config, random_weights(config), batch_size=1, precision="int8")
    built = time.perf_counter()
    peak_after_build, rss_after_build = peak_rss_gb(), rss_gb()
    release_freed_heap()
    rss_after_release = rss_gb()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.n_colors, (keep,), generator=generator)
    with torch.inference_mode():
        logits = decoder.feed(torch.cat([torch.tensor([config.sos_id]), prompt])[None])
        prompted = time.perf_counter()
        out = []
        for _ in range(pixels):
            out.append(sample_logits(logits, generator))
            if len(out) < pixels:
                logits = decoder.feed(out[-1][None])
    done = time.perf_counter()
    parameters = sum(math.prod(shape) for shape in state_shapes(config).values())
    print(json.dumps({
        "benchmark": "iGPT-L shapes, int8 decoding on the CPU: one completion at batch 1",
        "shape": IGPT_L, "parameters": parameters,
        "threads": args.threads, "kept_pixels": keep, "generated_pixels": pixels,
        "seconds": {"build_and_quantise": round(built - start, 1), "prompt": round(prompted - built, 1),
                    "per_pixel": round((done - prompted) / pixels, 3), "total": round(done - start, 1)},
        "int8_weight_gb": round(int8_bytes(decoder) / 1e9, 3),
        "kv_cache_gb": round(decoder.kv.numel() * decoder.kv.element_size() / 1e9, 3),
        "rss_gb": {"after_build": round(rss_after_build, 3), "after_malloc_trim": round(rss_after_release, 3),
                   "end": round(rss_gb(), 3)},
        "peak_rss_gb": {"after_build": round(peak_after_build, 3), "end": round(peak_rss_gb(), 3),
                        "target": TARGET_PEAK_GB, "meets_target": peak_rss_gb() < TARGET_PEAK_GB},
        "fp32_weight_gb": round(4 * parameters / 1e9, 2),
        "machine": machine_facts(),
    }, indent=2))


if __name__ == "__main__":
    main()
