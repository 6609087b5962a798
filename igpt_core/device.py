"""Where a model runs and in which number format: device choice and the bf16-or-fp32 decision.

A leaf of the package: it imports nothing of igpt_core, so that every room can use it.
"""

import os
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# "auto" keeps models narrower than this in fp32: there features take seconds either way, and probe tables
# stay comparable with fp32 ones. bf16 moves features by ~5e-4 of their norm, and probe accuracy by ~1 point
# a layer on average (up to 4-9), as much as random noise of that size or less: the probes are that
# sensitive (benchmarks/precision.py, docs/performance.md). From iGPT-S's width (512) its speed pays:
# 4.5x fp32 for iGPT-S's features on a CPU with AVX512-BF16.
BF16_MIN_WIDTH = 512


def pick_device(name: str = "auto") -> torch.device:
    """`"auto"`: this process's CUDA GPU (LOCAL_RANK under torchrun), else Apple's MPS, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    """The CPU's maker as Linux names it ("GenuineIntel", "AuthenticAMD") and its feature flags; empty
    where /proc/cpuinfo does not exist (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", frozenset()
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return vendor, frozenset(flags)


def cpu_vendor() -> str:
    return _cpuinfo()[0]


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Xeons since Sapphire Rapids): bf16 matrix products *and* bf16 attention are fast."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up with care
    return bool(supported and supported())


def onednn_available() -> bool:
    """Whether this PyTorch exposes oneDNN's packed linear products (`torch.ops.mkldnn._reorder_linear_weight`
    and `_linear_pointwise`, which serve torch.compile's CPU backend; x86 and most ARM CPU builds have them)."""
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), so that bf16 matrix
    products run several times faster than fp32 rather than being emulated more slowly."""
    return cpu_has_amx() or "avx512_bf16" in _cpuinfo()[1]


def resolve_precision(precision: str, device: torch.device | str = "cpu", width: int | None = None) -> str:
    """"auto" → "bf16" where the hardware computes it natively (CUDA GPUs with bf16, CPUs with
    AVX512-BF16 or AMX) and the model (of width `width`, if given) is at least BF16_MIN_WIDTH wide, else
    "fp32". "fp32" and "bf16" are returned as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if width is not None and width < BF16_MIN_WIDTH:
        return "fp32"
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_computes_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device | str, precision: str, width: int | None = None):
    """A context that runs matrix products in bf16 when `precision` resolves to "bf16" (weights and the
    residual stream stay fp32: torch.autocast casts per operation), else a no-op."""
    device = torch.device(device)
    if resolve_precision(precision, device, width) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
