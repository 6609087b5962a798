"""OpenAI's released weights in Hugging Face's format: `igpt import-hf` and `igpt export-hf`."""

from __future__ import annotations

from .common import add_json, command, emit, int_list, runs_dir


def cmd_import_hf(args) -> None:
    from igpt_core import import_hf

    run = import_hf(args.source, args.name, runs_dir(args), overwrite=args.overwrite, progress=not args.json)
    emit(args, run.summary(), f"imported {args.source} as run {run.name!r} ({run.path}); try "
                              f"`igpt sample {run.name} --image PHOTO --out grid.png`")


def cmd_export_hf(args) -> None:
    from igpt_core import export_hf

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


def cmd_import_openai(args) -> None:
    from igpt_core import IgptError, import_openai, imported_label

    if (args.size is None) == (args.source_dir is None):
        raise IgptError("give a SIZE to download (s, m or l) or a folder with --from DIR, not both or neither")
    run = import_openai(args.size, args.name, source_dir=args.source_dir, steps=args.steps, n_head=args.n_head,
                        runs_dir=runs_dir(args), progress=not args.json, overwrite=args.overwrite, url=args.url,
                        download_dir=args.download_dir)
    emit(args, {**run.summary(), "checkpoints": run.checkpoints(), "label": imported_label(run)},
         f"imported {imported_label(run)} as run {run.name!r} ({run.path}), checkpoints at steps "
         f"{', '.join(map(str, run.checkpoints()))}; try `igpt sample {run.name} --image PHOTO --out grid.png`")


def add_import_openai(sub) -> None:
    p = command(sub, "import-openai", cmd_import_openai,
                "make a run from OpenAI's own TensorFlow checkpoints of iGPT-S/M/L, one checkpoint per training step",
                "Downloads OpenAI's checkpoints of iGPT-SIZE at 131k, 262k, 524k and 1M training steps (the paper's "
                "Figure 3) with the 512-colour palette, or reads them from --from DIR, and converts each step, no "
                "TensorFlow needed. Downloads resume where an interrupted one stopped and are kept in "
                "--download-dir; files are checked by size and every tensor by its crc32c. Per step: "
                "about 0.9 GB for S, 5.5 GB for M, 16 GB for L (with Adam state, downloaded but never read).")
    p.add_argument("size", nargs="?", choices=["s", "m", "l"], help="which model to download (not with --from)")
    p.add_argument("--from", dest="source_dir", metavar="DIR",
                   help="a folder holding model.ckpt-STEP.index, its .data-* shards and kmeans_centers.npy")
    p.add_argument("--name", required=True, help="name of the new run")
    p.add_argument("--steps", type=int_list, metavar="S1,S2,...",
                   help="training steps to import (default 131000,262000,524000,1000000; --from: all there)")
    p.add_argument("--n-head", type=int, help="attention heads (default: read from the checkpoint; checked if given)")
    p.add_argument("--download-dir", help="where downloads are kept (default DATA_DIR/openai/igpt-SIZE)")
    p.add_argument("--url", help="server to download from (default $IGPT_OPENAI_URL or OpenAI's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    add_json(p, "print the run summary as JSON (no progress bars)")
