"""Pre-training settings (`TrainConfig`), and the checks that a run can start or resume with them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..errors import ConfigError
from ..model import preset


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 64  # global batch: summed over processes and accumulation micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (batch_size must divide by grad_accum × processes)
    lr: float = 3e-3  # peak learning rate (the paper: 0.003 for iGPT-S)
    warmup: float = 0.05  # fraction of steps of linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0  # the paper found it made no difference
    beta2: float = 0.95  # Adam β = (0.9, 0.95), as in the paper
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    eval_every: int = 50  # steps between validation losses (also at every checkpoint)
    eval_images: int = 1024  # validation images per evaluation (the first ones of the split)
    checkpoints: list[int] | None = None  # steps that keep a checkpoint; None: ~6 log-spaced, and the last
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else mps, else cpu
    compile: bool = False  # torch.compile the model (worth it on GPUs, long warm-up on CPU)
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    fsdp: bool = False  # shard weights, gradients and Adam state over the processes (torchrun): models too big for one GPU
    save_every: str = "10m"  # also save the resume state every N steps ("50") or N s/m/h of wall time ("10m")

    def checkpoint_steps(self) -> list[int]:
        if self.checkpoints is not None:
            return sorted({s for s in self.checkpoints if 1 <= s <= self.steps} | {self.steps})
        return sorted({max(1, round(s)) for s in np.geomspace(max(1, self.steps / 32), self.steps, 6)} | {self.steps})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The config a run.json recorded. Runs written before `fsdp` and `save_every` existed lack
        them and get the defaults; a key no version of igpt wrote is an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown training config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# Settings a resumed run may change: where and how fast it runs and how often it saves, not what it learns.
RUNTIME_SETTINGS = ("device", "compile", "save_every")


def check_resume(run, dataset: str, preset_name: str, objective: str, n_colors: int,
                 train_config: TrainConfig, model_overrides: dict | None) -> None:
    """Refuse to resume `run` (a runs.Run) with settings that differ from the ones it was started with."""
    info = run.info
    if not info.get("train_config") or info.get("kind") == "classifier":
        raise ConfigError(f"run {run.name!r} was not pre-trained by `igpt train` (it is imported or a classifier): "
                          "there is nothing to resume; start a new run with another --name")
    n_colors = len(run.palette) if n_colors is None else n_colors  # None: the run's own (always so for shards)
    wanted = preset(preset_name, vocab_size=n_colors + 1, n_positions=run.model_config.n_positions,
                    objective=objective, **(model_overrides or {}))
    changes = []
    if info["dataset"] != dataset:
        changes.append(f"dataset {info['dataset']} -> {dataset}")
    if wanted != run.model_config:
        old, new = run.model_config.to_dict(), wanted.to_dict()
        changes += [f"{k} {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    old_train = TrainConfig.from_dict(info["train_config"])
    for f in fields(TrainConfig):
        if f.name not in RUNTIME_SETTINGS and getattr(old_train, f.name) != getattr(train_config, f.name):
            changes.append(f"{f.name} {getattr(old_train, f.name)} -> {getattr(train_config, f.name)}")
    if changes:
        raise ConfigError(
            f"--resume with settings that differ from run {run.name!r}: {'; '.join(changes)}. "
            "Resume with the original settings, or start a new run with another --name"
        )


def check_processes(tc: TrainConfig, world: int) -> int:
    """Images per process per micro-step, if `world` processes can run this config."""
    micro_batch, rem = divmod(tc.batch_size, tc.grad_accum * world)
    if rem or micro_batch == 0:
        raise ConfigError(f"batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) × processes ({world})")
    if tc.fsdp and world == 1:
        raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                          "(N ≥ 2), or train without --fsdp on one process")
    return micro_batch
