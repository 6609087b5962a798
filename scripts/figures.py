"""The pictures of the README and the docs site, made offline from the library's public API.

    python scripts/figures.py                      # docs/images/*.png from runs/ (trains what is missing)
    python scripts/figures.py --tiny --out DIR     # the same pictures from minute models (the test uses this)

It trains what it needs with the `igpt` command itself, as a reader would: the default digits run
exactly as the Makefile's `default-run` recipe makes it, and a small run on the built-in photos; it
probes the digits run as `make dashboard` does. Runs that already exist are kept (--skip-existing),
so a second call only redraws. Then it draws, with `igpt_core.render`:

- completions_digits.png, completions_photos.png: half-image completions, as the paper samples them;
- inside.png: what one pixel is drawn from, where each layer looked, what each layer would paint;
- probe.png: linear-probe accuracy by layer at every checkpoint (the paper's §4.1 and §4.2).

Each picture must stay under MAX_BYTES, so that the repository stays light.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from igpt_core import builtin_photos, complete, explain, load_dataset, load_probe_results, open_run
from igpt_core.cli import main as igpt
from igpt_core.files import atomic_write
from igpt_core.render import grid, hide_rows, inside_picture, save_png

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 200_000
SAMPLES = 4  # completions per image: several, to show what varies and what the top half fixes
HELD_OUT = ("cat", "coffee")  # built-in photos outside the photos run's training split

# The runs, as `igpt train` arguments. The digits run is the Makefile's default-run recipe, word for word.
DIGITS = ["--dataset", "digits", "--preset", "tiny", "--colors", "16", "--steps", "300", "--name", "digits"]
# Photos: 16×16 crops in 32 colours, 4 blocks of width 128, 200 steps of 16 crops: as many tokens a step
# as the digits run and fewer steps, so about as long (1–3 minutes on 2 quiet CPU cores).
PHOTOS = ["--dataset", "photos", "--preset", "tiny", "--resolution", "16", "--colors", "32", "--steps", "200",
          "--batch-size", "16", "--name", "photos"]
# --tiny: the same pictures from models that train in seconds (the test's sizes, not for showing).
TINY = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--steps", "20", "--eval-every", "5"]


def train_runs(runs_dir: Path, tiny: bool) -> None:
    """The digits and photos runs, trained if missing; the digits run probed if not probed yet."""
    common = ["--runs-dir", str(runs_dir), "--skip-existing"]
    for recipe in (DIGITS, PHOTOS):
        igpt(["train", *recipe, *common, *(TINY if tiny else [])])
    igpt(["probe", "digits", *common, *(["--max-train", "300", "--workers", "1"] if tiny else [])])


def completions(runs_dir: Path, name: str, images: list[np.ndarray]) -> np.ndarray:
    """Rows of (original, model's view, the kept top half, SAMPLES completions), one row per image."""
    model, palette, _ = open_run(name, runs_dir).load()
    size = model.config.image_size
    rows = []
    for seed, image in enumerate(images):
        resized, ids, seen = palette.view(image, size)
        samples = palette.decode(complete(model, ids, size // 2, SAMPLES, seed=seed), size)
        rows.append([resized, seen, hide_rows(seen, size // 2), *samples])
    labels = ["original", "model's view", "top half", *[f"completion {i + 1}" for i in range(SAMPLES)]]
    return grid(rows, labels=labels)


def inside(runs_dir: Path, picture_index: int = 3) -> np.ndarray:
    """The `igpt inside` picture for a pixel in the middle of a validation digit: the pixel the model
    must draw once it has seen the top half."""
    model, palette, _ = open_run("digits", runs_dir).load()
    size = model.config.image_size
    row, col = size // 2, size // 2 - 1
    t = row * size + col
    image = load_dataset("digits", "val", resolution=size).images[picture_index]
    ids = palette.encode(image[None], size)[0]
    true_id = int(ids[t])
    numbers = explain.describe(explain.next_pixel(model, ids, t), true_id)
    attention = explain.attention_maps(model, ids, t).pixels.mean(1).numpy()  # (layers, side, side)
    lens = explain.layer_predictions(model, ids)  # (layers + 1, pixels, colours): log-probabilities
    top = numbers["top_ids"]
    # Rows and columns counted from 1, as the CLI and the apps count them.
    title = (f"pixel (row {row + 1}, column {col + 1}): true colour p = {numbers['true_probability']:.2f}, rank "
             f"{numbers['true_rank']} of {model.config.n_colors}")
    return inside_picture(palette.decode(ids[None], size)[0], row, col, palette.colors[top],
                          numbers["top_probabilities"], top.index(true_id) if true_id in top else None, attention,
                          palette.decode(lens.argmax(-1).numpy(), size), lens[:, t, true_id].exp().tolist(), title)


def probe_chart(runs_dir: Path, path: Path) -> None:
    """Test accuracy by layer, one line per checkpoint (darker = later), with the two references."""
    import matplotlib

    matplotlib.use("Agg")  # no display: draw into a file
    import matplotlib.pyplot as plt

    table = load_probe_results("digits", runs_dir=runs_dir)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    colors = plt.cm.viridis(np.linspace(0.9, 0.1, len(table.steps)))
    for step, color in zip(table.steps, colors):
        rows = [r for r in table.rows if r["step"] == step]
        ax.plot([r["layer"] for r in rows], [100 * r["test_acc"] for r in rows], "o-", color=color,
                label=f"step {step} (val loss {rows[0]['val_loss']:.2f})")
    raw = table.references.get("raw_pixels")
    if raw:
        ax.axhline(100 * raw["test_acc"], color="grey", linestyle="--", label="raw pixels")
    random_init = table.references.get("random_init") or []
    if random_init:
        best = max(random_init, key=lambda r: r["val_acc"])
        ax.axhline(100 * best["test_acc"], color="grey", linestyle=":", label="random init (best layer)")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r["layer"] for r in table.rows}))
    ax.set_title(f"Linear probes of the digits run on {table.dataset}")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def centre_square(image: np.ndarray) -> np.ndarray:
    """The largest square in the middle of an image."""
    h, w = image.shape[:2]
    side = min(h, w)
    return image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]


def draw(runs_dir: Path, out: Path) -> list[Path]:
    """Every picture into `out`; returns their paths, each checked to be under MAX_BYTES."""
    out.mkdir(parents=True, exist_ok=True)
    photos = builtin_photos()
    pictures = {
        "completions_digits.png": completions(runs_dir, "digits", list(load_dataset("digits", "val").images[:4])),
        # The cat and the coffee are the photos' test and validation splits: the model never trained on them.
        "completions_photos.png": completions(runs_dir, "photos", [centre_square(photos[name]) for name in HELD_OUT]),
        "inside.png": inside(runs_dir),
    }
    for name, picture in pictures.items():
        save_png(picture, out / name)
    probe_chart(runs_dir, out / "probe.png")
    paths = [out / name for name in [*pictures, "probe.png"]]
    for path in paths:
        if path.stat().st_size > MAX_BYTES:
            sys.exit(f"{path} is {path.stat().st_size} bytes, over {MAX_BYTES}: draw it smaller")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs (default docs/images)")
    parser.add_argument("--runs-dir", default=os.environ.get("IGPT_RUNS_DIR", "runs"),
                        help="folder of the runs to train or reuse (default $IGPT_RUNS_DIR or ./runs)")
    parser.add_argument("--tiny", action="store_true", help="minute models, for testing this script")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    train_runs(runs_dir, args.tiny)
    for path in draw(runs_dir, Path(args.out)):
        print(f"{path} ({path.stat().st_size // 1000} kB)")


if __name__ == "__main__":
    main()
