"""OpenAI's released weights in Hugging Face's format: `igpt import-hf` and `igpt export-hf`."""

from __future__ import annotations

from .common import add_json, command, emit, runs_dir


def cmd_import_hf(args) -> None:
    from igpt_core.hf import import_hf  # TODO(lead): export (igpt_core.pretrained after the move)

    run = import_hf(args.source, args.name, runs_dir(args), overwrite=args.overwrite, progress=not args.json)
    emit(args, run.summary(), f"imported {args.source} as run {run.name!r} ({run.path}); try "
                              f"`igpt sample {run.name} --image PHOTO --out grid.png`")


def cmd_export_hf(args) -> None:
    from igpt_core.hf import export_hf  # TODO(lead): export (igpt_core.pretrained after the move)

    out = export_hf(args.run, args.out_dir, runs_dir(args), step=args.step)
    emit(args, {"run": args.run, "out_dir": str(out)},
         f"wrote {out}: load it with transformers' ImageGPTForCausalImageModeling.from_pretrained and "
         "ImageGPTImageProcessor.from_pretrained")


def add_import_hf(sub) -> None:
    p = command(sub, "import-hf", cmd_import_hf, "make a run from OpenAI's released iGPT weights (Hugging Face format)",
                "SOURCE is a hub id (openai/imagegpt-small|medium|large, downloaded when online) or a local folder "
                "written by save_pretrained (config.json, weights, preprocessor_config.json with the clusters).")
    p.add_argument("source", help="hub id or folder")
    p.add_argument("--name", required=True, help="name of the new run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    add_json(p, "print the run summary as JSON")


def add_export_hf(sub) -> None:
    p = command(sub, "export-hf", cmd_export_hf, "write a run as a Hugging Face ImageGPT folder (model + image processor)")
    p.add_argument("run", help="run name (autoregressive runs only)")
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    add_json(p)
