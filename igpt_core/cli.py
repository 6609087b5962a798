"""`igpt`: one command, with sub-commands for every step of the method. `igpt SUBCOMMAND --help` explains each.

Errors caused by input are printed as one line (`error: ...`) with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from .errors import IgptError
from .files import safe_name

REPO = Path(__file__).resolve().parent.parent


def _runs_dir(args) -> Path:
    from .runs import runs_root

    return runs_root(args.runs_dir)


def _emit(args, result: dict, text: str) -> None:
    print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _save_every(text: str) -> str:
    from .training import parse_save_every

    try:
        parse_save_every(text)
    except IgptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


# -- train / runs / data ----------------------------------------------------------------------------


def cmd_train(args) -> None:
    from .runs import open_run
    from .data.shards import shards_path
    from .training import TrainConfig, check_resume, start_run, train

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            raise IgptError(f"--set {item!r}: the value must be a number, true/false or a quoted string") from None
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None})
    name = args.name or f"{safe_name(args.dataset)}-{args.preset}-{args.objective}"
    runs_dir = _runs_dir(args)
    if args.skip_existing and (runs_dir / name / "run.json").exists() and open_run(name, runs_dir).checkpoints():
        run = open_run(name, runs_dir)
        if tc.steps in run.checkpoints():
            _emit(args, run.summary(), f"run {name!r} is already trained ({run.path}); nothing to do")
            return
    quiet = args.json or int(os.environ.get("RANK", 0)) != 0  # under torchrun, rank 0 speaks for all
    # --colors left out: 16, except for shards (their palette) and --resume (the run's palette)
    colors = args.colors if args.colors is not None or shards_path(args.dataset) or args.resume else 16
    if args.resume:
        run = open_run(name, runs_dir)
        check_resume(run, args.dataset, args.preset, args.objective, colors, tc, overrides)
    else:
        if not quiet:
            what = ("reading the shards' palette" if shards_path(args.dataset)
                    else f"fitting a {colors}-colour palette on {args.dataset}")
            print(f"{what} and creating run {name!r} ...", file=sys.stderr)
        run = start_run(name, args.dataset, args.preset, args.objective, colors, args.resolution, tc,
                        overrides, runs_dir, args.data_dir, overwrite=args.overwrite)
    try:
        summary = train(run, resume=args.resume, progress=not args.json, data_dir=args.data_dir, runtime=tc)
    except KeyboardInterrupt:
        print(f"\ninterrupted: state saved; continue with the same command plus --resume", file=sys.stderr)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", 0)) != 0:
        return
    base = summary["unigram_val_loss"]
    text = (f"trained {run.name!r} in {summary['seconds']:.0f} s ({summary['tokens_per_second']:,.0f} tokens/s)\n"
            f"  validation: {summary['val_loss']:.3f} nats/token = {summary['val_bpd']:.3f} bits/dim "
            f"(colour-frequency baseline {base:.3f} nats/token)\n"
            f"  checkpoints at steps {summary['checkpoints']}\n  run folder: {run.path}")
    _emit(args, summary, text)


def cmd_runs(args) -> None:
    from .runs import list_runs

    rows = []
    for run in list_runs(_runs_dir(args)):
        try:
            rows.append(run.summary())
        except IgptError as err:
            rows.append({"name": run.name, "error": str(err)})
    if args.json:
        _emit(args, rows, "")
        return
    if not rows:
        print(f"no runs under {_runs_dir(args)}/ — make one with `igpt train --dataset digits --preset tiny`")
        return
    header = f"{'name':24} {'dataset':14} {'objective':9} {'preset':6} {'res':>4} {'steps':>6} {'best val bits/dim':>17}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} (unreadable: {r['error']})")
            continue
        bpd = "-" if r["best_val_bpd"] is None else f"{r['best_val_bpd']:.3f}"
        print(f"{r['name']:24} {str(r['dataset'])[:14]:14} {r['objective']:9} {str(r['preset']):6} "
              f"{r['resolution']:>4} {r['steps']:>6} {bpd:>17}")


def cmd_data(args) -> None:
    import numpy as np

    from .data import open_dataset
    from .render import grid, save_png

    data = open_dataset(args.dataset, args.split, data_dir=args.data_dir, download=args.download)  # reads 32 images only
    out = Path(args.out or f"{safe_name(args.dataset)}-{args.split}.png")
    picks = np.random.default_rng(0).choice(len(data), size=min(32, len(data)), replace=False)
    examples = data.take(np.sort(picks))
    save_png(grid([list(examples[i : i + 8]) for i in range(0, len(picks), 8)]), out)
    counts = None
    if data.labels is not None:
        counts = {data.classes[c]: int(n) for c, n in zip(*np.unique(data.labels, return_counts=True))}
    result = {"dataset": args.dataset, "split": args.split, "images": len(data), "resolution": data.resolution,
              "labelled": data.labels is not None, "classes": data.classes, "class_counts": counts, "examples_png": str(out)}
    labels = f"{len(data.classes)} classes: {', '.join(data.classes[:12])}{' ...' if len(data.classes) > 12 else ''}" \
        if data.classes else "unlabelled"
    _emit(args, result, f"{args.dataset} [{args.split}]: {len(data)} images, {data.resolution}×{data.resolution}, "
                        f"{labels}\nexamples: {out}")


def cmd_tokenize(args) -> None:
    from .tokenizer import fit_palette, tokenize

    if (args.palette is None) == (args.colors is None):
        raise IgptError("give --palette RUN_OR_FILE (reuse a run's palette) or --colors K (fit one), not both")
    if args.palette is not None:
        palette = _palette_of(args.palette, args)
    else:
        if not args.json:
            print(f"fitting a {args.colors}-colour palette on a sample of {args.dataset} ...", file=sys.stderr)
        palette = fit_palette(args.dataset, args.colors, data_dir=args.data_dir, seed=args.seed, resolution=args.resolution)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    shards = tokenize(args.dataset, palette, args.out, resolution=args.resolution, splits=splits, data_dir=args.data_dir,
                      seed=args.seed, download=args.download, shard_images=args.shard_images, overwrite=args.overwrite,
                      progress=not args.json)
    sizes = {name: entry["images"] for name, entry in shards.index["splits"].items()}
    result = {"out": str(shards.path), "dataset": args.dataset, "resolution": shards.resolution, "colors": len(palette),
              "palette_fingerprint": shards.index["palette_fingerprint"], "images": sizes}
    _emit(args, result, f"tokenised {args.dataset} at {shards.resolution}×{shards.resolution} with a {len(palette)}-colour "
                        f"palette: {', '.join(f'{n} {k}' for k, n in sizes.items())} images -> {shards.path}\n"
                        f"train on them with `igpt train --dataset shards:{shards.path}`")


def _palette_of(source: str, args):
    """--palette: a palette JSON file (a run's palette.json, a shards folder's) or a run name."""
    from .palette import Palette
    from .runs import open_run

    path = Path(source).expanduser()
    if path.is_file():
        return Palette.load(path)
    if path.is_dir() and (path / "palette.json").is_file():
        return Palette.load(path / "palette.json")
    return open_run(source, _runs_dir(args)).palette


# -- sampling and likelihood ------------------------------------------------------------------------


def _load(args):
    from .runs import open_run
    from .device import pick_device

    run = open_run(args.run, _runs_dir(args))
    model, palette, _ = run.load(args.step, device=pick_device(args.device))
    return run, model, palette


def cmd_sample(args) -> None:
    from .images import load_image
    from .render import completion_grid, grid, hide_rows, save_png
    from .sample import complete, unconditional

    run, model, palette = _load(args)
    size = model.config.image_size
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   precision="int8" if args.int8 else "fp32")
    out = Path(args.out)
    if args.unconditional:
        ids = unconditional(model, args.n, **options)
        save_png(grid([list(palette.decode(ids, size))]), out)
        _emit(args, {"run": run.name, "samples": args.n, "out": str(out)}, f"{args.n} samples -> {out}")
        return
    if not args.image:
        raise IgptError("give --image PATH to complete (or --unconditional for samples from nothing)")
    keep = size // 2 if args.keep_rows is None else args.keep_rows
    resized, ids, seen = palette.view(load_image(args.image), size)  # seen: the ids in the palette's colours
    samples = palette.decode(complete(model, ids, keep, args.n, **options), size)
    save_png(completion_grid(resized, seen, hide_rows(seen, keep), samples), out)
    _emit(args, {"run": run.name, "keep_rows": keep, "samples": args.n, "out": str(out)},
          f"{args.n} completions of {args.image} from its first {keep} of {size} rows -> {out}")


def cmd_score(args) -> None:
    import torch

    from .data import load_dataset
    from .likelihood import score

    run, model, palette = _load(args)
    size = model.config.image_size
    data = load_dataset(args.dataset or run.info["dataset"], args.split, data_dir=args.data_dir, resolution=size)
    images = data.images[: args.limit] if args.limit else data.images
    result = score(model, torch.from_numpy(palette.encode(images, size)), precision="int8" if args.int8 else "fp32")
    result.update(run=run.name, dataset=data.name, split=args.split)
    _emit(args, result, f"{run.name} on {data.name} [{args.split}], {result['images']} images: "
                        f"{result['nats_per_token']:.4f} nats/token = {result['bits_per_dim']:.4f} bits/dim "
                        f"({result['bits_per_subpixel']:.4f} per RGB sub-pixel)\nnote: {result['note']}")


def cmd_surprise(args) -> None:
    import numpy as np

    from .images import load_image
    from .likelihood import surprise_map
    from .render import grid, heatmap, save_png

    run, model, palette = _load(args)
    size = model.config.image_size
    _, ids, seen = palette.view(load_image(args.image), size)
    nll = surprise_map(model, ids)
    save_png(grid([[seen, heatmap(nll)]], labels=["model's view", "surprise (nats)"]), args.out)
    worst = np.unravel_index(nll.argmax(), nll.shape)
    _emit(args, {"run": run.name, "mean_nats": float(nll.mean()), "max_nats": float(nll.max()),
                 "most_surprising_pixel": [int(worst[0]), int(worst[1])], "out": args.out, "nll": nll.tolist()},
          f"mean {nll.mean():.3f} nats/pixel, most surprising pixel (row {worst[0]}, col {worst[1]}) at "
          f"{nll.max():.2f} nats -> {args.out}")


def _pixel_position(text: str, side: int) -> tuple[int, int]:
    try:
        row, col = (int(x) for x in text.split(","))
    except ValueError:
        raise IgptError(f"--pixel takes ROW,COL (0-based, e.g. 3,4), got {text!r}") from None
    if not (0 <= row < side and 0 <= col < side):
        raise IgptError(f"pixel ({row}, {col}) is outside the {side}×{side} image: rows and columns run 0..{side - 1}")
    return row, col


def cmd_inside(args) -> None:
    from . import explain
    from .images import load_image
    from .render import inside_picture, save_png

    run, model, palette = _load(args)
    size, step = model.config.image_size, run.resolve_step(args.step)
    row, col = _pixel_position(args.pixel, size)
    t = row * size + col
    ids = palette.encode(load_image(args.image)[None], size)[0]
    numbers = explain.describe(explain.next_pixel(model, ids, t), int(ids[t]))
    attention = explain.attention_maps(model, ids, t)
    lens = explain.layer_predictions(model, ids)
    layer_p = lens[:, t, int(ids[t])].exp().tolist()
    top = numbers["top_ids"]
    title = (f"{run.name} step {step}, pixel (row {row}, col {col}): true colour p = {numbers['true_probability']:.3f}, "
             f"rank {numbers['true_rank']} of {model.config.n_colors}, entropy {numbers['entropy']:.2f} nats")
    picture = inside_picture(palette.decode(ids[None], size)[0], row, col, palette.colors[top],
                             numbers["top_probabilities"], top.index(int(ids[t])) if int(ids[t]) in top else None,
                             attention.pixels.mean(1).numpy(), palette.decode(lens.argmax(-1).numpy(), size),
                             layer_p, title)
    save_png(picture, args.out)
    result = dict(run=run.name, step=step, pixel=[row, col], objective=model.config.objective, **numbers,
                  top_colors=palette.colors[top].tolist(), layer_true_probability=layer_p,
                  attention_mean_over_heads=attention.pixels.mean(1).tolist(),
                  attention_sos=None if attention.sos is None else attention.sos.tolist(), out=args.out)
    _emit(args, result, f"{title}\n  top colours {top} with p {[round(p, 3) for p in numbers['top_probabilities']]}"
                        f"\n  picture -> {args.out}")


# -- probes and fine-tuning -------------------------------------------------------------------------


def _steps_or_all(text: str):
    return text if text in ("all", "last") else _int_list(text)


def cmd_probe(args) -> None:
    from .probe import load_probe_results, probe_run
    from .runs import open_run

    if args.skip_existing:
        run = open_run(args.run, _runs_dir(args))
        stored = load_probe_results(run, args.dataset)
        wanted = {"all": run.checkpoints(), "last": run.checkpoints()[-1:]}.get(str(args.checkpoints), args.checkpoints)
        if stored is not None and set(wanted) <= {row["step"] for row in stored.rows}:
            print(f"{args.run} is already probed at checkpoints {sorted(wanted)} ({stored.path}); nothing to do")
            return
    table = probe_run(args.run, args.dataset, checkpoints=args.checkpoints, layers=args.layers, concat=args.concat,
                      runs_dir=_runs_dir(args), data_dir=args.data_dir, bert_masks=args.bert_masks,
                      max_train=args.max_train, progress=not args.json, device=args.device, workers=args.workers)
    if table is None:  # under torchrun, a process other than rank 0: it helped extract, rank 0 reports
        return
    if table.note:
        print(f"note: {table.note}", file=sys.stderr)
    result = table.to_dict()
    if args.json:
        _emit(args, result, "")
        return
    print(f"linear probes of {args.run} on {result['dataset']} (test accuracy; * = best layer by val accuracy)")
    steps = sorted({row["step"] for row in table.rows})
    layers = sorted({row["layer"] for row in table.rows})
    by_key = {(row["step"], row["layer"]): row for row in table.rows}
    print(f"{'step':>8} {'val loss':>9} " + " ".join(f"{'L' + str(layer):>6}" for layer in layers))
    for step in steps:
        best = table.best(step)
        cells = []
        for layer in layers:
            row = by_key.get((step, layer))
            mark = "*" if best and row is best else " "
            cells.append(f"{row['test_acc'] * 100:5.1f}{mark}" if row else f"{'-':>6}")
        loss = next((r["val_loss"] for r in table.rows if r["step"] == step and r["val_loss"] is not None), None)
        print(f"{step:>8} {'-' if loss is None else f'{loss:.3f}':>9} " + " ".join(cells))
    refs = result.get("references") or {}
    if refs.get("raw_pixels"):
        print(f"reference, raw pixels: {refs['raw_pixels']['test_acc'] * 100:.1f}")
    if refs.get("random_init"):
        best_random = max(refs["random_init"], key=lambda r: r["val_acc"])
        print(f"reference, random init (best layer {best_random['layer']}): {best_random['test_acc'] * 100:.1f}")
    if table.concat:
        _print_concat(table.concat)
    print(f"saved in {table.path}")


def _print_concat(rows: list[dict]) -> None:
    """The probes of joined layers: one column per set of layers, one row per checkpoint."""
    sets = sorted({tuple(row["layers"]) for row in rows})
    names = ["+".join(f"L{layer}" for layer in layers) for layers in sets]
    by_key = {(row["step"], tuple(row["layers"])): row for row in rows}
    print("layers joined end to end, probed as one feature (test accuracy):")
    print(f"{'step':>8} " + " ".join(f"{name:>{max(6, len(name))}}" for name in names))
    for step in sorted({row["step"] for row in rows}):
        cells = [f"{by_key[(step, layers)]['test_acc'] * 100:.1f}" if (step, layers) in by_key else "-"
                 for layers in sets]
        print(f"{step:>8} " + " ".join(f"{cell:>{max(6, len(name))}}" for cell, name in zip(cells, names)))


def cmd_finetune(args) -> None:
    from .training import finetune

    summary = finetune(args.run, args.dataset, name=args.name, steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, gen_weight=args.gen_weight, patience=args.patience,
                       runs_dir=_runs_dir(args), data_dir=args.data_dir, step=args.step, seed=args.seed,
                       progress=not args.json, overwrite=args.overwrite, max_train=args.max_train, device=args.device)
    _emit(args, summary, f"fine-tuned {args.run} on {summary['dataset']}: test accuracy {summary['test_acc'] * 100:.1f}% "
                         f"(val {summary['val_acc'] * 100:.1f}% at step {summary['best_step']}); classifier run "
                         f"{summary['run']!r} at {summary['path']}")


def cmd_classify(args) -> None:
    from .training import classify

    probs = classify(args.run, args.image, runs_dir=_runs_dir(args))
    _emit(args, {"run": args.run, "image": args.image, "probabilities": dict(probs)},
          "\n".join(f"{name:>16} {p * 100:5.1f}%  {'#' * round(p * 40)}" for name, p in probs[: args.top]))


# -- OpenAI / Hugging Face weights ---------------------------------------------------------------------


def cmd_import_hf(args) -> None:
    from .pretrained import import_hf

    run = import_hf(args.source, args.name, _runs_dir(args), overwrite=args.overwrite, progress=not args.json)
    _emit(args, run.summary(), f"imported {args.source} as run {run.name!r} ({run.path}); try "
                               f"`igpt sample {run.name} --image PHOTO --out grid.png`")


def cmd_export_hf(args) -> None:
    from .pretrained import export_hf

    out = export_hf(args.run, args.out_dir, _runs_dir(args), step=args.step)
    _emit(args, {"run": args.run, "out_dir": str(out)},
          f"wrote {out}: load it with transformers' ImageGPTForCausalImageModeling.from_pretrained and "
          "ImageGPTImageProcessor.from_pretrained")


# -- OpenAI's TensorFlow checkpoints (self-contained: a parser builder and a handler) -----------------


def import_openai_parser(command) -> None:
    """Add `igpt import-openai`; `command(name, func, help, description)` makes a sub-parser."""
    p = command("import-openai", cmd_import_openai,
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
    p.add_argument("--steps", type=_int_list, metavar="S1,S2,...",
                   help="training steps to import (default 131000,262000,524000,1000000; --from: all there)")
    p.add_argument("--n-head", type=int, help="attention heads (default: read from the checkpoint; checked if given)")
    p.add_argument("--download-dir", help="where downloads are kept (default DATA_DIR/openai/igpt-SIZE)")
    p.add_argument("--url", help="server to download from (default $IGPT_OPENAI_URL or OpenAI's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON (no progress bars)")


def cmd_import_openai(args) -> None:
    from .pretrained import import_openai, imported_label

    if (args.size is None) == (args.source_dir is None):
        raise IgptError("give a SIZE to download (s, m or l) or a folder with --from DIR, not both or neither")
    run = import_openai(args.size, args.name, source_dir=args.source_dir, steps=args.steps, n_head=args.n_head,
                        runs_dir=_runs_dir(args), progress=not args.json, overwrite=args.overwrite, url=args.url,
                        download_dir=args.download_dir)
    _emit(args, {**run.summary(), "checkpoints": run.checkpoints(), "label": imported_label(run)},
          f"imported {imported_label(run)} as run {run.name!r} ({run.path}), checkpoints at steps "
          f"{', '.join(map(str, run.checkpoints()))}; try `igpt sample {run.name} --image PHOTO --out grid.png`")


# -- apps -------------------------------------------------------------------------------------------


def _app_file(name: str, needs: str) -> Path:
    """apps/NAME.py of this source checkout, else of the installed igpt_apps package (`pip install "igpt[apps]"`)."""
    import importlib.util

    missing = f'the {name} needs {needs}, which is not installed: pip install "igpt[apps]"'
    if importlib.util.find_spec(needs) is None:
        raise IgptError(missing)
    checkout = REPO / "apps" / f"{name}.py"
    if checkout.is_file():
        return checkout
    package = importlib.util.find_spec("igpt_apps")
    installed = Path(package.origin).parent / f"{name}.py" if package and package.origin else None
    if installed is None or not installed.is_file():
        raise IgptError(f"the {name} app is not installed with igpt_core: {missing}")
    return installed


def _app(args, command: list[str]) -> None:
    """Run an app in its own process with this runs folder."""
    env = dict(os.environ, IGPT_RUNS_DIR=str(_runs_dir(args).resolve()))
    raise SystemExit(subprocess.call(command, env=env))


def cmd_demo(args) -> None:
    script = _app_file("demo", "gradio")
    _app(args, [sys.executable, str(script), "--port", str(args.port), "--host", args.host])


def cmd_dashboard(args) -> None:
    script = _app_file("dashboard", "streamlit")
    _app(args, [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(args.port),
                "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
                "--server.fileWatcherType", "none",
                "--client.toolbarMode", "minimal"])  # no "Deploy" button: this is a local tool


# -- the parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .model import PRESETS
    from .training import TrainConfig

    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT explorer: train iGPT on pixels, complete images, probe what the layers know.",
        epilog="Runs live under ./runs (or --runs-dir, or $IGPT_RUNS_DIR). `igpt COMMAND --help` explains each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text)
        p.add_argument("--runs-dir", help="folder holding the runs (default: $IGPT_RUNS_DIR or ./runs)")
        p.set_defaults(func=func)
        return p

    def model_options(p):
        p.add_argument("run", help="run name (see `igpt runs`)")
        p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    def sampling_options(p):
        p.add_argument("-n", type=int, default=4, help="number of samples, in one batch (default 4)")
        p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative (default 1)")
        p.add_argument("--top-k", type=int, help="sample only from the k most likely colours")
        p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of colours with this probability mass")
        p.add_argument("--seed", type=int, default=0, help="same seed, same output (default 0)")
        int8_option(p)

    def int8_option(p):
        p.add_argument("--int8", action="store_true",
                       help="decode with int8 weights: faster on CPUs, approximate (autoregressive runs only)")

    datasets = ", ".join(DATASETS)
    d = TrainConfig()
    p = command("train", cmd_train, "train an iGPT model on a dataset (creates or resumes a run)",
                "Fit a palette on the training images, then train with AdamW (0.9, 0.95), warm-up and cosine decay. "
                "Checkpoints are kept at log-spaced steps so that probes can follow training. "
                "Launch with torchrun for several processes or GPUs.")
    p.add_argument("--dataset", default="digits",
                   help=f"one of: {datasets} (default digits); these are tokenised into memory when training "
                        "starts. For data larger than memory: shards:DIR, palette ids written by `igpt tokenize`, "
                        "streamed from disk (each process reads only its share of every batch)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--objective", default="ar", choices=["ar", "bert"], help="autoregressive or BERT (default ar)")
    p.add_argument("--name", help="run name (default DATASET-PRESET-OBJECTIVE)")
    p.add_argument("--colors", type=int,
                   help="palette size k (the paper: 512; default 16; shards: their palette's, --resume: the run's)")
    p.add_argument("--resolution", type=int, help="image side to train at (default: the dataset's own)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up fraction of steps (default {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between val losses (default {d.eval_every})")
    p.add_argument("--checkpoints", type=_int_list, help="comma-separated steps to keep (default: ~6 log-spaced)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for palette, splits, init, batches (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPUs)")
    p.add_argument("--activation-checkpointing", action="store_true", help="trade compute for memory (large presets)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and Adam state over the processes (FSDP), "
                        "for models that do not fit one GPU (e.g. --preset xl)")
    p.add_argument("--save-every", type=_save_every, default=d.save_every, metavar="N|Ns|Nm|Nh",
                   help="also save the resume state every N steps, or every N seconds/minutes/hours of wall "
                        f"time, so a killed run loses at most that (default {d.save_every})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model setting, e.g. --set n_layer=2 --set n_embd=64 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved state")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--skip-existing", action="store_true", help="do nothing if the run already finished these steps")
    p.add_argument("--data-dir", help="where dataset files live (default $IGPT_DATA_DIR or ./data)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")

    p = command("runs", cmd_runs, "list runs with dataset, objective, preset, steps and best val bits/dim")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = command("data", cmd_data, "show a dataset: size, resolution, labels, and a PNG grid of examples")
    p.add_argument("dataset", help=f"one of: {datasets}")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--out", help="PNG to write (default DATASET-SPLIT.png)")
    p.add_argument("--data-dir", help="where dataset files live (default $IGPT_DATA_DIR or ./data)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR/MNIST/STL-10 files if missing (needs a network; ImageNet needs a login)")
    p.add_argument("--json", action="store_true", help="print as JSON")

    p = command("tokenize", cmd_tokenize, "write a dataset's palette ids as memory-mapped shards, for data larger than memory",
                "Maps every image of the chosen splits to palette ids at one resolution and writes them as uint16 .npy "
                "shards plus labels and index.json (sizes, resolution, palette fingerprint), in a folder that appears "
                "only when complete. Then `igpt train --dataset shards:DIR` streams batches from it, whatever its size.")
    p.add_argument("dataset", help=f"one of: {datasets}")
    p.add_argument("--out", required=True, help="folder to write (must not exist, unless --overwrite)")
    p.add_argument("--palette", help="reuse a palette: a run name, its palette.json, or a shards folder")
    p.add_argument("--colors", type=int, help="or fit a K-colour palette on up to 10 000 training images")
    p.add_argument("--resolution", type=int, help="image side (default: the dataset's own)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")
    p.add_argument("--shard-images", type=int, help="images per shard file (default: ~256 MB a shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split and the palette sample (default 0)")
    p.add_argument("--data-dir", help="where dataset files live (default $IGPT_DATA_DIR or ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR/MNIST/STL-10 files if missing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")

    p = command("sample", cmd_sample, "complete an image from its top rows, or sample unconditionally",
                "Writes a grid: original, the model's view (resized, quantised), the kept rows, and N completions.")
    model_options(p)
    sampling_options(p)
    p.add_argument("--image", help="image file to complete")
    p.add_argument("--keep-rows", type=int, help="rows to keep from the top (default: half)")
    p.add_argument("--unconditional", action="store_true", help="sample from nothing")
    p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")

    p = command("score", cmd_score, "likelihood of a dataset split in nats/token and bits/dim")
    model_options(p)
    p.add_argument("--dataset", help="dataset (default: the run's own)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, help="score only the first N images")
    p.add_argument("--data-dir", help="where dataset files live")
    int8_option(p)

    p = command("surprise", cmd_surprise, "per-pixel surprise (negative log-likelihood) of an image, as a picture")
    model_options(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", default="surprise.png", help="PNG to write (default surprise.png)")

    p = command("inside", cmd_inside, "inside the model: one pixel's next-colour distribution, attention, and logit lens",
                "Writes a picture: the model's view with the pixel marked and its top-8 colours with probabilities; "
                "where every layer's query for that pixel attends (mean over heads) as heat maps over the image; "
                "and what each layer would paint (the argmax colour of each layer's residual stream read out through "
                "the final norm and head, the 'logit lens'). AR models see the pixels before it; BERT models see "
                "all the others, the pixel masked.")
    model_options(p)
    p.add_argument("--image", required=True, help="image file (resized and quantised to the model's view)")
    p.add_argument("--pixel", required=True, metavar="ROW,COL", help="the pixel to look at, 0-based, e.g. 3,4")
    p.add_argument("--out", default="inside.png", help="PNG to write (default inside.png)")

    p = command("probe", cmd_probe, "linear probes of every layer across checkpoints (the paper's central measurement)",
                "Features = mean over positions of each block's input norm, one forward pass for all layers, cached "
                "per checkpoint; L-BFGS logistic regression on standardised features, C chosen on the val split, "
                "accuracy on the test split. Saved in the run (probes/DATASET.json) with raw-pixel and random-init references. "
                "Fits are single-threaded, several at once in separate processes: the numbers do not depend on thread "
                "settings. Under torchrun (`torchrun --nproc_per_node=N -m igpt_core.cli probe RUN`) the processes "
                "share the feature extraction; rank 0 fits and writes.")
    p.add_argument("run", help="run name")
    p.add_argument("--dataset", help="labelled dataset (default: the run's own)")
    p.add_argument("--checkpoints", type=_steps_or_all, default="all", help="all, last, or comma-separated steps")
    p.add_argument("--layers", type=_steps_or_all, default="all", help="all, or comma-separated layers (0 = embeddings)")
    p.add_argument("--concat", type=_int_list, metavar="L1,L2,...",
                   help="also probe these layers' features joined end to end (its own row; the paper's best "
                        "ImageNet probe joins five layers)")
    p.add_argument("--workers", type=int, help="processes fitting probes at once (default: one per core)")
    p.add_argument("--bert-masks", type=int, default=4, help="BERT runs: random masks averaged with no mask (default 4)")
    p.add_argument("--max-train", type=int, help="probe on at most N training images")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing if stored results already cover the checkpoints asked for")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="where dataset files live")
    p.add_argument("--json", action="store_true", help="print the table as JSON")

    p = command("finetune", cmd_finetune, "fine-tune a run into a classifier (L_CLF + L_GEN, early stopping)")
    p.add_argument("run", help="pre-trained run")
    p.add_argument("--dataset", help="labelled dataset (default: the run's own)")
    p.add_argument("--name", help="classifier run name (default RUN-ft-DATASET)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, help="default: pre-training lr / 10")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gen-weight", type=float, default=1.0, help="weight of the generative loss (0: L_CLF alone)")
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    p.add_argument("--step", type=int, help="checkpoint to start from (default: the last)")
    p.add_argument("--max-train", type=int, help="at most N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--data-dir", help="where dataset files live")
    p.add_argument("--json", action="store_true")

    p = command("classify", cmd_classify, "class probabilities of an image under a fine-tuned classifier run")
    p.add_argument("run", help="classifier run (made by igpt finetune)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--top", type=int, default=5, help="classes to show (default 5)")
    p.add_argument("--json", action="store_true")

    p = command("import-hf", cmd_import_hf, "make a run from OpenAI's released iGPT weights (Hugging Face format)",
                "SOURCE is a hub id (openai/imagegpt-small|medium|large, downloaded when online) or a local folder "
                "written by save_pretrained (config.json, weights, preprocessor_config.json with the clusters).")
    p.add_argument("source", help="hub id or folder")
    p.add_argument("--name", required=True, help="name of the new run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")

    p = command("export-hf", cmd_export_hf, "write a run as a Hugging Face ImageGPT folder (model + image processor)")
    p.add_argument("run", help="run name (autoregressive runs only)")
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the last)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    import_openai_parser(command)

    p = command("demo", cmd_demo, "open the browser completion demo (Gradio) on http://127.0.0.1:7860")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")

    p = command("dashboard", cmd_dashboard, "open the probe dashboard (Streamlit) on http://127.0.0.1:8501")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except IgptError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
