"""Training: one loop for both objectives (it only calls the model's forward with targets).

`start_run` turns a dataset into a run folder (palette fitted on the training images, configs
recorded); `train` runs the loop on it. The loop is deterministic by construction — batch order is
a function of (seed, step) and the model's random masks are seeded by (seed, step, rank, micro-step)
— so a run resumed from its last saved state reproduces the uninterrupted loss curve exactly,
and `torchrun` with N processes sees the same global batches as one process.

Under `torchrun` every process runs this same code; distributed.py says how the processes share the
work, wait for each other and stop (a lost process, SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .data import load_dataset
from .distributed import StopSignals, init_from_env, is_peer_failure, lost_peers_message, patient_group
from .errors import ConfigError, IgptError, RunError
from .files import append_jsonl, atomic_write, atomic_write_json, write_jsonl
from .likelihood import bits_per_dim
from .model import IGPT, ModelConfig, preset
from .palette import Palette
from .progress import progress_bar
from .runs import Run, create_run, open_run, save_checkpoint
from .shards import open_shards, shards_path


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

    def checkpoint_steps(self) -> list[int]:
        if self.checkpoints is not None:
            return sorted({s for s in self.checkpoints if 1 <= s <= self.steps} | {self.steps})
        return sorted({max(1, round(s)) for s in np.geomspace(max(1, self.steps / 32), self.steps, 6)} | {self.steps})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
        if f.name not in ("device", "compile") and getattr(old_train, f.name) != getattr(train_config, f.name):
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
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    count = torch.zeros((), dtype=torch.float64, device=ids.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for i, batch in enumerate(ids.split(batch_size)):
        mask = None
        if model.config.objective == "bert":  # drawn for every batch, so each shard sees the masks of one process
            mask = (torch.rand(batch.shape, generator=generator) < model.config.mask_prob).to(batch.device)
        if i % world != rank:
            continue
        with autocast or nullcontext():
            _, loss = model(batch, targets=batch, mask=mask)
        weight = mask.sum() if mask is not None else batch.numel()
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


def train(run: Run, *, resume: bool = False, progress: bool = True, on_step=None, data_dir: Path | None = None) -> dict:
    """Train `run` to its configured number of steps; returns a summary dict.

    on_step(step, loss) is called after every optimizer step (rank 0; loss is a device tensor);
    raising KeyboardInterrupt from it, pressing Ctrl-C or sending SIGTERM saves a resumable state
    and stops (KeyboardInterrupt propagates). Under torchrun, a lost process raises `IgptError`.
    """
    info = run.info
    config = ModelConfig.from_dict(info["model_config"])
    tc = TrainConfig.from_dict(info["train_config"])
    rank, world = init_from_env()
    device = pick_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    micro_batch, rem = divmod(tc.batch_size, tc.grad_accum * world)
    if rem or micro_batch == 0:
        raise ConfigError(f"batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) × processes ({world})")

    palette = run.palette
    train_ids, val_ids = _token_ids(run, config, tc, device, data_dir)

    torch.manual_seed(tc.seed)  # same initial weights on every process
    model = IGPT(config).to(device)
    model.gradient_checkpointing = tc.activation_checkpointing
    optimizer = make_optimizer(model, tc, device)
    start = 0
    resume_dir = run.path / "resume"
    log_file = run.path / "metrics.jsonl"
    if resume:
        start = _load_resume(resume_dir, model, optimizer, device)
        if rank == 0:
            _truncate_metrics(run, start)
    elif rank == 0 and log_file.exists():
        log_file.unlink()

    net, ddp = model, None
    if world > 1:
        dist.barrier(group=patient_group())  # the slowest process has loaded the data (patiently)
        net = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    order = _BatchOrder(len(train_ids), tc.batch_size, tc.seed)
    checkpoint_steps = set(tc.checkpoint_steps())
    tokens_per_step = tc.batch_size * config.n_positions  # the global batch, all processes together
    peak = _peak_flops(device)
    bar = progress_bar(progress and rank == 0, total=tc.steps, initial=start, desc=f"training {run.name}", unit="step")

    pending: list[torch.Tensor] = []  # losses of finished steps not yet read back (reading makes the host wait)

    def write_pending(upto: int, losses: list[float] | None = None) -> None:
        """Rank 0 appends the pending losses (steps ..upto) to the log, with the val loss if evaluated at upto."""
        nonlocal pending
        losses = (torch.stack(pending).tolist() if pending else []) if losses is None else losses
        rows = [{"step": upto - len(losses) + 1 + i, "loss": loss, "lr": lr_at(upto - len(losses) + 1 + i, tc)}
                for i, loss in enumerate(losses)]
        if rows and last_eval == upto:
            rows[-1].update(val_loss=last_val, val_bpd=bits_per_dim(last_val))
        if rank == 0:
            append_jsonl(log_file, rows)
        pending = []

    completed = start  # last step whose optimizer update is done (and whose loss is in `pending` or the log)
    updating = False  # inside optimizer_update: the weights are half-way between two steps
    last_val, last_eval = None, None
    t0 = time.perf_counter()
    window = (start, t0)  # for the progress bar's throughput: steps and time since the last report
    model.train()
    with StopSignals() as signals:
        try:
            for step in range(start + 1, tc.steps + 1):
                set_lr(optimizer, lr_at(step, tc))
                local = order.indices(step)[rank::world]
                batches = [train_ids[idx].to(device, non_blocking=True).long() for idx in local.split(micro_batch)]
                seeds = [tc.seed * 1_000_003 + step * 1009 + rank * 31 + micro for micro in range(len(batches))]
                loss = forward_backward(net, batches, autocast=autocast, seeds=seeds,
                                        no_sync=ddp.no_sync if ddp is not None else None)
                stop_flag = None
                if world > 1:  # one collective for the mean loss and for "a process was asked to stop"
                    packed = torch.stack([loss, torch.full((), float(signals.requested), device=device)])
                    dist.all_reduce(packed)
                    loss, stop_flag = packed[0] / world, packed[1]
                updating = True
                optimizer_update(model, optimizer, tc.grad_clip)
                updating = False
                completed = step
                pending.append(loss)

                is_checkpoint = step in checkpoint_steps
                is_eval = is_checkpoint or step % tc.eval_every == 0
                flush = is_eval or len(pending) >= 10 or step == tc.steps
                if stop_flag is None:
                    stop = signals.requested
                else:  # the same answer on every process; on a GPU read only where the host waits anyway
                    stop = bool(stop_flag.item()) if device.type == "cpu" or flush else False
                stop = stop and step < tc.steps
                if flush or stop:
                    losses = torch.stack(pending).tolist()  # the host waits for the device here, and only here
                    now = time.perf_counter()
                    if is_eval:
                        last_val = evaluate(model, val_ids, seed=tc.seed, rank=rank, world=world, autocast=autocast)
                        last_eval = step
                    write_pending(step, losses)
                    if rank == 0 and is_checkpoint:
                        save_checkpoint(run.checkpoint_path(step), model, palette, step=step, val_loss=last_val)
                        _save_resume(resume_dir, model, optimizer, step)
                    if world > 1 and is_checkpoint:
                        dist.barrier()  # the checkpoint exists before any process goes on (or returns)
                    if bar is not None:
                        rate = tokens_per_step * (step - window[0]) / max(now - window[1], 1e-9)
                        shown = {"loss": f"{losses[-1]:.3f}", "val": None if last_val is None else f"{last_val:.3f}",
                                 "tok_s": f"{rate:,.0f}"}
                        if peak:  # model FLOPs utilisation, over all processes' GPUs
                            shown["mfu"] = f"{rate * model_flops_per_token(config) / (peak * world):.0%}"
                        bar.set_postfix(shown)
                    window = (step, time.perf_counter())  # the next window excludes this evaluation and checkpoint
                if stop:
                    raise KeyboardInterrupt  # every process stops after the same step; handled below
                if bar is not None:
                    bar.update(1)
                if on_step is not None and rank == 0:
                    on_step(step, loss)
        except KeyboardInterrupt:
            # Keep what is known: the losses not yet logged and a resumable state at the last finished step.
            if rank == 0:
                write_pending(completed)
                if not updating:
                    _save_resume(resume_dir, model, optimizer, completed)
            raise
        except RuntimeError as err:
            if world == 1 or not is_peer_failure(err):
                raise
            saved = None
            if rank == 0 and not updating:
                try:
                    write_pending(completed)
                    _save_resume(resume_dir, model, optimizer, completed)
                    saved = completed
                except Exception:  # noqa: BLE001 - the error below matters more
                    pass
            raise IgptError(lost_peers_message(err, rank, completed + 1, saved, run)) from err
        finally:
            if bar is not None:
                bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "run": run.name,
        "path": str(run.path.resolve()),
        "steps": tc.steps,
        "val_loss": last_val,
        "val_bpd": None if last_val is None else bits_per_dim(last_val),
        "unigram_val_loss": info.get("unigram_val_loss"),
        "tokens_per_second": tokens_per_step * (tc.steps - start) / max(elapsed, 1e-9),
        "seconds": elapsed,
        "checkpoints": run.checkpoints(),
        "processes": world,
    }


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


def _save_resume(folder: Path, model: IGPT, optimizer, step: int) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write(folder / "optimizer.pt", lambda tmp: torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp))
    atomic_write_json(folder / "step.json", {"step": step})  # written last: marks the pair complete


def _load_resume(folder: Path, model: IGPT, optimizer, device) -> int:
    try:
        step = json.loads((folder / "step.json").read_text())["step"]
        state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
        if state["step"] != step:
            raise ValueError("model and optimizer state are from different steps")
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
    except FileNotFoundError:
        raise IgptError(f"nothing to resume in {folder.parent.name!r}: no saved state yet; train without --resume") from None
    except (ValueError, KeyError, RuntimeError) as err:
        raise IgptError(f"the resume state in {folder} is damaged ({err}); train without --resume") from None
    return step


def _truncate_metrics(run: Run, step: int) -> None:
    """Drop log lines after the resumed step, so the curve continues without duplicates."""
    rows = [row for row in run.metrics() if row["step"] <= step]
    write_jsonl(run.path / "metrics.jsonl", rows)
