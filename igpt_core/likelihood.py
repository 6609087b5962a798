"""How well a model predicts images: nats per token, bits per dimension, per-pixel surprise.

Bits/dim here are per *palette token* (and a third of that per RGB sub-pixel). The palette is lossy
— it already threw away colour detail — so these numbers are not comparable with bits/dim that
other models report on raw 8-bit pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .model import IGPT

LOSSY_NOTE = ("bits/dim are per palette token (and /3 per RGB sub-pixel); the palette is lossy, so they are "
              "not comparable with bits/dim on raw 8-bit pixels")


@torch.inference_mode()
def pixel_nll(model: IGPT, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Negative log-likelihood in nats of every pixel, (N, T).

    AR: the exact -log p(x_t | x_<t). BERT models have no such factorisation: each pixel is scored
    with it and ~15% of the others hidden (positions split into 1/mask_prob interleaved groups,
    each hidden in turn) — a pseudo-likelihood, useful for comparing BERT runs with each other only.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids).long()
    out = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        if model.config.objective == "ar":
            logits, _ = model(batch)
            out.append(F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none").cpu())
            continue
        groups = max(1, round(1 / model.config.mask_prob))
        nll = torch.zeros(batch.shape, dtype=torch.float32)
        for g in range(groups):
            mask = torch.zeros_like(batch, dtype=torch.bool)
            mask[:, g::groups] = True
            logits, _ = model(batch, mask=mask)
            full = F.cross_entropy(logits.float().transpose(1, 2), batch, reduction="none").cpu()
            nll[mask.cpu()] = full[mask.cpu()]
        out.append(nll)
    return torch.cat(out)


def summarize(nll: torch.Tensor, objective: str) -> dict:
    nats = float(nll.double().mean())
    bits = nats / math.log(2)
    return {
        "nats_per_token": nats,
        "bits_per_dim": bits,  # per palette token
        "bits_per_subpixel": bits / 3,
        "images": int(nll.shape[0]),
        "objective": objective,
        "likelihood": "exact" if objective == "ar" else "pseudo (BERT: each pixel scored with ~15% hidden)",
        "note": LOSSY_NOTE,
    }


def score(model: IGPT, ids: torch.Tensor, batch_size: int = 64) -> dict:
    """Mean likelihood of images given as ids (N, T), in nats/token and bits/dim."""
    return summarize(pixel_nll(model, ids, batch_size), model.config.objective)


def surprise_map(model: IGPT, ids) -> np.ndarray:
    """Per-pixel NLL (nats) of one image as an (H, W) array: where the model was surprised."""
    ids = torch.as_tensor(ids).reshape(1, -1)
    side = model.config.image_size
    return pixel_nll(model, ids)[0].reshape(side, side).numpy()
