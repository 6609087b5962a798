"""The commands that look at one checkpoint: `igpt sample` (completions), `igpt score` (likelihood),
`igpt surprise` (per-pixel surprise) and `igpt inside` (one pixel, inside the model).

Pixels are counted the way people count rows and columns: from 1, at the top left."""

from __future__ import annotations

from pathlib import Path

from igpt_core import IgptError

from .common import add_data_dir, add_int8, add_model, add_precision, command, emit, load_model


def cmd_sample(args) -> None:
    from igpt_core import complete, load_image, unconditional
    from igpt_core.render import completion_grid, grid, hide_rows, save_png

    run, model, palette = load_model(args)
    size = model.config.image_size
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   precision="int8" if args.int8 else "fp32")
    out = Path(args.out)
    if args.unconditional:
        ids = unconditional(model, args.n, **options)
        save_png(grid([list(palette.decode(ids, size))]), out)
        emit(args, {"run": run.name, "samples": args.n, "out": str(out)}, f"{args.n} samples -> {out}")
        return
    if not args.image:
        raise IgptError("give --image PATH to complete (or --unconditional for samples from nothing)")
    keep = size // 2 if args.keep_rows is None else args.keep_rows
    resized, ids, seen = palette.view(load_image(args.image), size)  # seen: the ids in the palette's colours
    samples = palette.decode(complete(model, ids, keep, args.n, **options), size)
    save_png(completion_grid(resized, seen, hide_rows(seen, keep), samples), out)
    emit(args, {"run": run.name, "keep_rows": keep, "samples": args.n, "out": str(out)},
         f"{args.n} completions of {args.image} from its first {keep} of {size} rows -> {out}")


def cmd_score(args) -> None:
    import numpy as np
    import torch

    from igpt_core import load_dataset, score
    from igpt_core import palette_ids

    run, model, palette = load_model(args)
    size = model.config.image_size
    data = load_dataset(args.dataset or run.info["dataset"], args.split, data_dir=args.data_dir, resolution=size)
    rows = np.arange(min(args.limit, len(data))) if args.limit else None
    ids = palette_ids(data, palette, size, rows)  # token datasets: their ids as they are
    result = score(model, torch.from_numpy(ids), precision="int8" if args.int8 else args.precision)
    result.update(run=run.name, dataset=data.name, split=args.split)
    emit(args, result, f"{run.name} on {data.name} [{args.split}], {result['images']} images: "
                       f"{result['nats_per_token']:.4f} nats/token = {result['bits_per_token']:.4f} bits/token "
                       f"({result['bits_per_subpixel']:.4f} per RGB sub-pixel)\nnote: {result['note']}")


def cmd_surprise(args) -> None:
    import numpy as np

    from igpt_core import load_image, surprise_map
    from igpt_core.render import save_png, surprise_picture

    run, model, palette = load_model(args)
    _, ids, seen = palette.view(load_image(args.image), model.config.image_size)
    nll = surprise_map(model, ids, precision=args.precision)
    save_png(surprise_picture(seen, nll), args.out)
    row, col = (int(i) + 1 for i in np.unravel_index(nll.argmax(), nll.shape))
    emit(args, {"run": run.name, "mean_nats": float(nll.mean()), "max_nats": float(nll.max()),
                "most_surprising_pixel": [row, col], "out": args.out, "nll": nll.tolist()},
         f"mean {nll.mean():.3f} nats/pixel, most surprising pixel (row {row}, column {col}, from 1) at "
         f"{nll.max():.2f} nats -> {args.out}")


def inside_numbers(args, model, ids, t: int):
    """(explain.describe's numbers for pixel t, its attention, the logit lens' readings)."""
    from igpt_core import explain

    numbers = explain.describe(explain.next_pixel(model, ids, t, precision=args.precision), int(ids[t]))
    attention = explain.attention_maps(model, ids, t, precision=args.precision)
    lens = explain.layer_predictions(model, ids, precision=args.precision)
    return numbers, attention, lens


def cmd_inside(args) -> None:
    from igpt_core import load_image
    from igpt_core import parse_pixel
    from igpt_core.render import inside_picture, save_png

    run, model, palette = load_model(args)
    size, step = model.config.image_size, run.resolve_step(args.step)
    row, col = parse_pixel(args.pixel, size)
    t = row * size + col
    ids = palette.encode(load_image(args.image)[None], size)[0]
    numbers, attention, lens = inside_numbers(args, model, ids, t)
    layer_p = lens[:, t, int(ids[t])].exp().tolist()
    top = numbers["top_ids"]
    title = (f"{run.name} step {step}, pixel (row {row + 1}, column {col + 1}): true colour p = "
             f"{numbers['true_probability']:.3f}, rank {numbers['true_rank']} of {model.config.n_colors}, "
             f"entropy {numbers['entropy']:.2f} nats")
    picture = inside_picture(palette.decode(ids[None], size)[0], row, col, palette.colors[top],
                             numbers["top_probabilities"], top.index(int(ids[t])) if int(ids[t]) in top else None,
                             attention.pixels.mean(1).numpy(), palette.decode(lens.argmax(-1).numpy(), size),
                             layer_p, title)
    save_png(picture, args.out)
    result = dict(run=run.name, step=step, pixel=[row + 1, col + 1], objective=model.config.objective, **numbers,
                  top_colors=palette.colors[top].tolist(), layer_true_probability=layer_p,
                  attention_mean_over_heads=attention.pixels.mean(1).tolist(),
                  attention_sos=None if attention.sos is None else attention.sos.tolist(), out=args.out)
    emit(args, result, f"{title}\n  top colours {top} with p {[round(p, 3) for p in numbers['top_probabilities']]}"
                       f"\n  picture -> {args.out}")


def add_sample(sub) -> None:
    p = command(sub, "sample", cmd_sample, "complete an image from its top rows, or sample unconditionally",
                "Writes a grid: original, the model's view (resized, quantised), the kept rows, and N completions.")
    add_model(p)
    p.add_argument("-n", type=int, default=4, help="number of samples, in one batch (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative (default 1)")
    p.add_argument("--top-k", type=int, help="sample only from the k most likely colours")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of colours with this probability mass")
    p.add_argument("--seed", type=int, default=0, help="same seed, same output (default 0)")
    add_int8(p)
    p.add_argument("--image", help="image file to complete")
    p.add_argument("--keep-rows", type=int, help="rows to keep from the top (default: half)")
    p.add_argument("--unconditional", action="store_true", help="sample from nothing")
    p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")


def add_score(sub) -> None:
    p = command(sub, "score", cmd_score, "likelihood of a dataset split in nats/token and bits/token")
    add_model(p)
    p.add_argument("--dataset", help="dataset (default: the run's own); OpenAI's encoded openai:imagenet and "
                                     "openai:cifar10 are scored on their ids as they are, for runs with OpenAI's palette")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, help="score only the first N images")
    add_data_dir(p)
    add_precision(p)
    add_int8(p)


def add_surprise(sub) -> None:
    p = command(sub, "surprise", cmd_surprise, "per-pixel surprise (negative log-likelihood) of an image, as a picture",
                "Writes the model's view beside its surprise map, from dark (0 nats: a colour the model was "
                "certain of) to bright (the picture's most surprising pixel).")
    add_model(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", default="surprise.png", help="PNG to write (default surprise.png)")
    add_precision(p)


def add_inside(sub) -> None:
    p = command(sub, "inside", cmd_inside,
                "inside the model: one pixel's next-colour distribution, attention, and logit lens",
                "Writes a picture: the model's view with the pixel marked and its top-8 colours with probabilities; "
                "where every layer's query for that pixel attends (mean over heads) as heat maps over the image; "
                "and what each layer would paint (the argmax colour of each layer's residual stream read out through "
                "the final norm and head, the 'logit lens'). AR models see the pixels before it; BERT models see "
                "all the others, the pixel masked.")
    add_model(p)
    p.add_argument("--image", required=True, help="image file (resized and quantised to the model's view)")
    p.add_argument("--pixel", required=True, metavar="ROW,COL",
                   help="the pixel to look at, counted from 1 at the top left, e.g. 3,4 (as in the demo)")
    p.add_argument("--out", default="inside.png", help="PNG to write (default inside.png)")
    add_precision(p)
