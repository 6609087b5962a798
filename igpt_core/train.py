"""Training: one loop for both objectives (it only calls the model's forward with targets).

`start_run` turns a dataset into a run folder (palette fitted on the training images, configs
recorded); `train` runs the loop on it. The loop is deterministic by construction — batch order is
a function of (seed, step) and the model's random masks are seeded by (seed, step, rank, micro-step)
— so a run resumed from its last saved state reproduces the uninterrupted loss curve exactly,
and `torchrun` with N processes sees the same global batches as one process (with DDP, each
process holding the whole model, or with `fsdp`, each holding 1/N of its weights, gradients and Adam
state). The resume state is saved at every checkpoint and every `save_every` steps or minutes.

Under `torchrun` every process runs this same code; distributed.py says how the processes share the
work, wait for each other and stop (a lost process, SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .data import load_dataset
from .device import pick_device
from .distributed import StopSignals, init_from_env, is_peer_failure, lost_peers_message, patient_group
from .errors import ConfigError, IgptError, RunError
from .files import append_jsonl, atomic_write, atomic_write_json, write_jsonl
from .likelihood import bits_per_dim
from .model import IGPT, ModelConfig, preset
from .palette import Palette
from .progress import progress_bar
from .runs import Run, create_run, open_run, save_checkpoint
from .data.shards import open_shards, shards_path


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
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """`--save-every` as (steps, None) for "50", or (None, seconds) for "90s", "10m", "1.5h"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0 or (not match.group(2) and not match.group(1).isdigit()):
        raise ConfigError(f"save_every must be a number of steps (e.g. 50) or of seconds, minutes or hours of "
                          f"wall time (e.g. 90s, 10m, 2h), got {text!r}")
    number, unit = match.groups()
    return (int(number), None) if not unit else (None, float(number) * _SECONDS[unit])


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


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up, then cosine to 0."""
    warmup = max(1, round(config.warmup * config.steps))
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, n_colors: int) -> float:
    """Cross-entropy (nats/token) of val under the training colour frequencies: the baseline a model
    that ignores every other pixel would reach."""
    return unigram_loss_from_counts(np.bincount(train_ids.ravel(), minlength=n_colors),
                                    np.bincount(val_ids.ravel(), minlength=n_colors))


def unigram_loss_from_counts(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """`unigram_loss` from colour counts (what tokenised shards keep). Add-one smoothing so unseen
    colours cost finitely."""
    counts = np.asarray(train_counts, dtype=np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-(np.asarray(val_counts) * logp).sum() / max(1, np.sum(val_counts)))


# -- making a run -----------------------------------------------------------------------------------


def start_run(
    name: str,
    dataset: str = "digits",
    preset_name: str = "tiny",
    objective: str = "ar",
    n_colors: int | None = 16,  # None: the palette size of shards:DIR (other datasets: 16)
    resolution: int | None = None,
    train_config: TrainConfig | None = None,
    model_overrides: dict | None = None,
    runs_dir: Path | None = None,
    data_dir: Path | None = None,
    overwrite: bool = False,
) -> Run:
    """Fit a palette on the dataset's training images and write a new run folder (no training yet).

    Under torchrun, rank 0 does the work and the other processes open the folder it made (or raise
    the same error it met), so every process may call this with the same arguments.
    """
    train_config = train_config or TrainConfig()
    rank, world = init_from_env()
    _check_processes(train_config, world)  # before anything is written
    if world == 1:
        return _create_run(name, dataset, preset_name, objective, n_colors, resolution, train_config,
                           model_overrides, runs_dir, data_dir, overwrite)
    failure: list = [None]  # rank 0's error, if any, sent to the others
    if rank == 0:
        try:
            _create_run(name, dataset, preset_name, objective, n_colors, resolution, train_config,
                        model_overrides, runs_dir, data_dir, overwrite)
        except BaseException as err:
            shared = err if isinstance(err, IgptError) else RunError(f"rank 0 could not create run {name!r}: {err!r}")
            dist.broadcast_object_list([shared], src=0, group=patient_group())
            raise
    dist.broadcast_object_list(failure, src=0, group=patient_group())  # rank 0 is done: the others may look
    if failure[0] is not None:
        raise failure[0]
    try:
        return open_run(name, runs_dir)
    except RunError as err:
        raise RunError(f"{err} (process {rank} cannot see the run rank 0 made: on several nodes, --runs-dir "
                       "must be a folder all nodes share)") from None


def _create_run(name, dataset, preset_name, objective, n_colors, resolution, train_config, model_overrides,
                runs_dir, data_dir, overwrite) -> Run:
    shards_dir = shards_path(dataset)
    if shards_dir is None:
        palette, size, classes, unigram = _palette_from_images(dataset, n_colors or 16, resolution, train_config.seed,
                                                               data_dir)
    else:
        palette, size, classes, unigram = _palette_from_shards(open_shards(shards_dir), n_colors, resolution)
    config = preset(preset_name, vocab_size=len(palette) + 1, n_positions=size * size, objective=objective,
                    **(model_overrides or {}))
    info = {
        "dataset": dataset,
        "preset": preset_name,
        "model_config": config.to_dict(),
        "train_config": asdict(train_config),
        "classes": classes,
        "data_dir": str(data_dir) if data_dir else None,
        "unigram_val_loss": unigram,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return create_run(runs_dir, name, info, palette, overwrite=overwrite)


def _palette_from_images(dataset, n_colors, resolution, seed, data_dir):
    """A palette fitted on the training images; (palette, size, classes, unigram val loss)."""
    data = load_dataset(dataset, "train", data_dir=data_dir, seed=seed, resolution=resolution)
    size = data.resolution
    palette = Palette.fit(data.images, n_colors, seed=seed)
    val = load_dataset(dataset, "val", data_dir=data_dir, seed=seed, resolution=size)
    unigram = unigram_loss(palette.encode(data.images, size), palette.encode(val.images, size), n_colors)
    return palette, size, data.classes, unigram


def _palette_from_shards(shards, n_colors, resolution):
    """The palette the shards were tokenised with; (palette, size, classes, unigram val loss)."""
    if n_colors is not None and n_colors != len(shards.palette):
        raise ConfigError(f"--colors {n_colors}, but the shards in {shards.path} hold ids of a "
                          f"{len(shards.palette)}-colour palette: leave --colors out, or tokenise again")
    if resolution is not None and resolution != shards.resolution:
        raise ConfigError(f"--resolution {resolution}, but the shards in {shards.path} are at {shards.resolution}: "
                          "leave --resolution out, or tokenise again at that resolution")
    unigram = unigram_loss_from_counts(shards.split("train").color_counts, shards.split("val").color_counts)
    return shards.palette, shards.resolution, shards.classes, unigram


# Settings a resumed run may change: where and how fast it runs and how often it saves, not what it learns.
RUNTIME_SETTINGS = ("device", "compile", "save_every")


def check_resume(run: Run, dataset: str, preset_name: str, objective: str, n_colors: int,
                 train_config: TrainConfig, model_overrides: dict | None) -> None:
    """Refuse to resume a run with settings that differ from the ones it was started with."""
    info = run.info
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


# -- the loop ---------------------------------------------------------------------------------------


class _BatchOrder:
    """Sample indices of global batch `step`: consecutive slices of per-epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:  # step is 1-based
        begin, end = (step - 1) * self.batch_size, step * self.batch_size  # positions in the endless stream
        parts = []
        for epoch in range(begin // self.n, (end - 1) // self.n + 1):
            lo, hi = max(begin, epoch * self.n), min(end, (epoch + 1) * self.n)
            parts.append(self._perm(epoch)[lo - epoch * self.n : hi - epoch * self.n])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def evaluate(model: IGPT, ids: torch.Tensor, batch_size: int = 128, seed: int = 0, *, rank: int = 0, world: int = 1,
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


# -- one optimizer step (also used by benchmarks/training.py) --------------------------------------


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the paper's β = (0.9, β2); fused kernels on CUDA.

    Weight decay (if any) applies to matrices only — tensors with >= 2 dimensions: linear and
    embedding weights — never to norm gains or biases, whose scale decay would only pull to zero.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": 0.0}]  # no decay (the default): one group, as resume states hold
    if tc.weight_decay:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, tc.beta2),
                             fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of module's state dict on the CPU (cloned), e.g. the best weights so far: it costs
    no device memory and later steps cannot change it."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def forward_backward(net, micro_batches, *, autocast=None, seeds=None, no_sync=None) -> torch.Tensor:
    """Accumulate the gradients of the mean loss over micro-batches (each scaled by 1/n before backward).

    seeds[i] seeds torch's generators before micro-batch i (BERT masks); no_sync is DDP's context
    manager, used on every micro-batch but the last. Returns the mean loss as a detached tensor on
    the device: nothing is read back, so the host never waits for the device here.
    """
    n = len(micro_batches)
    total = None
    for micro, batch in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[micro])
        quiet = no_sync is not None and micro < n - 1
        with autocast or nullcontext(), no_sync() if quiet else nullcontext():
            _, loss = net(batch, targets=batch)
            (loss / n).backward()
        part = loss.detach() / n
        total = part if total is None else total + part
    return total


def optimizer_update(model: torch.nn.Module, optimizer, grad_clip: float) -> None:
    """Clip the gradient norm (if grad_clip), step, and free the gradients."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Dense bf16 tensor-core peaks (FLOP/s per GPU) for model-FLOPs utilisation; other devices show none.
_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12)]


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if re.search(rf"\b{key}\b", name)), None)


def model_flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token, PaLM's convention: 6 × (non-embedding parameters) + 12 × layers × width × T."""
    d, layers = config.n_embd, config.n_layer
    weights = layers * 12 * d * d + config.n_colors * d  # blocks' matrices + output head
    return 6 * weights + 12 * layers * d * config.n_positions


# -- the loop: set up, step, report and save, stop ---------------------------------------------------


@dataclass
class _Trainer:
    """What one process holds while it trains a run (made by `_set_up`)."""

    run: Run
    tc: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: IGPT  # whose weights are saved; under --fsdp sharded in place, each process holding its part
    net: torch.nn.Module  # what a step calls: the model, DDP around it, or torch.compile of either
    optimizer: torch.optim.Optimizer
    train_ids: torch.Tensor  # (N, T) on the host: int16 ids in memory, or a ShardSplit read from disk
    val_ids: torch.Tensor  # (eval_images, T) on the device
    micro_batch: int  # images per process per micro-step
    autocast: object  # bf16 autocast on CUDA, else a no-op context
    start: int = 0  # the step training continues from (0, or the step of the resumed state)
    completed: int = 0  # last step whose optimizer update is done
    updating: bool = False  # inside optimizer_update: the weights are half-way between two steps
    saved: int | None = None  # step of the last resume state written by this process's training

    @cached_property
    def checkpoint_steps(self) -> set[int]:
        return set(self.tc.checkpoint_steps())

    @property
    def resume_dir(self) -> Path:
        return self.run.path / "resume"


def _set_up(run: Run, resume: bool, data_dir: Path | None, runtime: TrainConfig | None) -> _Trainer:
    """Start this process's part of training: device, data, model (wrapped for DDP / FSDP), optimizer,
    and the resumed state if asked."""
    info = run.info
    config = ModelConfig.from_dict(info["model_config"])
    tc = TrainConfig.from_dict(info["train_config"])
    if runtime is not None:
        tc = replace(tc, **{name: getattr(runtime, name) for name in RUNTIME_SETTINGS})
    rank, world = init_from_env()
    device = pick_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    micro_batch = _check_processes(tc, world)
    train_ids, val_ids = _token_ids(run, config, tc, device, data_dir)
    if world > 1:
        dist.barrier(group=patient_group())  # the slowest process has loaded the data (patiently)
    model, net = _build_model(config, tc, world, device)
    t = _Trainer(run, tc, rank, world, device, model, net, make_optimizer(model, tc, device), train_ids, val_ids,
                 micro_batch, torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    log_file = run.path / "metrics.jsonl"
    if resume:
        t.start = t.completed = t.saved = _load_resume(t)
        if rank == 0:
            _truncate_metrics(run, t.start)
    elif rank == 0 and log_file.exists():
        log_file.unlink()
    return t


def _check_processes(tc: TrainConfig, world: int) -> int:
    """Images per process per micro-step, if `world` processes can run this config."""
    micro_batch, rem = divmod(tc.batch_size, tc.grad_accum * world)
    if rem or micro_batch == 0:
        raise ConfigError(f"batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) × processes ({world})")
    if tc.fsdp and world == 1:
        raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                          "(N ≥ 2), or train without --fsdp on one process")
    return micro_batch


def _token_ids(run: Run, config: ModelConfig, tc: TrainConfig, device, data_dir) -> tuple:
    """(training ids on the host, validation ids on the device): the run's dataset through its palette.

    A dataset name is tokenised here, into memory. `shards:DIR` stays on disk: the training ids are
    a `ShardSplit`, whose rows (`ids[indices]`) are read from memory-mapped shards, so each process
    reads only its share of each batch and memory does not grow with the dataset.
    """
    info, palette = run.info, run.palette
    shards_dir = shards_path(info["dataset"])
    if shards_dir is not None:
        shards = open_shards(shards_dir)
        shards.check_palette(palette, f"run {run.name!r}")
        train_ids, val_ids = shards.split("train"), shards.split("val")
        return train_ids, val_ids[np.arange(min(tc.eval_images, len(val_ids)))].to(device)
    data_dir = data_dir or info.get("data_dir")
    train_images = load_dataset(info["dataset"], "train", data_dir=data_dir, seed=tc.seed, resolution=config.image_size)
    val_images = load_dataset(info["dataset"], "val", data_dir=data_dir, seed=tc.seed, resolution=config.image_size)
    # int16 ids: 2 bytes a pixel in host memory (ImageNet-32: 2.7 GB, not 10.7); int64 per batch on the device
    train_ids = torch.from_numpy(palette.encode(train_images.images, config.image_size).astype(np.int16))
    val_ids = torch.from_numpy(palette.encode(val_images.images[: tc.eval_images], config.image_size)).to(device)
    return train_ids, val_ids


def _build_model(config: ModelConfig, tc: TrainConfig, world: int, device) -> tuple[IGPT, torch.nn.Module]:
    """(the model, the module a step calls). The same initial weights on every process, and for any
    number of processes: built from the seed on the host, then moved (or, under FSDP, sharded) to the device."""
    torch.manual_seed(tc.seed)
    model = IGPT(config)
    model.gradient_checkpointing = tc.activation_checkpointing
    net = model
    if tc.fsdp:
        _shard(model, device, world)
    else:
        model.to(device)
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    return model, net


def _shard(model: IGPT, device: torch.device, world: int) -> None:
    """Fully sharded data parallel (FSDP2, `fully_shard`): every process keeps 1/world of each weight, its
    gradient and its Adam moments. Each Block is one unit: its weights are all-gathered just before it
    runs (forward, and again in backward) and freed after; gradients are reduce-scattered, so each
    process keeps only its part. The root unit holds the embeddings, the final norm and the head. On
    GPUs the gathered weights are bf16 and gradients are reduced in fp32; the kept shards stay fp32."""
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # host-built weights move to the device shard by shard


def _train_step(t: _Trainer, step: int, order: _BatchOrder, signals: StopSignals, saves: SaveSchedule):
    """Forward, backward and update of optimizer step `step`. Returns (mean loss over all processes,
    flags [stop requested anywhere, save due by rank 0's clock] or None on one process), as device tensors."""
    set_lr(t.optimizer, lr_at(step, t.tc))
    local = order.indices(step)[t.rank :: t.world]
    batches = [t.train_ids[idx].to(t.device, non_blocking=True).long() for idx in local.split(t.micro_batch)]
    seeds = [t.tc.seed * 1_000_003 + step * 1009 + t.rank * 31 + micro for micro in range(len(batches))]
    ddp = t.net if isinstance(t.net, torch.nn.parallel.DistributedDataParallel) else None  # (FSDP syncs every micro-step)
    loss = forward_backward(t.net, batches, autocast=t.autocast, seeds=seeds, no_sync=ddp.no_sync if ddp else None)
    flags = None
    if t.world > 1:  # one collective for the mean loss, "a process was asked to stop" and "time to save"
        stop, save = float(signals.requested), float(t.rank == 0 and saves.time_due())
        packed = torch.stack([loss, torch.full_like(loss, stop), torch.full_like(loss, save)])  # fills: no host-to-device copy
        dist.all_reduce(packed)
        loss, flags = packed[0] / t.world, packed[1:]
    t.updating = True
    optimizer_update(t.model, t.optimizer, t.tc.grad_clip)
    t.updating = False
    t.completed = step
    return loss, flags


class _MetricsLog:
    """metrics.jsonl, written by rank 0: one row per step (train loss, lr), plus the val loss on steps that
    evaluated. Losses wait on the device until a flush reads them back together (a read makes the host wait)."""

    def __init__(self, path: Path, tc: TrainConfig, writer: bool):
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
            rows[-1].update(val_loss=self.last_val, val_bpd=bits_per_dim(self.last_val))
        if self.writer:
            append_jsonl(self.path, rows)
        self.pending = []


class _ProgressBar:
    """Rank 0's tqdm bar: loss, val loss, tokens/s of the global batch, and MFU on known GPUs."""

    def __init__(self, t: _Trainer):
        self.bar = progress_bar(True, total=t.tc.steps, initial=t.start, desc=f"training {t.run.name}", unit="step")
        self.config, self.world, self.peak = t.model.config, t.world, _peak_flops(t.device)
        self.tokens_per_step = t.tc.batch_size * self.config.n_positions
        self.window = (t.start, time.perf_counter())  # steps and time since the last report

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


def train(run: Run, *, resume: bool = False, progress: bool = True, on_step=None, data_dir: Path | None = None,
          runtime: TrainConfig | None = None) -> dict:
    """Train `run` to its configured number of steps; returns a summary dict.

    on_step(step, loss) is called after every optimizer step (rank 0; loss is a device tensor);
    raising KeyboardInterrupt from it, pressing Ctrl-C or sending SIGTERM saves a resumable state
    and stops (KeyboardInterrupt propagates). Under torchrun, a lost process raises `IgptError`.
    Besides every checkpoint, the resume state is saved every `save_every` (steps or wall time).
    runtime: take the RUNTIME_SETTINGS from this config instead of the run's (e.g. on --resume).
    """
    t = _set_up(run, resume, data_dir, runtime)
    log = _MetricsLog(run.path / "metrics.jsonl", t.tc, writer=t.rank == 0)
    order = _BatchOrder(len(t.train_ids), t.tc.batch_size, t.tc.seed)
    saves = SaveSchedule(t.tc.save_every)
    bar = _ProgressBar(t) if progress and t.rank == 0 else None
    t0 = time.perf_counter()
    t.model.train()
    with StopSignals() as signals:
        try:
            for step in range(t.start + 1, t.tc.steps + 1):
                loss, flags = _train_step(t, step, order, signals, saves)
                log.pending.append(loss)
                if _report_and_save(t, step, flags, log, saves, signals, bar):
                    raise KeyboardInterrupt  # every process stops after the same step, its state saved
                if bar is not None:
                    bar.advance()
                if on_step is not None and t.rank == 0:
                    on_step(step, loss)
        except KeyboardInterrupt:
            _save_alone(t, log)
            raise
        except (RuntimeError, dcp.CheckpointException) as err:  # (the latter: a collective failed while saving)
            if t.world == 1 or not is_peer_failure(err):
                raise
            signals.ignore_sigterm_after()  # torchrun's SIGTERM must not cut off the message below
            try:
                _save_alone(t, log)
            except Exception:  # noqa: BLE001 - the lost process matters more
                pass
            raise IgptError(lost_peers_message(err, t.rank, t.completed + 1, t.saved, run)) from err
        finally:
            if bar is not None:
                bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "run": run.name,
        "path": str(run.path.resolve()),
        "steps": t.tc.steps,
        "val_loss": log.last_val,
        "val_bpd": None if log.last_val is None else bits_per_dim(log.last_val),
        "unigram_val_loss": run.info.get("unigram_val_loss"),
        "tokens_per_second": t.tc.batch_size * t.model.config.n_positions * (t.tc.steps - t.start) / max(elapsed, 1e-9),
        "seconds": elapsed,
        "checkpoints": run.checkpoints(),
        "processes": t.world,
    }


def _report_and_save(t: _Trainer, step: int, flags, log: _MetricsLog, saves: SaveSchedule, signals: StopSignals,
                     bar: _ProgressBar | None) -> bool:
    """After step `step`: log, evaluate, checkpoint and save the resume state where due (every process
    decides the same). Returns whether training stops here (a stop signal reached some process)."""
    tc = t.tc
    is_checkpoint = step in t.checkpoint_steps
    is_eval = is_checkpoint or step % tc.eval_every == 0
    flush = is_eval or len(log.pending) >= 10 or step == tc.steps or saves.step_due(step)
    if flags is None:  # one process: its own signals and clock
        stop, save = signals.requested, saves.time_due()
    elif t.device.type == "cpu" or flush:  # the same answer on every process; on a GPU read only where the host waits anyway
        stop, save = (bool(flag) for flag in flags.tolist())
    else:
        stop = save = False
    stop = stop and step < tc.steps
    save = save or stop or is_checkpoint or saves.step_due(step)
    if not (flush or save):
        return False
    losses = log.losses()
    now = time.perf_counter()
    if is_eval:
        log.last_val = evaluate(t.model, t.val_ids, seed=tc.seed, rank=t.rank, world=t.world, autocast=t.autocast)
        log.last_eval = step
    log.write(step, losses)
    if is_checkpoint:
        state = _full_state_dict(t.model, sharded=tc.fsdp)  # under FSDP, every process sends rank 0 its shards
        if t.rank == 0:
            save_checkpoint(t.run.checkpoint_path(step), t.model, t.run.palette, state_dict=state, step=step,
                            val_loss=log.last_val)
    if save:
        _save_resume(t, step)
        saves.saved()
    if t.world > 1 and (is_checkpoint or save):
        dist.barrier()  # the files exist before any process goes on (or returns)
    if bar is not None:
        bar.show(step, losses[-1], log.last_val, now)
    return stop


def _full_state_dict(model: IGPT, sharded: bool) -> dict[str, torch.Tensor]:
    """All the weights, as one process holds them (under FSDP: gathered on rank 0 and on the host; the
    other processes get {})."""
    if not sharded:
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_alone(t: _Trainer, log: _MetricsLog) -> None:
    """When training stops without the others (Ctrl-C twice, on_step raising, a lost process): rank 0
    logs the losses it has and, if it can alone, saves a resume state at the last finished step."""
    if t.rank == 0:
        log.write(t.completed)
        if not t.updating and not t.tc.fsdp and t.saved != t.completed:  # FSDP: the others hold the rest
            _save_resume(t, t.completed)


# -- the resume state ---------------------------------------------------------------------------------


def _save_resume(t: _Trainer, step: int) -> None:
    """Save what `--resume` needs to continue after `step`: weights and optimizer state.

        resume/step_0000120/   model.safetensors + optimizer.pt (one process, DDP: rank 0 writes)
                               or, under FSDP, DCP shards: each process writes its own part at once
        resume/step.json       {"step": 120, "folder": "step_0000120"}

    The folder is written under a temporary name and renamed when complete; step.json is replaced
    (atomically) only then, and older folders are deleted only after that: killed at any moment
    (kill -9 included), resume/ still holds one complete state that step.json names.
    """
    folder = t.resume_dir / f"step_{step:07d}"
    tmp = t.resume_dir / f".{folder.name}.tmp"
    if t.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
        tmp.mkdir(parents=True)
    if t.tc.fsdp:
        dist.barrier()  # the fresh temp folder exists before anyone writes into it
        model_state, optimizer_state = get_state_dict(t.model, t.optimizer)  # this process's shards
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)  # returns when all wrote
    elif t.rank == 0:
        tensors = {k: v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
        atomic_write(tmp / "model.safetensors", lambda path: save_file(tensors, path))  # (flushed to disk)
        atomic_write(tmp / "optimizer.pt", lambda path: torch.save({"step": step, "optimizer": t.optimizer.state_dict()}, path))
    if t.rank == 0:
        if folder.exists():  # complete (it was renamed into place) and of this same step: keep it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
        atomic_write_json(t.resume_dir / "step.json", {"step": step, "folder": folder.name})
        for old in t.resume_dir.iterdir():  # older states, and leftovers of interrupted saves
            if old.name not in (folder.name, "step.json"):
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
    t.saved = step


def _load_resume(t: _Trainer) -> int:
    """Load the saved weights and optimizer state into t's model and optimizer; returns their step.

    A resume state is the run's own working file, not one to share: DCP's index (FSDP) is a pickle.
    Checkpoints (safetensors) are the files to share."""
    try:
        pointer = json.loads((t.resume_dir / "step.json").read_text())
        step, folder = pointer["step"], t.resume_dir / pointer.get("folder", ".")  # ".": saved before per-step folders
        if t.tc.fsdp:
            model_state, optimizer_state = get_state_dict(t.model, t.optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)  # reshards if need be
            set_state_dict(t.model, t.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        else:
            state = torch.load(folder / "optimizer.pt", map_location=t.device, weights_only=True)
            if state["step"] != step:
                raise ValueError("model and optimizer state are from different steps")
            t.model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(t.device)))
            t.optimizer.load_state_dict(state["optimizer"])
    except FileNotFoundError:
        raise IgptError(f"nothing to resume in {t.run.name!r}: no saved state yet; train without --resume") from None
    except (ValueError, KeyError, RuntimeError, dcp.CheckpointException) as err:
        raise IgptError(f"the resume state in {t.resume_dir} is damaged ({_first_line(err)}); "
                        "train without --resume") from None
    return step


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _truncate_metrics(run: Run, step: int) -> None:
    """Drop log lines after the resumed step, so the curve continues without duplicates."""
    rows = [row for row in run.metrics() if row["step"] <= step]
    write_jsonl(run.path / "metrics.jsonl", rows)
