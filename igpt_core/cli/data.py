"""`igpt data` (look at a dataset) and `igpt tokenize` (write its palette ids as shards)."""

from __future__ import annotations

import sys
from pathlib import Path

from igpt_core import IgptError
from igpt_core import safe_name

from .common import add_data_dir, add_json, command, emit, runs_dir


def cmd_data(args) -> None:
    import numpy as np

    from igpt_core import open_dataset
    from igpt_core.render import grid, save_png

    data = open_dataset(args.dataset, args.split, data_dir=args.data_dir, download=args.download)  # reads 32 images only
    out = Path(args.out or f"{safe_name(args.dataset)}-{args.split}.png")
    picks = np.random.default_rng(0).choice(len(data), size=min(32, len(data)), replace=False)
    examples = data.take(np.sort(picks))
    save_png(grid([list(examples[i : i + 8]) for i in range(0, len(picks), 8)]), out)
    counts = None
    if data.labels is not None:
        counts = {data.classes[c]: int(n) for c, n in zip(*np.unique(data.labels, return_counts=True))}
    result = {"dataset": args.dataset, "split": args.split, "images": len(data), "resolution": data.resolution,
              "labelled": data.labels is not None, "classes": data.classes, "class_counts": counts,
              "examples_png": str(out)}
    more = " ..." if len(data.classes or []) > 12 else ""
    labels = f"{len(data.classes)} classes: {', '.join(data.classes[:12])}{more}" if data.classes else "unlabelled"
    emit(args, result, f"{args.dataset} [{args.split}]: {len(data)} images, {data.resolution}×{data.resolution}, "
                       f"{labels}\nexamples: {out}")


def palette_of(source: str, args):
    """--palette: a palette JSON file (a run's palette.json, a shards folder's) or a run name."""
    from igpt_core import Palette, open_run

    path = Path(source).expanduser()
    if path.is_file():
        return Palette.load(path)
    if path.is_dir() and (path / "palette.json").is_file():
        return Palette.load(path / "palette.json")
    return open_run(source, runs_dir(args)).palette


def cmd_tokenize(args) -> None:
    from igpt_core import tokenize
    from igpt_core import fit_palette

    if (args.palette is None) == (args.colors is None):
        raise IgptError("give --palette RUN_OR_FILE (reuse a run's palette) or --colors K (fit one), not both")
    if args.palette is not None:
        palette = palette_of(args.palette, args)
    else:
        if not args.json:
            print(f"fitting a {args.colors}-colour palette on a sample of {args.dataset} ...", file=sys.stderr)
        palette = fit_palette(args.dataset, args.colors, data_dir=args.data_dir, seed=args.seed,
                              resolution=args.resolution)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    shards = tokenize(args.dataset, palette, args.out, resolution=args.resolution, splits=splits, data_dir=args.data_dir,
                      seed=args.seed, download=args.download, shard_images=args.shard_images, overwrite=args.overwrite,
                      progress=not args.json)
    sizes = {name: entry["images"] for name, entry in shards.index["splits"].items()}
    result = {"out": str(shards.path), "dataset": args.dataset, "resolution": shards.resolution, "colors": len(palette),
              "palette_fingerprint": shards.index["palette_fingerprint"], "images": sizes}
    emit(args, result, f"tokenised {args.dataset} at {shards.resolution}×{shards.resolution} with a {len(palette)}-colour "
                       f"palette: {', '.join(f'{n} {k}' for k, n in sizes.items())} images -> {shards.path}\n"
                       f"train on them with `igpt train --dataset shards:{shards.path}`")


def add_data(sub) -> None:
    from igpt_core import DATASETS

    p = command(sub, "data", cmd_data, "show a dataset: size, resolution, labels, and a PNG grid of examples")
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--out", help="PNG to write (default DATASET-SPLIT.png)")
    add_data_dir(p)
    p.add_argument("--download", action="store_true",
                   help="download CIFAR/MNIST/STL-10 files if missing (needs a network; ImageNet needs a login)")
    add_json(p, "print as JSON")


def add_tokenize(sub) -> None:
    from igpt_core import DATASETS

    p = command(sub, "tokenize", cmd_tokenize,
                "write a dataset's palette ids as memory-mapped shards, for data larger than memory",
                "Maps every image of the chosen splits to palette ids at one resolution and writes them as uint16 .npy "
                "shards plus labels and index.json (sizes, resolution, palette fingerprint), in a folder that appears "
                "only when complete. Then `igpt train --dataset shards:DIR` streams batches from it, whatever its size.")
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--out", required=True, help="folder to write (must not exist, unless --overwrite)")
    p.add_argument("--palette", help="reuse a palette: a run name, its palette.json, or a shards folder")
    p.add_argument("--colors", type=int, help="or fit a K-colour palette on up to 10 000 training images")
    p.add_argument("--resolution", type=int, help="image side (default: the dataset's own)")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")
    p.add_argument("--shard-images", type=int, help="images per shard file (default: ~256 MB a shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split and the palette sample (default 0)")
    add_data_dir(p)
    p.add_argument("--download", action="store_true", help="download CIFAR/MNIST/STL-10 files if missing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    add_json(p, "print the result as JSON (no progress bar)")
