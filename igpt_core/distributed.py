"""Several training processes under `torchrun`: start-up, waiting for each other, and stopping cleanly.

Under `torchrun` every process runs the same code: rank 0 alone creates the run folder, writes the
metrics log and checkpoints; the others wait for it (barriers) and read what it wrote. A process
that dies or stops answering makes the others stop with a clear error after at most
$IGPT_DIST_TIMEOUT seconds (default 600) instead of hanging; the last checkpoint stays loadable and
rank 0 keeps a resumable state. SIGINT/SIGTERM (Ctrl-C, a scheduler's pre-emption) finish the
current step on every process, save a resumable state and stop; a second Ctrl-C stops at once.

Pre-training (pretrain.py) decides what to do; this module holds the torch.distributed and signal
plumbing it uses to do it, and how the model is spread over the processes (DDP or FSDP).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .errors import ConfigError, first_line

DEFAULT_TIMEOUT = 600  # seconds; override with $IGPT_DIST_TIMEOUT


def timeout_seconds() -> float:
    """Seconds a collective waits for a silent peer before failing: $IGPT_DIST_TIMEOUT, default 600."""
    text = os.environ.get("IGPT_DIST_TIMEOUT", "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"IGPT_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def init_from_env() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun.

    Collectives of the training loop give up on a silent peer after $IGPT_DIST_TIMEOUT seconds.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)  # CPU tensors too (e.g. --device cpu)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


_patient_groups: dict = {}


def patient_group():
    """A gloo group with a long timeout (max(IGPT_DIST_TIMEOUT, 2 h)) for start-up waits, where one
    process legitimately works much longer than the others: rank 0 fitting the palette of a big
    dataset, every process loading and encoding it. Made on first use (every process gets here in
    the same order: start_run, then train)."""
    default = dist.group.WORLD
    if default not in _patient_groups:
        _patient_groups[default] = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_seconds(), 7200)))
    return _patient_groups[default]


_PEER_FAILURE = re.compile(r"gloo|nccl|connection|timed out|timeout|peer|socket|broken pipe|closed", re.IGNORECASE)


def is_peer_failure(err: BaseException) -> bool:
    """Does this error come from a collective whose other side died or went silent?"""
    return isinstance(err, getattr(dist, "DistError", ())) or bool(_PEER_FAILURE.search(str(err)))


def lost_peers_message(err: BaseException, rank: int, step: int, saved: int | None, checkpoints: list[int]) -> str:
    """The error a process raises when a collective of `step` failed because another process is gone
    (checkpoints: the steps of the run's complete checkpoints)."""
    cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err))  # drop "[file.cc:123]"
    cause = re.split(r"\.\s", cause)[0].rstrip(".")[:300]  # the first sentence: what happened, not gloo's advice
    parts = [
        f"training process {rank} lost contact with the others during step {step} ({cause}):",
        f"another process died or stopped answering — see its output; a silent one is given up on after "
        f"IGPT_DIST_TIMEOUT={timeout_seconds():g} s.",
        f"Last checkpoint: {f'step {checkpoints[-1]}' if checkpoints else 'none yet'}"
        + (f"; resumable state saved at step {saved}." if saved is not None else "."),
        "Continue with the same command plus --resume.",
    ]
    return " ".join(parts)


class StopSignals:
    """While training: SIGINT/SIGTERM ask the loop to stop after the current step (the caller saves
    a resumable state). A second Ctrl-C more than 2 s after the first stops at once. Repeats within
    2 s are the same request (under torchrun, the terminal and the launcher both forward Ctrl-C).
    Only installed in the main thread (signal handlers can be set nowhere else)."""

    def __init__(self):
        self.requested = False
        self._since = 0.0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # no handlers here (e.g. an embedded interpreter): keep the defaults
                    pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        return False

    def ignore_sigterm_after(self) -> None:
        """Leave SIGTERM ignored when the block ends, for a process that is about to fail with an
        error to report: when one process dies, torchrun sends SIGTERM to the others a moment later,
        and a survivor killed by it before printing would stop without saying why."""
        if signal.SIGTERM in self._previous:
            self._previous[signal.SIGTERM] = signal.SIG_IGN

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.requested, self._since = True, now
        elif signum == signal.SIGINT and now - self._since > 2:
            raise KeyboardInterrupt


# -- the model across processes ------------------------------------------------------------------------


def place_model(model: torch.nn.Module, device: torch.device, world: int, fsdp: bool) -> torch.nn.Module:
    """Put `model` on `device` for `world` processes; returns the module a training step calls.

    One process: the model itself. DDP (several processes, not fsdp): every process holds the whole
    model, wrapped so that backward averages the gradients. FSDP: the model is sharded in place
    (`shard_model`) and is itself what a step calls.
    """
    if fsdp:
        shard_model(model, device, world)
        return model
    model.to(device)
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """Fully sharded data parallel (FSDP2, `fully_shard`): every process keeps 1/world of each weight, its
    gradient and its Adam moments. Each Block (`model.h`) is one unit: its weights are all-gathered just
    before it runs (forward, and again in backward) and freed after; gradients are reduce-scattered, so each
    process keeps only its part. The root unit holds the embeddings, the final norm and the head. On
    GPUs the gathered weights are bf16 and gradients are reduced in fp32; the kept shards stay fp32."""
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # host-built weights move to the device shard by shard


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """All the weights, as one process holds them (under FSDP: gathered on rank 0 and on the host; the
    other processes get {}). Every process must call it: under FSDP each sends rank 0 its shards."""
    if not sharded:
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
