"""What pre-training reports: the validation loss, the metrics log (metrics.jsonl) and the progress bar."""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import append_jsonl
from ..likelihood import bits_per_token
from ..model import ModelConfig
from ..progress import progress_bar
from .schedule import lr_at


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, batch_size: int = 128, seed: int = 0, *, rank: int = 0, world: int = 1,
             autocast=None) -> float:
    """Mean loss in nats/token over ids (N, T). BERT: over masked positions, masks seeded.

    Under torchrun (world > 1) each process scores every world-th batch and the sums are
    all-reduced: the same value on every process, the same masks as one process would draw.
    Every process runs the same number of forward passes (a short last round repeats batch 0 with
    weight 0), as FSDP needs: each forward gathers the sharded weights from all processes.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    count = torch.zeros((), dtype=torch.float64, device=ids.device)
    batches = ids.split(batch_size)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    masks = [None] * len(batches)
    if model.config.objective == "bert":  # drawn for every batch, so each shard sees the masks of one process
        masks = [(torch.rand(b.shape, generator=generator) < model.config.mask_prob).to(b.device) for b in batches]
    rounds = -(-len(batches) // world)
    for i in range(rank, rounds * world, world):
        j = i if i < len(batches) else 0
        with autocast or nullcontext():
            _, loss = model(batches[j], targets=batches[j], mask=masks[j])
        if i < len(batches):
            weight = masks[j].sum() if masks[j] is not None else batches[j].numel()
            total += loss.double() * weight
            count += weight
    if world > 1:
        sums = torch.stack([total, count])
        dist.all_reduce(sums)
        total, count = sums
    model.train(was_training)
    return (total / count.clamp(min=1)).item()  # one read-back per evaluation


class MetricsLog:
    """metrics.jsonl, written by rank 0: one row per step (train loss, lr), plus the val loss on steps that
    evaluated. Losses wait on the device until a flush reads them back together (a read makes the host wait)."""

    def __init__(self, path: Path, tc, writer: bool):
        self.path, self.tc, self.writer = path, tc, writer
        self.pending: list[torch.Tensor] = []  # losses of finished steps, not yet read back
        self.last_val: float | None = None
        self.last_eval: int | None = None  # the step of last_val

    def losses(self) -> list[float]:
        return torch.stack(self.pending).tolist() if self.pending else []  # the host waits for the device here

    def write(self, upto: int, losses: list[float] | None = None) -> None:
        """Append the pending losses (steps ..upto), with the val loss if evaluated at upto."""
        losses = self.losses() if losses is None else losses
        first = upto - len(losses) + 1
        rows = [{"step": first + i, "loss": loss, "lr": lr_at(first + i, self.tc)} for i, loss in enumerate(losses)]
        if rows and self.last_eval == upto:
            rows[-1].update(val_loss=self.last_val, val_bits_per_token=bits_per_token(self.last_val))
        if self.writer:
            append_jsonl(self.path, rows)
        self.pending = []


# Dense bf16 tensor-core peaks (FLOP/s per GPU) for model-FLOPs utilisation; other devices show none.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("L4", 121e12)]


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, FLOP/s; None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if re.search(rf"\b{key}\b", name)), None)


def model_flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token, PaLM's convention: 6 × (non-embedding parameters) + 12 × layers × width × T."""
    d, layers = config.n_embd, config.n_layer
    weights = layers * 12 * d * d + config.n_colors * d  # blocks' matrices + output head
    return 6 * weights + 12 * layers * d * config.n_positions


class ProgressBar:
    """Rank 0's tqdm bar: loss, val loss, tokens/s of the global batch, and MFU on known GPUs."""

    def __init__(self, name: str, config: ModelConfig, tc, start: int, world: int, device: torch.device):
        self.bar = progress_bar(True, total=tc.steps, initial=start, desc=f"training {name}", unit="step")
        self.config, self.world, self.peak = config, world, peak_flops(device)
        self.tokens_per_step = tc.batch_size * config.n_positions
        self.window = (start, time.perf_counter())  # steps and time since the last report

    def show(self, step: int, loss: float, val: float | None, now: float) -> None:
        rate = self.tokens_per_step * (step - self.window[0]) / max(now - self.window[1], 1e-9)
        shown = {"loss": f"{loss:.3f}", "val": None if val is None else f"{val:.3f}", "tok_s": f"{rate:,.0f}"}
        if self.peak:  # model FLOPs utilisation, over all processes' GPUs
            shown["mfu"] = f"{rate * model_flops_per_token(self.config) / (self.peak * self.world):.0%}"
        self.bar.set_postfix(shown)
        self.window = (step, time.perf_counter())  # the next window excludes this evaluation and checkpoint

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
