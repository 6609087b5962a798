"""Pre-training a run: `start_run` turns a dataset into a run folder (palette fitted on the training
images, configs recorded); `train` drives the one training loop (loop.py) on it with the model's own
generative loss, and callbacks that log, evaluate, checkpoint and save the resume state.

Training is deterministic by construction — batch order is a function of (seed, step) and the model's
random masks are seeded by (seed, step, rank, micro-step) — so a run resumed from its last saved state
reproduces the uninterrupted loss curve exactly, and `torchrun` with N processes sees the same global
batches as one process (with DDP, each process holding the whole model, or with `fsdp`, each holding
1/N of its weights, gradients and Adam state). The resume state is saved at every checkpoint and every
`save_every` steps or minutes.

Under `torchrun` every process runs this same code; distributed.py says how the processes share the
work, wait for each other and stop (a lost process, SIGINT/SIGTERM).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..data import load_dataset
from ..device import pick_device
from ..errors import ConfigError, IgptError, LostPeersError, RunError
from ..likelihood import bits_per_token
from ..model import IGPT, ModelConfig, preset
from ..palette import Palette
from ..runs import Run, create_run, open_run, save_checkpoint
from ..data.shards import open_shards, shards_path
from .config import RUNTIME_SETTINGS, TrainConfig, check_processes
from ..distributed import (StopSignals, full_state_dict, init_from_env, is_peer_failure, lost_peers_message,
                          patient_group, place_model)
from .loop import Callback, Trainer, make_optimizer
from .metrics import MetricsLog, ProgressBar, evaluate
from .resume import load_resume, save_resume, truncate_metrics
from .schedule import SaveSchedule, lr_at


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
    check_processes(train_config, world)  # before anything is written
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


# -- what one process holds while it trains ----------------------------------------------------------


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



@dataclass
class TrainingProcess:
    """What one process holds while it pre-trains a run (made by `set_up`)."""

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
    saved: int | None = None  # step of the last resume state written by this process's training

    @cached_property
    def checkpoint_steps(self) -> set[int]:
        return set(self.tc.checkpoint_steps())

    @property
    def resume_dir(self) -> Path:
        return self.run.path / "resume"

    def save_resume(self, step: int) -> None:
        save_resume(self.resume_dir, step, self.model, self.optimizer, rank=self.rank, fsdp=self.tc.fsdp)
        self.saved = step

    def micro_batches(self, order: _BatchOrder, step: int) -> tuple[list[torch.Tensor], list[int]]:
        """This process's micro-batches of global batch `step`, and the seeds of their random masks."""
        local = order.indices(step)[self.rank :: self.world]
        batches = [self.train_ids[idx].to(self.device, non_blocking=True).long() for idx in local.split(self.micro_batch)]
        seeds = [self.tc.seed * 1_000_003 + step * 1009 + self.rank * 31 + micro for micro in range(len(batches))]
        return batches, seeds


def set_up(run: Run, resume: bool, data_dir: Path | None, runtime: TrainConfig | None) -> TrainingProcess:
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
    micro_batch = check_processes(tc, world)
    train_ids, val_ids = token_ids(run, config, tc, device, data_dir)
    if world > 1:
        dist.barrier(group=patient_group())  # the slowest process has loaded the data (patiently)
    # The same initial weights on every process, and for any number of processes: built from the seed on the host.
    torch.manual_seed(tc.seed)
    model = IGPT(config)
    model.gradient_checkpointing = tc.activation_checkpointing
    net = place_model(model, device, world, tc.fsdp)
    if tc.compile:
        net = torch.compile(net)
    p = TrainingProcess(run, tc, rank, world, device, model, net, make_optimizer(model, tc, device), train_ids, val_ids,
                        micro_batch, torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    log_file = run.path / "metrics.jsonl"
    if resume:
        p.start = p.saved = load_resume(p.resume_dir, run.name, model, p.optimizer, device=device, fsdp=tc.fsdp)
        if rank == 0:
            truncate_metrics(run, p.start)
    elif rank == 0 and log_file.exists():
        log_file.unlink()
    return p


def token_ids(run: Run, config: ModelConfig, tc: TrainConfig, device, data_dir) -> tuple:
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




# -- the loop's callbacks, and train() ------------------------------------------------------------------


class RunKeeper(Callback):
    """Pre-training's callbacks: after backward, under torchrun, one all-reduce shares the mean loss and two
    flags (a process was asked to stop; rank 0's clock says it is time to save). After each step: the
    metrics log, evaluation, checkpoints and the resume state where due (every process decides the same),
    the progress bar, and the caller's on_step."""

    def __init__(self, p: TrainingProcess, signals: StopSignals, progress: bool, on_step=None):
        self.p, self.signals, self.on_step_hook = p, signals, on_step
        self.log = MetricsLog(p.run.path / "metrics.jsonl", p.tc, writer=p.rank == 0)
        self.saves = SaveSchedule(p.tc.save_every)
        self.bar = ProgressBar(p.run.name, p.model.config, p.tc, p.start, p.world, p.device) \
            if progress and p.rank == 0 else None
        self.flags = None  # [stop requested anywhere, save due by rank 0's clock] of the last step, on the device

    def after_backward(self, step, losses):
        if self.p.world > 1:
            loss = losses["loss"]
            stop, save = float(self.signals.requested), float(self.p.rank == 0 and self.saves.time_due())
            packed = torch.stack([loss, torch.full_like(loss, stop), torch.full_like(loss, save)])  # fills: no host-to-device copy
            dist.all_reduce(packed)
            losses, self.flags = {**losses, "loss": packed[0] / self.p.world}, packed[1:]
        return losses

    def on_step(self, step, losses):
        self.log.pending.append(losses["loss"])
        if self.report_and_save(step):
            return True  # every process stops after the same step, its state saved
        if self.bar is not None:
            self.bar.advance()
        if self.on_step_hook is not None and self.p.rank == 0:
            self.on_step_hook(step, losses["loss"])
        return False

    def report_and_save(self, step: int) -> bool:
        """Log, evaluate, checkpoint and save the resume state where due after `step`. Returns whether
        training stops here (a stop signal reached some process)."""
        p, tc, log = self.p, self.p.tc, self.log
        is_checkpoint = step in p.checkpoint_steps
        is_eval = is_checkpoint or step % tc.eval_every == 0
        flush = is_eval or len(log.pending) >= 10 or step == tc.steps or self.saves.step_due(step)
        if self.flags is None:  # one process: its own signals and clock
            stop, save = self.signals.requested, self.saves.time_due()
        elif p.device.type == "cpu" or flush:  # the same answer on every process; on a GPU read only where the host waits anyway
            stop, save = (bool(flag) for flag in self.flags.tolist())
        else:
            stop = save = False
        stop = stop and step < tc.steps
        save = save or stop or is_checkpoint or self.saves.step_due(step)
        if not (flush or save):
            return False
        losses = log.losses()
        now = time.perf_counter()
        if is_eval:
            log.last_val = evaluate(p.model, p.val_ids, seed=tc.seed, rank=p.rank, world=p.world, autocast=p.autocast)
            log.last_eval = step
        log.write(step, losses)
        if is_checkpoint:
            state = full_state_dict(p.model, sharded=tc.fsdp)  # under FSDP, every process sends rank 0 its shards
            if p.rank == 0:
                save_checkpoint(p.run.checkpoint_path(step), p.model, p.run.palette, state_dict=state, step=step,
                                val_loss=log.last_val)
        if save:
            p.save_resume(step)
            self.saves.saved()
        if p.world > 1 and (is_checkpoint or save):
            dist.barrier()  # the files exist before any process goes on (or returns)
        if self.bar is not None:
            self.bar.show(step, losses[-1], log.last_val, now)
        return stop

    def save_alone(self, trainer: Trainer) -> None:
        """When training stops without the others (Ctrl-C twice, on_step raising, a lost process): rank 0
        logs the losses it has and, if it can alone, saves a resume state at the last finished step."""
        p = self.p
        if p.rank == 0:
            self.log.write(trainer.completed)
            if not trainer.updating and not p.tc.fsdp and p.saved != trainer.completed:  # FSDP: the others hold the rest
                p.save_resume(trainer.completed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(run: Run, *, resume: bool = False, progress: bool = True, on_step=None, data_dir: Path | None = None,
          runtime: TrainConfig | None = None) -> dict:
    """Train `run` to its configured number of steps; returns a summary dict.

    on_step(step, loss) is called after every optimizer step (rank 0; loss is a device tensor);
    raising KeyboardInterrupt from it, pressing Ctrl-C or sending SIGTERM saves a resumable state
    and stops (KeyboardInterrupt propagates). Under torchrun, a lost process raises `LostPeersError` (an `IgptError`).
    Besides every checkpoint, the resume state is saved every `save_every` (steps or wall time).
    runtime: take the RUNTIME_SETTINGS from this config instead of the run's (e.g. on --resume).
    """
    p = set_up(run, resume, data_dir, runtime)
    order = _BatchOrder(len(p.train_ids), p.tc.batch_size, p.tc.seed)
    ddp = p.net if isinstance(p.net, torch.nn.parallel.DistributedDataParallel) else None  # (FSDP syncs every micro-step)
    t0 = time.perf_counter()
    p.model.train()
    with StopSignals() as signals:
        keeper = RunKeeper(p, signals, progress, on_step)
        trainer = Trainer(p.model, p.optimizer, lr_at=lambda step: lr_at(step, p.tc), grad_clip=p.tc.grad_clip,
                          net=p.net, autocast=p.autocast, no_sync=ddp.no_sync if ddp else None, callbacks=[keeper])
        try:
            if trainer.fit(lambda step: p.micro_batches(order, step), p.start + 1, p.tc.steps) < p.tc.steps:
                raise KeyboardInterrupt  # a stop signal: the state is saved
        except KeyboardInterrupt:
            keeper.save_alone(trainer)
            raise
        except (RuntimeError, dcp.CheckpointException) as err:  # (the latter: a collective failed while saving)
            if p.world == 1 or not is_peer_failure(err):
                raise
            signals.ignore_sigterm_after()  # torchrun's SIGTERM must not cut off the message below
            try:
                keeper.save_alone(trainer)
            except Exception:  # noqa: BLE001 - the lost process matters more
                pass
            raise LostPeersError(lost_peers_message(err, p.rank, trainer.completed + 1, p.saved, run.checkpoints())) from err
        finally:
            keeper.close()
    return _summary(p, keeper.log, time.perf_counter() - t0)


def _summary(p: TrainingProcess, log: MetricsLog, elapsed: float) -> dict:
    """What `train` returns (and `igpt train --json` prints)."""
    run, tc = p.run, p.tc
    return {
        "run": run.name,
        "path": str(run.path.resolve()),
        "steps": tc.steps,
        "val_loss": log.last_val,
        "val_bits_per_token": None if log.last_val is None else bits_per_token(log.last_val),
        "unigram_val_loss": run.info.get("unigram_val_loss"),
        "tokens_per_second": tc.batch_size * p.model.config.n_positions * (tc.steps - p.start) / max(elapsed, 1e-9),
        "seconds": elapsed,
        "checkpoints": run.checkpoints(),
        "processes": p.world,
    }
