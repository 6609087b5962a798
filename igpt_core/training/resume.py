"""The resume state of a run: what `--resume` needs to continue after a step (weights and optimizer state).

    resume/step_0000120/   model.safetensors + optimizer.pt (one process, DDP: rank 0 writes)
                           or, under FSDP, DCP shards: each process writes its own part at once
    resume/step.json       {"step": 120, "folder": "step_0000120"}

A resume state is the run's own working file, not one to share: DCP's index (FSDP) is a pickle.
Checkpoints (safetensors) are the files to share.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import IgptError, first_line
from ..files import atomic_write, atomic_write_json, write_jsonl


def save_resume(resume_dir: Path, step: int, model: torch.nn.Module, optimizer, *, rank: int, fsdp: bool) -> None:
    """Save the state after `step` into resume_dir (every process calls it; rank 0 writes, or all under FSDP).

    The folder is written under a temporary name and renamed when complete; step.json is replaced
    (atomically) only then, and older folders are deleted only after that: killed at any moment
    (kill -9 included), resume/ still holds one complete state that step.json names.
    """
    folder = resume_dir / f"step_{step:07d}"
    tmp = resume_dir / f".{folder.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
        tmp.mkdir(parents=True)
    if fsdp:
        dist.barrier()  # the fresh temp folder exists before anyone writes into it
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this process's shards
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)  # returns when all wrote
    elif rank == 0:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(tmp / "model.safetensors", lambda path: save_file(tensors, path))  # (flushed to disk)
        atomic_write(tmp / "optimizer.pt", lambda path: torch.save({"step": step, "optimizer": optimizer.state_dict()}, path))
    if rank == 0:
        if folder.exists():  # complete (it was renamed into place) and of this same step: keep it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
        atomic_write_json(resume_dir / "step.json", {"step": step, "folder": folder.name})
        for old in resume_dir.iterdir():  # older states, and leftovers of interrupted saves
            if old.name not in (folder.name, "step.json"):
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()


def load_resume(resume_dir: Path, run_name: str, model: torch.nn.Module, optimizer, *, device: torch.device,
                fsdp: bool) -> int:
    """Load the saved weights and optimizer state into model and optimizer; returns their step."""
    try:
        pointer = json.loads((resume_dir / "step.json").read_text())
        step, folder = pointer["step"], resume_dir / pointer.get("folder", ".")  # ".": saved before per-step folders
        if fsdp:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)  # reshards if need be
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        else:
            state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
            if state["step"] != step:
                raise ValueError("model and optimizer state are from different steps")
            model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
            optimizer.load_state_dict(state["optimizer"])
    except FileNotFoundError:
        raise IgptError(f"nothing to resume in {run_name!r}: no saved state yet; train without --resume") from None
    except (ValueError, KeyError, RuntimeError, dcp.CheckpointException) as err:
        raise IgptError(f"the resume state in {resume_dir} is damaged ({first_line(err)[:300]}); "
                        "train without --resume") from None
    return step


def truncate_metrics(run, step: int) -> None:
    """Drop the run's log lines after the resumed step, so the curve continues without duplicates."""
    rows = [row for row in run.metrics() if row["step"] <= step]
    write_jsonl(run.path / "metrics.jsonl", rows)
