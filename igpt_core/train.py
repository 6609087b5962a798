"""Training: one loop for both objectives (it only calls the model's forward with targets).

`start_run` turns a dataset into a run folder (palette fitted on the training images, configs
recorded); `train` runs the loop on it. The loop is deterministic by construction — batch order is
a function of (seed, step) and the model's random masks are seeded by (seed, step, rank, micro-step)
— so a run resumed from its last saved state reproduces the uninterrupted loss curve exactly,
and `torchrun` with N processes sees the same global batches as one process.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .data import load_dataset
from .errors import ConfigError, IgptError
from .model import IGPT, ModelConfig, preset
from .palette import Palette
from .runs import Run, atomic_write, atomic_write_json, bits_per_dim, create_run, open_run, save_checkpoint


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
    that ignores every other pixel would reach. Add-one smoothing so unseen colours cost finitely."""
    counts = np.bincount(train_ids.ravel(), minlength=n_colors) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids.ravel()].mean())


# -- making a run -----------------------------------------------------------------------------------


def start_run(
    name: str,
    dataset: str = "digits",
    preset_name: str = "tiny",
    objective: str = "ar",
    n_colors: int = 16,
    resolution: int | None = None,
    train_config: TrainConfig | None = None,
    model_overrides: dict | None = None,
    runs_dir: Path | None = None,
    data_dir: Path | None = None,
    overwrite: bool = False,
) -> Run:
    """Fit a palette on the dataset's training images and write a new run folder (no training yet)."""
    train_config = train_config or TrainConfig()
    data = load_dataset(dataset, "train", data_dir=data_dir, seed=train_config.seed, resolution=resolution)
    size = data.resolution
    palette = Palette.fit(data.images, n_colors, seed=train_config.seed)
    config = preset(preset_name, vocab_size=n_colors + 1, n_positions=size * size, objective=objective,
                    **(model_overrides or {}))
    val = load_dataset(dataset, "val", data_dir=data_dir, seed=train_config.seed, resolution=size)
    info = {
        "dataset": dataset,
        "preset": preset_name,
        "model_config": config.to_dict(),
        "train_config": asdict(train_config),
        "classes": data.classes,
        "data_dir": str(data_dir) if data_dir else None,
        "unigram_val_loss": unigram_loss(palette.encode(data.images, size), palette.encode(val.images, size), n_colors),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return create_run(runs_dir, name, info, palette, overwrite=overwrite)


def check_resume(run: Run, dataset: str, preset_name: str, objective: str, n_colors: int,
                 train_config: TrainConfig, model_overrides: dict | None) -> None:
    """Refuse to resume a run with settings that differ from the ones it was started with."""
    info = run.info
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
        positions = range((step - 1) * self.batch_size, step * self.batch_size)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in positions])


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


@torch.no_grad()
def evaluate(model: IGPT, ids: torch.Tensor, batch_size: int = 128, seed: int = 0) -> float:
    """Mean loss in nats/token over ids (N, T). BERT: over masked positions, masks seeded."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for batch in ids.split(batch_size):
        mask = None
        if model.config.objective == "bert":
            mask = (torch.rand(batch.shape, generator=generator) < model.config.mask_prob).to(batch.device)
        _, loss = model(batch, targets=batch, mask=mask)
        weight = mask.sum().item() if mask is not None else batch.numel()
        total += loss.item() * weight
        count += weight
    model.train(was_training)
    return total / max(count, 1)


def train(run: Run, *, resume: bool = False, progress: bool = True, on_step=None, data_dir: Path | None = None) -> dict:
    """Train `run` to its configured number of steps; returns a summary dict.

    on_step(step, loss) is called after every optimizer step (rank 0); raising KeyboardInterrupt
    from it (or pressing Ctrl-C) saves a resumable state and stops.
    """
    info = run.info
    config = ModelConfig.from_dict(info["model_config"])
    tc = TrainConfig.from_dict(info["train_config"])
    rank, world = _distributed()
    device = pick_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    micro_batch, rem = divmod(tc.batch_size, tc.grad_accum * world)
    if rem or micro_batch == 0:
        raise ConfigError(f"batch_size {tc.batch_size} must divide by grad_accum ({tc.grad_accum}) × processes ({world})")

    palette = run.palette
    data_dir = data_dir or info.get("data_dir")
    train_images = load_dataset(info["dataset"], "train", data_dir=data_dir, seed=tc.seed, resolution=config.image_size)
    val_images = load_dataset(info["dataset"], "val", data_dir=data_dir, seed=tc.seed, resolution=config.image_size)
    train_ids = torch.from_numpy(palette.encode(train_images.images, config.image_size))
    val_ids = torch.from_numpy(palette.encode(val_images.images[: tc.eval_images], config.image_size)).to(device)

    torch.manual_seed(tc.seed)  # same initial weights on every process
    model = IGPT(config).to(device)
    model.gradient_checkpointing = tc.activation_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, tc.beta2), weight_decay=tc.weight_decay,
                                  fused=device.type == "cuda")
    start = 0
    resume_dir = run.path / "resume"
    if resume:
        start = _load_resume(resume_dir, model, optimizer, device)
        _truncate_metrics(run, start) if rank == 0 else None
    elif rank == 0 and (run.path / "metrics.jsonl").exists():
        (run.path / "metrics.jsonl").unlink()

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    order = _BatchOrder(len(train_ids), tc.batch_size, tc.seed)
    checkpoint_steps = set(tc.checkpoint_steps())
    tokens_per_step = tc.batch_size * config.n_positions
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc=f"training {run.name}", unit="step", dynamic_ncols=True)
    pending: list[torch.Tensor] = []  # losses not yet read back (reading forces a device sync)
    log_file = run.path / "metrics.jsonl"
    completed = start  # last step whose optimizer update is done
    t0 = time.perf_counter()
    last_val = None
    model.train()
    try:
        for step in range(start + 1, tc.steps + 1):
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            local = order.indices(step)[rank::world]
            step_loss = torch.zeros((), device=device)
            for micro, idx in enumerate(local.split(micro_batch)):
                torch.manual_seed(tc.seed * 1_000_003 + step * 1009 + rank * 31 + micro)  # BERT masks, resumable
                batch = train_ids[idx].to(device, non_blocking=True)
                sync = micro == tc.grad_accum - 1
                with autocast, (nullcontext() if sync or world == 1 else net.no_sync()):
                    _, loss = net(batch, targets=batch)
                    (loss / tc.grad_accum).backward()
                step_loss += loss.detach() / tc.grad_accum
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            pending.append(step_loss)
            completed = step

            is_checkpoint = step in checkpoint_steps
            if is_checkpoint or step % tc.eval_every == 0 or len(pending) >= 10:
                losses = torch.stack(pending).tolist()
                rows = [{"step": step - len(losses) + 1 + i, "loss": loss, "lr": lr_at(step - len(losses) + 1 + i, tc)}
                        for i, loss in enumerate(losses)]
                pending = []
                if is_checkpoint or step % tc.eval_every == 0:
                    last_val = evaluate(model, val_ids, seed=tc.seed)
                    rows[-1].update(val_loss=last_val, val_bpd=bits_per_dim(last_val))
                if rank == 0:
                    with open(log_file, "a") as f:
                        f.writelines(json.dumps(row) + "\n" for row in rows)
                    if is_checkpoint:
                        save_checkpoint(run.checkpoint_path(step), model, palette, step=step, val_loss=last_val)
                        _save_resume(resume_dir, model, optimizer, step)
                    if bar is not None:
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{losses[-1]:.3f}", val=None if last_val is None else f"{last_val:.3f}",
                                        tok_s=f"{tokens_per_step * (step - start) / elapsed:,.0f}")
                if world > 1:
                    dist.barrier()  # no process runs ahead of a checkpoint being written
            if bar is not None:
                bar.update(1)
            if on_step is not None and rank == 0:
                on_step(step, step_loss)
    except KeyboardInterrupt:
        # Keep what is known: the losses not yet logged and a resumable state at the last finished step.
        if rank == 0:
            with open(log_file, "a") as f:
                for i, loss in enumerate(torch.stack(pending).tolist() if pending else []):
                    done = completed - len(pending) + 1 + i
                    f.write(json.dumps({"step": done, "loss": loss, "lr": lr_at(done, tc)}) + "\n")
            _save_resume(resume_dir, model, optimizer, completed)
        raise
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
    }


def _save_resume(folder: Path, model: IGPT, optimizer, step: int) -> None:
    from safetensors.torch import save_file

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
    atomic_write(run.path / "metrics.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in rows)))
