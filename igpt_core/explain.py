"""Inside the model: what a pixel is drawn from, where the model looked, what each layer would paint.

`ids` is one image's palette ids, (T,) with T = side², and a pixel is its 0-based raster index t.
An AR model predicts pixel t from the network input at position t (SOS at 0, pixel i at i + 1), so
it sees pixels < t. A BERT model predicts pixel t with that pixel masked (its colour embedding
zeroed, as in training) and every other pixel visible.

Everything runs on the model's device under `torch.inference_mode()` and returns CPU tensors.
`precision` ("fp32", the default; "bf16"; or "auto": bf16 where the hardware computes it natively)
sets the number format of the matrix products; results come back float32 either way.
The model's forward pass keeps its fused attention; the weights are formed only here, through
`IGPT.attention_weights`. `run_distances` measures the attention distance of a run's checkpoints
and stores it in the run folder, as probe results are (`load_distances` reads it back).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import load_dataset
from .device import PRECISIONS, autocast
from .errors import IgptError
from .files import atomic_write_json
from .likelihood import masking_groups
from .model import IGPT
from .runs import Run, as_run
from .sample import as_prompt, check_sampling, sampling_probabilities


@dataclass
class Attention:
    """Where the query that predicts one pixel looks, in every layer and head.

    pixels: (n_layer, n_head, side, side) weights on the image's pixels (AR: exact zeros on the
            pixel itself and everything after it).
    sos:    (n_layer, n_head) weight on the start-of-sequence token (AR), None for BERT. For AR
            pixels.flatten(2).sum(-1) + sos == 1.
    """

    pixels: torch.Tensor
    sos: torch.Tensor | None


def _image(model: IGPT, ids) -> torch.Tensor:
    """One image's ids as a (1, T) batch on the model's device."""
    ids = as_prompt(model, ids)
    n_colors = model.config.n_colors
    if ids.min() < 0 or ids.max() >= n_colors:
        raise IgptError(f"palette ids must lie in 0..{n_colors - 1} for this {n_colors}-colour model")
    return ids[None]


def _pixel(model: IGPT, pixel: int) -> int:
    T, side = model.config.n_positions, model.config.image_size
    if not 0 <= pixel < T:
        raise IgptError(f"pixel {pixel} is outside the {side}×{side} image (raster index 0..{T - 1})")
    return int(pixel)


def _in_precision(model: IGPT, precision: str):
    """The context running the model's matrix products in `precision` (see device.autocast)."""
    if precision not in PRECISIONS:
        raise IgptError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return autocast(next(model.parameters()).device, precision, model.config.n_embd)


def _query(model: IGPT, ids: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input and mask that predict pixel t. AR: the prefix up to t (nothing later matters);
    BERT: the whole image with pixel t masked."""
    if model.config.objective == "ar":
        return ids[:, : t + 1], None
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, t] = True
    return ids, mask


@torch.inference_mode()
def next_pixel(model: IGPT, ids, pixel: int, temperature: float = 1.0, top_k: int | None = None,
               precision: str = "fp32") -> torch.Tensor:
    """The probabilities (n_colors,) of every palette colour for `pixel`, reshaped by temperature
    and top-k exactly as sampling reshapes them (AR: given the pixels before it; BERT: given all
    the others)."""
    check_sampling(temperature, top_k, None, 1)
    t = _pixel(model, pixel)
    inputs, mask = _query(model, _image(model, ids), t)
    with _in_precision(model, precision):
        logits, _ = model(inputs, mask=mask)
    return sampling_probabilities(logits[0, t].float(), temperature, top_k).cpu()


def next_pixel_each(models: Iterable[tuple[int, IGPT]], ids, pixel: int, temperature: float = 1.0,
                    top_k: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """`next_pixel` of the same image and pixel under each model of `models`, (step, model) pairs
    such as a run's checkpoints: yields (step, probabilities (n_colors,)), read lazily, so that a
    caller may hold each checkpoint only while it is asked. Watching one pixel across checkpoints
    shows the distribution sharpen (or not) as training goes."""
    for step, model in models:
        yield step, next_pixel(model, ids, pixel, temperature=temperature, top_k=top_k)


@torch.inference_mode()
def attention_maps(model: IGPT, ids, pixel: int, precision: str = "fp32") -> Attention:
    """The attention of the query that predicts `pixel`, in every layer and head, over the image."""
    t = _pixel(model, pixel)
    inputs, mask = _query(model, _image(model, ids), t)
    with _in_precision(model, precision):
        rows = torch.stack([weights[0, :, t] for weights in model.attention_weights(inputs, mask)]).float().cpu()
    L, nh, side = model.config.n_layer, model.config.n_head, model.config.image_size
    if model.config.objective == "bert":
        return Attention(rows.reshape(L, nh, side, side), None)
    pixels = torch.zeros(L, nh, side * side)
    pixels[..., :t] = rows[..., 1:]  # key j + 1 holds pixel j; pixels t.. are not visible yet
    return Attention(pixels.reshape(L, nh, side, side), rows[..., 0])


def _log_probs(model: IGPT, ids: torch.Tensor, every_layer: bool) -> torch.Tensor:
    """Log-probabilities of every pixel, (n, B, T, n_colors): n = n_layer + 1 readouts of the
    residual stream (every_layer) or just the model's output (n = 1). BERT reads each pixel with
    its masking group hidden (as in `likelihood.pixel_nll`)."""

    def read(mask):
        if every_layer:
            return model.readout(model.residual_streams(ids, mask)).float().log_softmax(-1)
        return model(ids, mask=mask)[0].float().log_softmax(-1)[None]

    if model.config.objective == "ar":
        return read(None)
    out = None
    for group in masking_groups(model.config, ids.shape[1], ids.device):
        log_probs = read(group.expand(ids.shape))
        out = log_probs if out is None else torch.where(group[:, None], log_probs, out)
    return out


@torch.inference_mode()
def layer_predictions(model: IGPT, ids, precision: str = "fp32") -> torch.Tensor:
    """The "logit lens": log-probabilities (n_layer + 1, T, n_colors) of every pixel read out of
    the residual stream after the embeddings (0) and after each block (1..n_layer) through the
    final norm and the head. The last entry is the model's own prediction.

    BERT reads all pixels in 1/mask_prob passes, each hiding one interleaved group (as
    `likelihood.pixel_nll` does), so a pixel is read with ~mask_prob of the image hidden, where
    `next_pixel` hides that pixel alone."""
    with _in_precision(model, precision):
        return _log_probs(model, _image(model, ids), every_layer=True)[:, 0].cpu()


@torch.inference_mode()
def entropy_map(model: IGPT, ids, precision: str = "fp32") -> np.ndarray:
    """The entropy in nats of every pixel's predicted distribution, (side, side): where the model
    was unsure (0 = certain, log n_colors = no idea), beside `likelihood.surprise_map`."""
    with _in_precision(model, precision):
        log_probs = _log_probs(model, _image(model, ids), every_layer=False)[0, 0]
    side = model.config.image_size
    return (-(log_probs.exp() * log_probs).sum(-1)).reshape(side, side).cpu().numpy()


def _grid_distances(side: int, device) -> torch.Tensor:
    """Euclidean distance in pixels between every pair of raster positions, (T, T)."""
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    return torch.cdist(points, points)


def _batch_distances(model: IGPT, batch: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Summed over images and queries: attention-weighted distance per layer and head, (L, nh)."""
    total = torch.zeros(model.config.n_layer, model.config.n_head, device=batch.device)
    if model.config.objective == "ar":
        for layer, weights in enumerate(model.attention_weights(batch)):
            # queries predicting pixels 1..T-1 (pixel 0 sees only SOS) over keys holding pixels 0..T-2;
            # SOS has no place on the grid, so each row is renormalised over the pixels it sees
            on_pixels = weights[..., 1:, 1:]
            weighted = (on_pixels * distances[1:, :-1]).sum(-1) / on_pixels.sum(-1)
            total[layer] += weighted.sum((0, 2))
        return total
    for group in masking_groups(model.config, batch.shape[1], batch.device):
        for layer, weights in enumerate(model.attention_weights(batch, group.expand(batch.shape))):
            total[layer] += (weights[..., group, :] * distances[group]).sum((-1, -2)).sum(0)
    return total


@torch.inference_mode()
def attention_distance(model: IGPT, ids, batch_size: int = 8, precision: str = "fp32") -> torch.Tensor:
    """Mean attention distance (n_layer, n_head): the Euclidean distance in pixels between each
    query pixel and the pixels it attends to, weighted by attention, averaged over queries and
    images — the "attention distance" of vision-transformer papers (Dosovitskiy et al. 2021, Fig. 7).

    `ids`: (N, T) images or one (T,). AR: queries are pixels 1..T-1 (pixel 0 sees only SOS) and the
    SOS weight is left out, each row renormalised over pixels. BERT: each pixel's query with its
    masking group hidden."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids).long()
    ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids[None]
    if ids.shape[1] != model.config.n_positions or len(ids) == 0:
        raise IgptError(f"attention distance needs images of {model.config.n_positions} pixels, got shape {tuple(ids.shape)}")
    distances = _grid_distances(model.config.image_size, device)
    total = torch.zeros(model.config.n_layer, model.config.n_head, device=device)
    with _in_precision(model, precision):
        for batch in ids.split(batch_size):
            total += _batch_distances(model, batch.to(device), distances).float()
    queries = ids.shape[1] - 1 if model.config.objective == "ar" else ids.shape[1]
    return (total / (len(ids) * queries)).cpu()


def entropy(probabilities: torch.Tensor) -> float:
    """Entropy in nats of one distribution (n_colors,), e.g. `next_pixel`'s; colours top-k removed count 0."""
    p = probabilities.double()
    return float(-(p * p.log()).nan_to_num().sum())


def describe(probabilities: torch.Tensor, true_id: int | None = None, k: int = 8) -> dict:
    """The numbers people read off a distribution (n_colors,): the k most likely colour ids with
    their probabilities, the entropy in nats, and the true colour's probability and rank (1 = the
    model's first choice)."""
    p = probabilities.double()
    top = p.topk(min(k, len(p)))
    out = {"top_ids": top.indices.tolist(), "top_probabilities": top.values.tolist(), "entropy": entropy(p)}
    if true_id is not None:
        out["true_id"] = int(true_id)
        out["true_probability"] = float(p[true_id])
        out["true_rank"] = int((p > p[true_id]).sum()) + 1
    return out


# -- attention distance of a run's checkpoints, stored in the run ------------------------------------------
#
#     runs/<run>/attention/distance.json   {"format", "dataset", "images", "images_hash", "n_layer", "n_head",
#                                           "objective", "uniform", "rows": [{"step", "layer", "head", "distance",
#                                           "checkpoint"}]}
#
# Layers and heads are counted from 1. "uniform" is the distance of a head that spreads its weight
# evenly over every pixel it may see: below it a head looks near, above it far.

DISTANCE_FORMAT = 1
DISTANCE_IMAGES = 64  # validation images per checkpoint


def distance_path(run: Run) -> Path:
    return run.path / "attention" / "distance.json"


def load_distances(run, *, runs_dir=None) -> dict | None:
    """The stored attention-distance table of `run` (a Run or a name), or None if never computed.
    A damaged file raises IgptError naming it."""
    run = as_run(run, runs_dir)
    path = distance_path(run)
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
        rows = table["rows"]
        ok = all(isinstance(r["step"], int) and isinstance(r["layer"], int) and isinstance(r["head"], int)
                 and isinstance(r["distance"], (int, float)) for r in rows)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise IgptError(f"the attention distances {path} are damaged ({err}); delete the file to compute them again") from None
    if not ok or table.get("format") != DISTANCE_FORMAT:
        raise IgptError(f"the attention distances {path} are damaged or of another format; delete the file "
                        "to compute them again")
    return table


def uniform_distance(config) -> float:
    """The attention distance of a head with equal weight on every pixel it may see (AR: the pixels
    before the query; BERT: all of them), averaged over queries like `attention_distance`."""
    distances = _grid_distances(config.image_size, "cpu").double()
    if config.objective == "bert":
        return float(distances.mean())
    seen = torch.ones_like(distances).tril(-1)[1:]  # query pixels 1..T-1 over the pixels before them
    return float(((distances[1:] * seen).sum(-1) / seen.sum(-1)).mean())


def _checkpoint_stamp(run: Run, step: int) -> str:
    stat = run.checkpoint_path(step).stat()
    return f"size={stat.st_size};mtime={stat.st_mtime_ns}"


def run_distances(run, steps="all", *, dataset: str | None = None, images: int = DISTANCE_IMAGES, runs_dir=None,
                  data_dir=None, device="cpu", on_progress=None) -> dict:
    """Attention distance per layer and head at each checkpoint in `steps` ("all", "last" or a list),
    on the first `images` validation images of `dataset` (default: the run's own; imported runs: the
    built-in photos). Computes only checkpoints missing from the stored table (or whose file changed),
    stores the table atomically, and returns it. on_progress(done, total) after each checkpoint."""
    run = as_run(run, runs_dir)
    info, config = run.info, run.model_config
    own = info.get("dataset") or "photos"
    dataset = dataset or ("photos" if own.startswith("imported:") else own)
    data = load_dataset(dataset, "val", resolution=config.image_size,
                        data_dir=data_dir or (info.get("data_dir") if dataset == own else None))
    ids = torch.from_numpy(run.palette.encode(data.images[:images], config.image_size)).long()
    images_hash = hashlib.sha1(ids.numpy().tobytes()).hexdigest()
    wanted = {"all": run.checkpoints(), "last": [run.resolve_step(None)]}.get(steps) if isinstance(steps, str) else steps
    wanted = [run.resolve_step(int(s)) for s in wanted]
    table = load_distances(run)
    if table is None or table.get("images_hash") != images_hash or table.get("n_layer") != config.n_layer:
        table = {"format": DISTANCE_FORMAT, "dataset": dataset, "images": len(ids), "images_hash": images_hash,
                 "n_layer": config.n_layer, "n_head": config.n_head, "objective": config.objective,
                 "uniform": uniform_distance(config), "rows": []}
    stamps = {r["step"]: r["checkpoint"] for r in table["rows"]}
    todo = [s for s in wanted if stamps.get(s) != _checkpoint_stamp(run, s)]
    for done, step in enumerate(todo, 1):
        model, _, _ = run.load(step, device=device)
        distance = attention_distance(model, ids)
        table["rows"] = [r for r in table["rows"] if r["step"] != step] + [
            {"step": step, "layer": layer + 1, "head": head + 1, "distance": float(distance[layer, head]),
             "checkpoint": _checkpoint_stamp(run, step)}
            for layer in range(config.n_layer) for head in range(config.n_head)]
        table["rows"].sort(key=lambda r: (r["step"], r["layer"], r["head"]))
        atomic_write_json(distance_path(run), table)  # after each checkpoint: an interruption keeps what is done
        if on_progress:
            on_progress(done, len(todo))
    return table
