"""How well a model predicts images: nats per token, bits per token, per-pixel surprise.

One token is one palette colour, standing for a whole RGB pixel, so bits per token (nats / ln 2)
are three times the bits per sub-pixel ("bits/dim") that other papers report; `summarize` gives
both. The palette is lossy — it already threw away colour detail — so even the per-sub-pixel figure
is not comparable with bits/dim that other models report on raw 8-bit pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .decoder import Decoder, check_precision
from .device import PRECISIONS, autocast, resolve_precision
from .errors import IgptError
from .model import IGPT, ModelConfig

LOSSY_NOTE = ("bits/token are per palette colour, i.e. per whole RGB pixel (/3 per sub-pixel); the palette is "
              "lossy, so neither is comparable with bits/dim on raw 8-bit pixels")


def masking_groups(config: ModelConfig, T: int, device=None) -> list[torch.Tensor]:
    """How a BERT model reads every pixel: round(1/mask_prob) interleaved groups of positions, (T,)
    bool each, hidden in turn, so each pixel is predicted with about mask_prob of the image hidden."""
    groups = _bert_groups(config)
    positions = torch.arange(T, device=device)
    return [positions % groups == g for g in range(groups)]


def _int8_logits(model: IGPT, batch: torch.Tensor) -> torch.Tensor:
    """An AR model's logits (B, T, n_colors) for ids (B, T), through the int8 decoder in one call."""
    sos = torch.full_like(batch[:, :1], model.config.sos_id)
    return Decoder(model, len(batch), "int8").feed(torch.cat([sos, batch[:, :-1]], dim=1), every_position=True)


@torch.inference_mode()
def pixel_nll(model: IGPT, ids: torch.Tensor, batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """Negative log-likelihood in nats of every pixel, (N, T).

    precision: "fp32", "bf16" or "auto" (bf16 where the hardware computes it natively: CUDA, CPUs
    with AVX512-BF16 or AMX) for the matrix products, or "int8" (AR only, see below).

    AR: the exact -log p(x_t | x_<t) (with precision="int8", of the int8 decoder's approximation of
    the model, see `decoder.Decoder`). BERT models have no such factorisation: each pixel is scored
    hidden together with about mask_prob of the others (positions split into round(1/mask_prob)
    interleaved groups, each hidden in turn) — a pseudo-likelihood, useful for comparing BERT runs
    with each other only.
    """
    if precision not in (*PRECISIONS, "int8"):
        raise IgptError(f"precision must be one of {', '.join(PRECISIONS)}, int8; got {precision!r}")
    if precision == "int8":
        check_precision(model.config, precision)
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids).long()
    with autocast(device, "fp32" if precision == "int8" else precision, model.config.n_embd):
        return torch.cat([_batch_nll(model, batch.to(device), precision) for batch in ids.split(batch_size)])


def _batch_nll(model: IGPT, batch: torch.Tensor, precision: str) -> torch.Tensor:
    """pixel_nll of one batch (B, T) on the model's device, as a CPU tensor."""
    if model.config.objective == "ar":
        logits = _int8_logits(model, batch) if precision == "int8" else model(batch)[0]
        return F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none").cpu()
    nll = torch.zeros(batch.shape, dtype=torch.float32)
    for group in masking_groups(model.config, batch.shape[1], batch.device):
        mask = group.expand(batch.shape)
        logits, _ = model(batch, mask=mask)
        full = F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none").cpu()
        nll[mask.cpu()] = full[mask.cpu()]
    return nll


def _bert_groups(config: ModelConfig) -> int:
    return max(1, round(1 / config.mask_prob))


def bits_per_token(nats_per_token: float) -> float:
    """Bits per palette token (nats / ln 2): one token is a whole RGB pixel, so per sub-pixel it is a
    third of this."""
    return nats_per_token / math.log(2)


def likelihood_kind(config: ModelConfig) -> str:
    """What `pixel_nll` measures for this model, in words."""
    if config.objective == "ar":
        return "exact"
    return f"pseudo (BERT: each pixel scored with ~{1 / _bert_groups(config):.0%} of the image hidden)"


def summarize(nll: torch.Tensor, config: ModelConfig) -> dict:
    """Mean of per-pixel NLLs (N, T) in nats/token, bits/token and bits/sub-pixel, with what was measured."""
    nats = float(nll.double().mean())
    bits = bits_per_token(nats)
    return {
        "nats_per_token": nats,
        "bits_per_token": bits,
        "bits_per_subpixel": bits / 3,  # a token is an RGB pixel: three sub-pixels
        "images": int(nll.shape[0]),
        "objective": config.objective,
        "likelihood": likelihood_kind(config),
        "note": LOSSY_NOTE,
    }


def score(model: IGPT, ids: torch.Tensor, batch_size: int = 64, precision: str = "fp32") -> dict:
    """Mean likelihood of images given as ids (N, T), in nats/token and bits/token. "precision" in the
    result is the one that ran ("auto" resolved to "bf16" or "fp32")."""
    nll = pixel_nll(model, ids, batch_size, precision)
    if precision != "int8":
        precision = resolve_precision(precision, next(model.parameters()).device, model.config.n_embd)
    return {**summarize(nll, model.config), "precision": precision}


def surprise_map(model: IGPT, ids, precision: str = "fp32") -> np.ndarray:
    """Per-pixel NLL (nats) of one image as an (H, W) array: where the model was surprised."""
    ids = torch.as_tensor(ids).reshape(1, -1)
    side = model.config.image_size
    return pixel_nll(model, ids, precision=precision)[0].reshape(side, side).numpy()
