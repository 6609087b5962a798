"""`igpt train`: train an iGPT model on a dataset, creating or resuming a run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from igpt_core import IgptError
from igpt_core import safe_name

from .common import add_data_dir, add_json, command, emit, int_list, runs_dir


def save_every(text: str) -> str:
    """An argparse type: N steps, or Ns / Nm / Nh of wall time, checked by the library."""
    from igpt_core import parse_save_every

    try:
        parse_save_every(text)
    except IgptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


def model_overrides(items: list[str] | None) -> dict:
    """--set KEY=VALUE items -> {key: value}, each value read as JSON."""
    overrides = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            raise IgptError(f"--set {item!r}: the value must be a number, true/false or a quoted string") from None
    return overrides


def already_trained(args, name: str, steps: int) -> bool:
    """--skip-existing: the run exists and has its last checkpoint (then says so)."""
    from igpt_core import open_run

    if not (args.skip_existing and (runs_dir(args) / name / "run.json").exists()):
        return False
    run = open_run(name, runs_dir(args))
    if steps not in run.checkpoints():
        return False
    emit(args, run.summary(), f"run {name!r} is already trained ({run.path}); nothing to do")
    return True


def open_or_start(args, name: str, config, overrides: dict, quiet: bool):
    """The run to train: the existing one (--resume, checked against the options) or a new one."""
    from igpt_core import open_run, start_run
    from igpt_core import shards_path
    from igpt_core import check_resume

    # --colors left out: 16, except for shards (their palette) and --resume (the run's palette)
    colors = args.colors if args.colors is not None or shards_path(args.dataset) or args.resume else 16
    if args.resume:
        run = open_run(name, runs_dir(args))
        check_resume(run, args.dataset, args.preset, args.objective, colors, config, overrides)
        return run
    if not quiet:
        what = ("reading the shards' palette" if shards_path(args.dataset)
                else f"fitting a {colors}-colour palette on {args.dataset}")
        print(f"{what} and creating run {name!r} ...", file=sys.stderr)
    return start_run(name, args.dataset, args.preset, args.objective, colors, args.resolution, config,
                     overrides, runs_dir(args), args.data_dir, overwrite=args.overwrite)


def cmd_train(args) -> None:
    from igpt_core import TrainConfig, train

    overrides = model_overrides(args.set)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                            if getattr(args, f.name, None) is not None})
    name = args.name or f"{safe_name(args.dataset)}-{args.preset}-{args.objective}"
    if already_trained(args, name, config.steps):
        return
    rank = int(os.environ.get("RANK", 0))  # under torchrun, rank 0 speaks for all
    run = open_or_start(args, name, config, overrides, quiet=args.json or rank != 0)
    try:
        summary = train(run, resume=args.resume, progress=not args.json, data_dir=args.data_dir, runtime=config)
    except KeyboardInterrupt:
        print("\ninterrupted: state saved; continue with the same command plus --resume", file=sys.stderr)
        raise SystemExit(130) from None
    if rank != 0:
        return
    text = (f"trained {run.name!r} in {summary['seconds']:.0f} s ({summary['tokens_per_second']:,.0f} tokens/s)\n"
            f"  validation: {summary['val_loss']:.3f} nats/token = {summary['val_bits_per_token']:.3f} bits/token "
            f"(colour-frequency baseline {summary['unigram_val_loss']:.3f} nats/token)\n"
            f"  checkpoints at steps {summary['checkpoints']}\n  run folder: {run.path}")
    emit(args, summary, text)


def add_train(sub) -> None:
    from igpt_core import DATASETS, PRESETS

    p = command(sub, "train", cmd_train, "train an iGPT model on a dataset (creates or resumes a run)",
                "Fit a palette on the training images, then train with AdamW (0.9, 0.95), warm-up and cosine decay. "
                "Checkpoints are kept at log-spaced steps so that probes can follow training. "
                "Launch with torchrun for several processes or GPUs.")
    p.add_argument("--dataset", default="digits",
                   help=f"one of: {', '.join(DATASETS)} (default digits); these are tokenised into memory when "
                        "training starts. For data larger than memory: shards:DIR, palette ids written by `igpt "
                        "tokenize`, streamed from disk (each process reads only its share of every batch)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--objective", default="ar", choices=["ar", "bert"], help="autoregressive or BERT (default ar)")
    p.add_argument("--name", help="run name (default DATASET-PRESET-OBJECTIVE)")
    p.add_argument("--colors", type=int,
                   help="palette size k (the paper: 512; default 16; shards: their palette's, --resume: the run's)")
    p.add_argument("--resolution", type=int, help="image side to train at (default: the dataset's own)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model setting, e.g. --set n_layer=2 --set n_embd=64 (repeatable)")
    add_optimisation(p)
    add_machine(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved state")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--skip-existing", action="store_true", help="do nothing if the run already finished these steps")
    add_data_dir(p)
    add_json(p, "print the summary as JSON (no progress bar)")


def add_optimisation(p) -> None:
    """The TrainConfig fields of the optimisation, with its defaults."""
    from igpt_core import TrainConfig

    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up fraction of steps (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"steps between val losses (default {d.eval_every})")
    p.add_argument("--checkpoints", type=int_list, help="comma-separated steps to keep (default: ~6 log-spaced)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for palette, splits, init, batches (default 0)")
    p.add_argument("--save-every", type=save_every, default=d.save_every, metavar="N|Ns|Nm|Nh",
                   help="also save the resume state every N steps, or every N seconds/minutes/hours of wall "
                        f"time, so a killed run loses at most that (default {d.save_every})")


def add_machine(p) -> None:
    """Where and how the training runs."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPUs)")
    p.add_argument("--activation-checkpointing", action="store_true", help="trade compute for memory (large presets)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and Adam state over the processes (FSDP), "
                        "for models that do not fit one GPU (e.g. --preset xl)")
