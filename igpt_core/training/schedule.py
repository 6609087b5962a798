"""When things happen during training: the learning rate of each step, and when to save the resume state.

The learning rate follows the paper (Chen et al. 2020, §3.3): linear warm-up, then cosine decay to 0.
"""

from __future__ import annotations

import math
import re
import time

import torch

from ..errors import ConfigError


def lr_at(step: int, config) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up over `config.warmup` of
    `config.steps`, then cosine to 0 at the last step. `config` is a TrainConfig (lr, warmup, steps)."""
    warmup = max(1, round(config.warmup * config.steps))
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of `optimizer` the learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600}


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """`--save-every` as (steps, None) for "50", or (None, seconds) for "90s", "10m", "1.5h"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0 or (not match.group(2) and not match.group(1).isdigit()):
        raise ConfigError(f"save_every must be a number of steps (e.g. 50) or of seconds, minutes or hours of "
                          f"wall time (e.g. 90s, 10m, 2h), got {text!r}")
    number, unit = match.groups()
    return (int(number), None) if not unit else (None, float(number) * SECONDS_PER_UNIT[unit])


class SaveSchedule:
    """When to save the resume state between checkpoints: every N steps, or every N seconds of wall
    time since the last save (under torchrun, rank 0's clock decides for every process)."""

    def __init__(self, save_every: str, clock=time.monotonic):
        self.steps, self.seconds = parse_save_every(save_every)
        self.clock = clock
        self.last = clock()

    def step_due(self, step: int) -> bool:
        return self.steps is not None and step % self.steps == 0

    def time_due(self) -> bool:
        return self.seconds is not None and self.clock() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = self.clock()
