"""OpenAI's own iGPT training checkpoints (TensorFlow) -> one igpt run with a checkpoint per training step.

OpenAI released iGPT-S, -M and -L at 131k, 262k, 524k and 1M steps (the checkpoints behind the paper's
Figure 3) as TF1 Saver bundles plus the 512-colour palette `kmeans_centers.npy`. They are read by
`tf_bundle` (no TensorFlow needed) and converted tensor by tensor, one step at a time, so iGPT-L
(1.36B parameters, 5.4 GB per step, three times that with the Adam slots we never read) fits a
laptop. The graph (openai/image-gpt, src/model.py) is the iGPT block of our model.py; only the
weight layout differs:

    OpenAI (TensorFlow)                              ours (Hugging Face layout, nn.Linear = (out, in))
    model/wte [512, d], model/sos [d]                wte.weight [513, d]: rows 0-511, then SOS as row 512
    model/wpe [n_ctx, d]                             wpe.weight
    model/hN/attn/{q,k,v}_proj [heads, d/heads, d]   h.N.attn.c_attn.weight [3d, d] = q|k|v, each (heads·e, f)
        used as einsum("bsf,hef->bhse")
    model/hN/attn/c_proj [heads, d/heads, d]         h.N.attn.c_proj.weight [d, d] = (f, heads·e)
        used as einsum("bhse,hef->bsf")
    model/hN/mlp/c_fc/w [d, 4d], c_proj/w [4d, d]    h.N.mlp.c_fc / c_proj .weight, transposed
    model/hN/ln_1/g, ln_2/g, model/ln_f/g            h.N.ln_1 / ln_2 .weight, ln_f.weight
    model/wtet [512, d] (an untied head)             lm_head.weight
    (no biases)                                      every bias zero

OpenAI's graph puts the SOS vector in place of position 0's input and adds wpe at every position,
exactly what our model does with SOS as token 512. The head count is read from the q_proj shape.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from ..data import default_data_dir
from ..data.openai import CENTERS_FILE, fetch_openai_palette, openai_folder, openai_url
from ..download import byte_bar, download
from ..errors import CheckpointError, IgptError, RunError
from ..model import IGPT, ModelConfig
from ..palette import Palette
from ..progress import progress_bar
from ..runs import Run, create_run, runs_root, save_checkpoint
from .labels import OPENAI_SIZES, imported_record, openai_model_name
from .tf_bundle import TensorBundle

OPENAI_STEPS = (131000, 262000, 524000, 1000000)
_INDEX = re.compile(r"model\.ckpt-(\d+)\.index$")


# -- where the files are ----------------------------------------------------------------------------


def base_url(url: str | None = None) -> str:
    """The server holding OpenAI's files: `url`, else $IGPT_OPENAI_URL, else OpenAI's own."""
    return (url or openai_url()).rstrip("/")


def checkpoint_url(base: str, size: str, step: int, filename: str) -> str:
    return f"{base}/checkpoints/igpt-{size}/{step}/{filename}"


def default_download_dir(size: str) -> Path:
    """Where downloads of iGPT-SIZE are kept (and resumed): DATA_DIR/openai/igpt-SIZE."""
    return openai_folder(default_data_dir()) / f"igpt-{size}"


def download_steps(size: str, steps, folder: Path, url: str | None, progress: bool) -> None:
    """OpenAI's files for iGPT-SIZE at `steps` into folder (flat, as their download.py lays them out).

    The palette is reused from the folder above (DATA_DIR/openai by default) or a checkpoint folder
    beside this one when it is there already (`fetch_openai_palette`)."""
    base = base_url(url)
    advice = "Another server can be given with --url or $IGPT_OPENAI_URL"
    with byte_bar(progress, f"downloading iGPT-{size.upper()}") as bar:
        fetch_openai_palette(folder, folder.parent, base=base, bar=bar, error=CheckpointError)
        for step in steps:
            prefix = f"model.ckpt-{step}"
            download(checkpoint_url(base, size, step, prefix + ".index"), folder / (prefix + ".index"), bar=bar,
                     advice=advice, error=CheckpointError)
            bundle = TensorBundle(folder / prefix)  # the index says how many shards there are
            for shard in range(bundle.num_shards):
                name = bundle.shard_path(shard).name
                download(checkpoint_url(base, size, step, name), folder / name, bar=bar, advice=advice,
                         error=CheckpointError)


def local_steps(folder: Path) -> list[int]:
    """The steps that have a model.ckpt-STEP.index in folder, ascending."""
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := _INDEX.match(f.name)))


# -- conversion -------------------------------------------------------------------------------------


def config_from_bundle(bundle: TensorBundle, n_head: int | None = None) -> ModelConfig:
    """Our ModelConfig from the shapes in an OpenAI checkpoint (AR objective)."""
    name = bundle.prefix.name
    if "model/sos" not in bundle.entries and "model/wte" in bundle.entries:
        raise CheckpointError(f"{name} has no model/sos: it is a BERT-objective checkpoint; igpt imports OpenAI's "
                              "autoregressive checkpoints only")
    n_colors, width = bundle.shape("model/wte")
    n_layer = sum(1 for key in bundle.entries if re.fullmatch(r"model/h\d+/ln_1/g", key))
    if n_layer == 0:
        raise CheckpointError(f"{name} has no transformer blocks (model/h0/...): it is not an iGPT checkpoint")
    heads = bundle.shape("model/h0/attn/q_proj")[0]
    if n_head is not None and n_head != heads:
        raise CheckpointError(f"--n-head {n_head} does not fit {name}: its attention weights are split into {heads} "
                              f"heads (model/h0/attn/q_proj has shape {list(bundle.shape('model/h0/attn/q_proj'))}); "
                              "leave --n-head out")
    try:
        config = ModelConfig(vocab_size=n_colors + 1, n_positions=bundle.shape("model/wpe")[0], n_layer=n_layer,
                             n_head=heads, n_embd=width, objective="ar")
    except IgptError as err:
        raise CheckpointError(f"{name} does not describe a model igpt can hold: {err}") from None
    expected = tf_shapes(config)
    wrong = [key for key, shape in expected.items() if bundle.shape(key) != shape]
    if wrong:
        raise CheckpointError(f"{name}: {wrong[0]} has shape {list(bundle.shape(wrong[0]))}, but the model's other "
                              f"tensors imply {list(expected[wrong[0]])}; the checkpoint is not a consistent iGPT model")
    return config


def tf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every model tensor in OpenAI's checkpoint of a model of this config."""
    d, heads, k = config.n_embd, config.n_head, config.n_colors
    shapes = {"model/wte": (k, d), "model/sos": (d,), "model/wpe": (config.n_positions, d), "model/wtet": (k, d),
              "model/ln_f/g": (d,)}
    for i in range(config.n_layer):
        h = f"model/h{i}"
        shapes.update({f"{h}/ln_1/g": (d,), f"{h}/ln_2/g": (d,), f"{h}/mlp/c_fc/w": (d, 4 * d),
                       f"{h}/mlp/c_proj/w": (4 * d, d)})
        shapes.update({f"{h}/attn/{p}": (heads, d // heads, d) for p in ("q_proj", "k_proj", "v_proj", "c_proj")})
    return shapes


def state_dict_from_bundle(bundle: TensorBundle, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (float32) from an OpenAI checkpoint, read tensor by tensor (each crc-checked)."""
    d = config.n_embd

    def read(key):
        return torch.from_numpy(bundle.read(key).astype(np.float32))  # a writable copy of the file's bytes

    zeros = lambda n: torch.zeros(n)  # noqa: E731 — OpenAI's layers have no biases
    state = {"wte.weight": torch.cat([read("model/wte"), read("model/sos")[None]]),  # SOS is token n_colors
             "wpe.weight": read("model/wpe")}
    for i in range(config.n_layer):
        tf, ours = f"model/h{i}", f"h.{i}"
        qkv = [read(f"{tf}/attn/{p}").reshape(d, d) for p in ("q_proj", "k_proj", "v_proj")]  # (heads·e, f) each
        state.update({
            f"{ours}.ln_1.weight": read(f"{tf}/ln_1/g"),
            f"{ours}.attn.c_attn.weight": torch.cat(qkv), f"{ours}.attn.c_attn.bias": zeros(3 * d),
            f"{ours}.attn.c_proj.weight": read(f"{tf}/attn/c_proj").reshape(d, d).t().contiguous(),  # (f, heads·e)
            f"{ours}.attn.c_proj.bias": zeros(d),
            f"{ours}.ln_2.weight": read(f"{tf}/ln_2/g"),
            f"{ours}.mlp.c_fc.weight": read(f"{tf}/mlp/c_fc/w").t().contiguous(), f"{ours}.mlp.c_fc.bias": zeros(4 * d),
            f"{ours}.mlp.c_proj.weight": read(f"{tf}/mlp/c_proj/w").t().contiguous(), f"{ours}.mlp.c_proj.bias": zeros(d),
        })
    state.update({"ln_f.weight": read("model/ln_f/g"), "lm_head.weight": read("model/wtet")})
    return state


def read_palette(folder: Path, n_colors: int) -> Palette:
    """kmeans_centers.npy: the colours in [-1, 1] (RGB = rint(127.5 · (c + 1)))."""
    path = folder / CENTERS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: OpenAI's palette comes with the checkpoints; download or copy it")
    try:
        palette = Palette(np.load(path, allow_pickle=False))
    except (ValueError, OSError, IgptError) as err:
        raise CheckpointError(f"{path} is not a usable palette ({err})") from None
    if len(palette) != n_colors:
        raise CheckpointError(f"{path} has {len(palette)} colours but the checkpoints predict {n_colors}")
    return palette


def open_step(folder: Path, step: int, n_head: int | None) -> tuple[TensorBundle, ModelConfig]:
    """One step's checkpoint, its shards checked against its index, and the model it holds."""
    bundle = TensorBundle(folder / f"model.ckpt-{step}")
    bundle.check_shards()
    return bundle, config_from_bundle(bundle, n_head)


def write_step(run: Run, bundle: TensorBundle, config: ModelConfig, palette: Palette, step: int, origin: str) -> None:
    """Convert one step and save it as the run's checkpoint at that step."""
    with torch.device("meta"):
        model = IGPT(config)  # shapes and names only: the weights are the converted tensors
    state = state_dict_from_bundle(bundle, config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    assert {key: value.shape for key, value in state.items()} == expected, "converter out of step with model.py"
    save_checkpoint(run.checkpoint_path(step), model, palette, state_dict=state, step=step, source=origin)


# -- the import -------------------------------------------------------------------------------------


def folder_steps(source_dir, steps) -> tuple[Path, list[int]]:
    """A local folder of OpenAI's files and the steps to take from it (default: all it holds)."""
    folder = Path(source_dir).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"there is no folder {folder}; pass the folder holding model.ckpt-STEP.index, "
                              f"its .data-* shards and {CENTERS_FILE}")
    found = local_steps(folder)
    steps = sorted(set(steps)) if steps else found
    missing = [step for step in steps if step not in found]
    if not steps or missing:
        raise CheckpointError(f"{folder} has no model.ckpt-{missing[0] if missing else 'STEP'}.index"
                              f" (steps there: {found or 'none'})")
    return folder, steps


def open_steps(folder: Path, steps: list[int], n_head: int | None) -> tuple[dict, ModelConfig]:
    """{step: bundle} with every step's index and shards checked, and the one model they all hold."""
    opened = {step: open_step(folder, step, n_head) for step in steps}
    config = opened[steps[0]][1]
    for step, (_, step_config) in opened.items():
        if step_config != config:
            raise CheckpointError(f"model.ckpt-{step} holds another model than model.ckpt-{steps[0]} "
                                  f"({step_config.n_layer} layers × {step_config.n_embd} vs {config.n_layer} × "
                                  f"{config.n_embd}); keep one model's checkpoints per folder")
    return {step: bundle for step, (bundle, _) in opened.items()}, config


def convert_steps(run: Run, bundles: dict, config: ModelConfig, palette: Palette, origin: str, progress: bool):
    """Write one checkpoint per step into the run (still in its temporary folder), one step at a time."""
    bar = progress_bar(progress, desc="converting", unit="checkpoint", total=len(bundles))
    try:
        for step, bundle in bundles.items():
            write_step(run, bundle, config, palette, step, origin)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()  # ends the bar's line, so an error prints on a line of its own


def import_openai(size: str | None = None, name: str | None = None, *, source_dir=None, steps=None,
                  n_head: int | None = None, runs_dir=None, progress: bool = True, overwrite: bool = False,
                  url: str | None = None, download_dir=None) -> Run:
    """Make run `name` from OpenAI's TensorFlow checkpoints, one igpt checkpoint per training step.

    size "s", "m" or "l": downloads (resuming interrupted files) iGPT-SIZE at `steps` (default
    131000, 262000, 524000 and 1000000) and its palette into download_dir (default
    DATA_DIR/openai/igpt-SIZE, kept for next time) from `url` (default $IGPT_OPENAI_URL or OpenAI's
    server). source_dir: read model.ckpt-STEP.* and kmeans_centers.npy from that folder instead
    (default steps: all it holds). n_head, if given, must match the checkpoint. Every step's files
    are checked before anything is written; the run is built in a temporary folder and appears
    only when every step is converted.
    """
    if not name:
        raise RunError("give the new run a name (--name NAME)")
    target = runs_root(runs_dir) / name
    if target.exists() and not overwrite:  # before downloading gigabytes
        raise RunError(f"a run named {name!r} already exists at {target}: pass --overwrite to replace it, or "
                       "choose another --name")
    if source_dir is not None:
        folder, steps = folder_steps(source_dir, steps)
        origin = str(folder.resolve())
    else:
        if size not in OPENAI_SIZES:
            raise CheckpointError(f"unknown size {size!r}: OpenAI released s, m and l (or pass a folder with --from)")
        folder = Path(download_dir) if download_dir else default_download_dir(size)
        steps = sorted(set(steps or OPENAI_STEPS))
        download_steps(size, steps, folder, url, progress)
        origin = f"{base_url(url)}/checkpoints/igpt-{size}"

    bundles, config = open_steps(folder, steps, n_head)
    palette = read_palette(folder, config.n_colors)
    model_name = openai_model_name(config) or f"OpenAI iGPT ({config.n_layer} layers × {config.n_embd})"
    info = {"dataset": f"imported:{origin}", "preset": None, "model_config": config.to_dict(), "train_config": None,
            "classes": None, "source": origin, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "imported": {**imported_record("openai-tf", model_name, origin), "steps": steps}}
    return create_run(runs_dir, name, info, palette, overwrite=overwrite,
                      fill=lambda run: convert_steps(run, bundles, config, palette, origin, progress))
