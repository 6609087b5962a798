"""Runs: one folder per trained (or imported) model, and the checkpoint files inside it.

    runs/<name>/
        run.json                       what the run is: dataset, objective, preset, configs
        palette.json                   the colours (also inside every checkpoint)
        checkpoints/step_0000300.safetensors   weights + model config + palette (self-contained)
        metrics.jsonl                  one JSON object per line: train loss per step, val loss per eval
        resume/                        last weights + optimizer state, for `igpt train --resume`
        probes/, samples/, ...         written by later commands

A checkpoint is a safetensors file (loading it cannot run code) whose metadata carries the model
config and the palette, so a single file, or a run folder copied to another machine, loads alone.
Every write goes to a temporary file that is renamed into place: a crash leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import CheckpointError, IgptError, RunError, first_line
from .files import atomic_write, atomic_write_json, building_folder, read_jsonl
from .model import IGPT, ModelConfig
from .palette import Palette

FORMAT = "igpt-checkpoint-1"
RUN_FORMAT = 1
_STEP_FILE = re.compile(r"step_(\d+)\.safetensors$")


def default_runs_dir() -> Path:
    """$IGPT_RUNS_DIR if set, else ./runs."""
    return Path(os.environ.get("IGPT_RUNS_DIR", "runs"))


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The runs folder a caller asked for, or the default one."""
    return Path(runs_dir) if runs_dir else default_runs_dir()


# -- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: IGPT, palette: Palette, *, state_dict: dict | None = None, **info) -> None:
    """Weights as safetensors; model config, palette and `info` (step, val loss, ...) as metadata.

    state_dict: the model's weights when model.state_dict() does not hold them all (FSDP shards:
    gathered beforehand)."""
    if len(palette) != model.config.n_colors:
        raise CheckpointError(f"palette has {len(palette)} colours but the model predicts {model.config.n_colors}")
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(model.config.to_dict()),
        "palette": palette.to_json(),
        "info": json.dumps(info),
    }
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint_metadata(path: Path) -> dict:
    """The metadata of an igpt checkpoint, with clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({err}); it may be truncated or corrupted — "
            "copy it again or re-train"
        ) from None
    if metadata.get("format") != FORMAT:
        hint = (
            "it looks like a Hugging Face ImageGPT file: import its folder with `igpt import-hf DIR --name RUN`"
            if any(k.startswith("transformer.") for k in keys)
            else "igpt checkpoints are written by `igpt train` or `igpt import-hf`"
        )
        raise CheckpointError(f"{path} is a safetensors file but not an igpt checkpoint; {hint}")
    return metadata


def load_checkpoint(path: Path, device="cpu") -> tuple[IGPT, Palette, dict]:
    """(model in eval mode, palette, info) from one checkpoint file."""
    metadata = read_checkpoint_metadata(path)
    try:
        config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        palette = Palette.from_json(metadata["palette"])
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError, IgptError) as err:
        raise CheckpointError(f"{path} has damaged metadata ({err}); copy it again or re-train") from None
    if len(palette) != config.n_colors:
        raise CheckpointError(
            f"{path}: its palette has {len(palette)} colours but its model predicts {config.n_colors}; "
            "the file was assembled wrongly — re-export it"
        )
    with torch.device("meta"):  # no random init to overwrite: the file's tensors become the parameters
        model = IGPT(config)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} could not be read ({err}); it may be truncated — copy it again") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model config in the file ({first_line(err)})") from None
    return model.to(device).eval(), palette, info


# -- runs -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run folder. Cheap to create: reads run.json lazily."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info(self) -> dict:
        """run.json, checked: a JSON object with a usable model config, or a RunError that says so."""
        file = self.path / "run.json"
        try:
            info = json.loads(file.read_text())
        except FileNotFoundError:
            raise RunError(f"run {self.name!r} has no run.json at {file}: it is incomplete; delete it and re-train") from None
        except (ValueError, OSError) as err:
            raise RunError(f"run {self.name!r}: run.json is damaged ({err}); delete the run and re-train") from None
        if not isinstance(info, dict):
            raise RunError(f"run {self.name!r}: run.json is damaged (not a JSON object); delete the run and re-train")
        _model_config(self.name, info)
        return info

    @property
    def model_config(self) -> ModelConfig:
        return _model_config(self.name, self.info)

    def format_note(self) -> str | None:
        """A warning if run.json is of another format than this igpt writes (its other fields may be misread)."""
        fmt = self.info.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt <= RUN_FORMAT:
            return None
        return f"run {self.name!r} has run.json format {fmt!r} (this igpt writes {RUN_FORMAT}); showing what can be read"

    @property
    def palette(self) -> Palette:
        return Palette.load(self.path / "palette.json")

    def checkpoint_path(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:07d}.safetensors"

    def checkpoints(self) -> list[int]:
        """Steps that have a checkpoint, ascending."""
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for f in folder.iterdir() if (m := _STEP_FILE.match(f.name)))

    def resolve_step(self, step: int | None) -> int:
        steps = self.checkpoints()
        if not steps:
            raise RunError(f"run {self.name!r} has no checkpoints yet: train it with `igpt train --name {self.name}`")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise RunError(f"run {self.name!r} has no checkpoint at step {step}; it has steps {steps}")
        return step

    def load(self, step: int | None = None, device="cpu") -> tuple[IGPT, Palette, dict]:
        """The model at a checkpoint step (default: the last one)."""
        return load_checkpoint(self.checkpoint_path(self.resolve_step(step)), device)

    def metrics(self) -> list[dict]:
        """The metrics log; a damaged last line (a crash mid-write) is skipped."""
        return read_jsonl(self.path / "metrics.jsonl")

    def val_losses(self) -> dict[int, float]:
        """Validation loss (nats/token) by step."""
        return {row["step"]: row["val_loss"] for row in self.metrics() if "val_loss" in row}

    def summary(self) -> dict:
        """One row for `igpt runs` and the apps' model pickers. A run that cannot be read raises RunError."""
        info = self.info
        config = self.model_config
        val = self.val_losses()
        best = min(val.values()) if val else None
        return {
            "name": self.name,
            "dataset": info.get("dataset"),
            "objective": config.objective,
            "preset": info.get("preset"),
            "resolution": config.image_size,
            "colors": config.n_colors,
            "steps": max(self.checkpoints(), default=0),
            "best_val_loss": best,
            "best_val_bits_per_token": None if best is None else best / math.log(2),  # nats / ln 2 per palette token
            "path": str(self.path.resolve()),
        }


def _model_config(name: str, info: dict) -> ModelConfig:
    config = info.get("model_config")
    why = "it has no model_config" if config is None else None
    if config is not None:
        try:
            return ModelConfig.from_dict(config)
        except (IgptError, TypeError, ValueError) as err:
            why = f"its model_config does not fit this igpt: {first_line(err)}"
    raise RunError(f"run {name!r} has a run.json this igpt cannot read ({why}; older or unknown format); "
                   "re-train it or update igpt")


def as_run(run: Run | str, runs_dir: Path | None = None) -> Run:
    """A Run as it is, or the run of that name under runs_dir."""
    return run if isinstance(run, Run) else open_run(str(run), runs_dir)


# The default model memory: a quarter of physical memory leaves room for the OS, the app and the
# requests' own work (activations, a decoder's cache), and still holds several iGPT-S (0.3 GB each)
# or one iGPT-L (5.4 GB fp32) on a 32 GB machine.
DEFAULT_MODEL_MEMORY = 0.25


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (os.sysconf; /proc/meminfo where sysconf lacks it), or None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that tells
        pass
    try:
        line = next(row for row in Path("/proc/meminfo").read_text().splitlines() if row.startswith("MemTotal:"))
        return int(line.split()[1]) * 1024  # given in kB
    except (OSError, StopIteration, ValueError, IndexError):
        return None


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt](?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str | float | int) -> int:
    """Bytes from a size as a user writes it: "4GB", "512MB", "1.5g", "2000000" (bytes), or a fraction
    of physical memory below 1 ("0.5" = half of it). Units are powers of 1024. Raises IgptError."""
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise IgptError(f"model memory must be a size such as 4GB or 512MB, or a fraction of RAM such as 0.25; "
                        f"got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if number <= 0:
        raise IgptError(f"model memory must be more than 0, got {text!r}")
    if not unit and number < 1:
        total = physical_memory()
        if total is None:
            raise IgptError("this system does not tell its physical memory: give the model memory as a size, e.g. 4GB")
        return int(number * total)
    return int(number * _UNITS[unit.rstrip("b").rstrip("i")])


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_memory() -> bool:
    """Have glibc's malloc hand blocks of 1 MB and more back to the system as soon as they are freed.

    For long-running servers. By default glibc raises that threshold each time such a block is freed
    (up to 32 MB), after which weight-sized blocks come from heaps that keep what is freed: a demo that
    builds a decoder (its own copy of the weights) per request grew by 300 MB over 40 rounds of three
    users (tests/test_soak.py with 40 rounds); with the threshold fixed (what MALLOC_MMAP_THRESHOLD_=1048576
    does at start-up) it stayed within one model's size. Returns whether it could (glibc only).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


@dataclass
class _Entry:
    stamp: int  # the checkpoint file's modification time when it was loaded
    model: IGPT
    palette: Palette
    nbytes: int
    leases: int = 0  # requests using the model now: while above 0 it is never released


class ModelCache:
    """Models and palettes loaded once and shared, for apps that serve many requests, within a memory budget.

    Keyed by file and modification time: a run re-trained (or re-imported) under the same name is
    loaded again, an unchanged one never. Models take at most `max_bytes` (default: a quarter of
    physical memory, `DEFAULT_MODEL_MEMORY`); loading one more releases the least recently used
    ones first. A model is used through `lease`, which pins it while a request runs: a pinned model
    is never released, so when every held model is pinned a new one is loaded beyond the budget
    (at most the budget plus the models in use), and the excess is released as leases end.
    Each palette's colour lookup table is built before it is handed out, so threads only ever read
    it. Safe to call from several threads: a model being loaded holds up only the users of that same
    checkpoint, who then share the one load.
    """

    def __init__(self, device="cpu", max_bytes: int | None = None):
        self.device = device
        if max_bytes is None:
            total = physical_memory()
            max_bytes = int(DEFAULT_MODEL_MEMORY * total) if total else 4 << 30
        self.max_bytes = int(max_bytes)
        self._models: OrderedDict[Path, _Entry] = OrderedDict()  # least recently used first
        self._palettes: dict[Path, tuple[int, Palette]] = {}
        self._lock = threading.Lock()  # guards the tables above; held for moments, never during a load
        self._loading: dict[Path, threading.Lock] = {}  # a lock per file being loaded: two users load it once
        self._reserved = 0  # bytes of the models being loaded now, made room for before they arrive

    @property
    def held_bytes(self) -> int:
        """Bytes of the models held now (their parameters and buffers)."""
        with self._lock:
            return sum(entry.nbytes for entry in self._models.values())

    @contextmanager
    def lease(self, run: Run, step: int | None = None) -> Iterator[tuple[IGPT, Palette, int]]:
        """(model in eval mode, palette, step) of a run's checkpoint (default: the last), pinned in memory
        until the `with` block ends. Use it around all the work of one request."""
        step, path, entry = self._get(run, step, pin=True)
        try:
            yield entry.model, entry.palette, step
        finally:
            with self._lock:
                entry.leases -= 1
                self._release_over(self.max_bytes)

    def load(self, run: Run, step: int | None = None) -> tuple[IGPT, Palette, int]:
        """Like `lease`, without the pin: the cache may release the model at any later load, so this is
        for one caller at a time (a script); servers use `lease`."""
        step, _, entry = self._get(run, step, pin=False)
        return entry.model, entry.palette, step

    def _get(self, run: Run, step: int | None, pin: bool) -> tuple[int, Path, _Entry]:
        step = run.resolve_step(step)
        path = run.checkpoint_path(step)
        stamp = path.stat().st_mtime_ns
        entry = self._held(path, stamp, pin)
        if entry is None:
            with self._lock:
                loading = self._loading.setdefault(path, threading.Lock())
            # Only users of this same file wait for its load (iGPT-L takes seconds); the first loads it,
            # the others then find it held.
            with loading:
                entry = self._held(path, stamp, pin) or self._load(path, stamp, pin)
            with self._lock:
                self._loading.pop(path, None)
        return step, path, entry

    def _held(self, path: Path, stamp: int, pin: bool) -> _Entry | None:
        """The model of `path` if held and loaded from this version of the file, marked as just used."""
        with self._lock:
            entry = self._models.get(path)
            if entry is None or entry.stamp != stamp:
                return None
            self._models.move_to_end(path)
            entry.leases += pin
            return entry

    def _load(self, path: Path, stamp: int, pin: bool) -> _Entry:
        size = path.stat().st_size  # the model's float32 bytes (plus a small header): room is made first
        with self._lock:
            old = self._models.get(path)
            if old is not None and old.leases == 0:
                del self._models[path]  # a re-trained file: the old weights go first
            self._release_over(self.max_bytes - self._reserved - size)
            self._reserved += size
        try:
            model, palette, _ = load_checkpoint(path, self.device)
            palette.quantize(np.zeros((1, 3), np.uint8))  # builds the lookup table
        finally:
            with self._lock:
                self._reserved -= size
        nbytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
        with self._lock:
            entry = self._models[path] = _Entry(stamp, model, palette, nbytes)
            self._models.move_to_end(path)  # a re-trained file's key may still stand where the old one was used
            entry.leases += pin
        return entry

    def _release_over(self, limit: int) -> None:
        """Release the least recently used models not in use until the rest take at most `limit` bytes.
        Called with the lock held."""
        held = sum(entry.nbytes for entry in self._models.values())
        for path, entry in list(self._models.items()):
            if held <= limit:
                break
            if entry.leases == 0:
                del self._models[path]
                held -= entry.nbytes

    def palette(self, run: Run) -> Palette:
        """The run's palette (palette.json, the same colours as in its checkpoints), without its model."""
        path = run.path / "palette.json"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        with self._lock:
            cached = self._palettes.get(path)
            if cached is None or cached[0] != stamp:
                palette = run.palette
                palette.quantize(np.zeros((1, 3), np.uint8))
                cached = self._palettes[path] = (stamp, palette)
        return cached[1]


def open_run(name: str, runs_dir: Path | None = None) -> Run:
    runs_dir = runs_root(runs_dir)
    path = runs_dir / name
    if not (path / "run.json").is_file():
        known = [r.name for r in list_runs(runs_dir)]
        listing = f"runs there: {', '.join(known)}" if known else "there are no runs there yet"
        raise RunError(
            f"no run named {name!r} under {runs_dir}/ ({listing}); make one with "
            f"`igpt train --dataset digits --preset tiny --name {name}`"
        )
    return Run(path)


def list_runs(runs_dir: Path | None = None) -> list[Run]:
    runs_dir = runs_root(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [Run(p) for p in sorted(runs_dir.iterdir()) if (p / "run.json").is_file()]


def scan_runs(runs_dir: Path | None = None) -> tuple[list[Run], dict[str, str]]:
    """The runs under runs_dir split into those that can be read and those that cannot:
    (readable runs, {name: the one-line reason another run cannot be read}), both sorted by name.

    Only run.json is read (not the metrics), so listing many runs stays quick; the reasons are the
    library's own messages, which say what to do."""
    readable, problems = [], {}
    for run in list_runs(runs_dir):
        try:
            run.info  # checks run.json and its model config
        except IgptError as err:
            problems[run.name] = str(err)
        else:
            readable.append(run)
    return readable, problems


def create_run(runs_dir: Path | None, name: str, info: dict, palette: Palette, *, overwrite: bool = False,
               fill=None) -> Run:
    """Make a run folder with run.json and palette.json, atomically: a failure leaves nothing.

    fill(run), if given, writes more files (weights, a log) into the run while it is still in its
    temporary folder, so the run appears complete or not at all. overwrite replaces an existing run
    only once the new one is whole.
    """
    runs_dir = runs_root(runs_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise RunError(f"run name {name!r} may use letters, digits, '.', '_' and '-' only")
    path = runs_dir / name
    if path.exists() and not overwrite:
        raise RunError(f"a run named {name!r} already exists at {path}: pass --resume to continue it, "
                       "--overwrite to replace it, or choose another --name")
    try:
        with building_folder(path, replace=overwrite) as tmp:
            atomic_write_json(tmp / "run.json", {"format": RUN_FORMAT, "name": name, **info})
            palette.save(tmp / "palette.json")
            if fill is not None:
                fill(Run(tmp))
    except FileExistsError:
        raise RunError(f"a run named {name!r} appeared at {path} while it was being made; choose another --name") from None
    return Run(path)
