"""Probe features: each layer's mean-pooled input norm, for every image.

The paper's feature of layer l (Chen et al. 2020, §2.4) is the mean over positions of layer_norm(h^l):
the input norm of block l, or ln_f for l = n_layer, read through the model's public `IGPT.features`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import PRECISIONS, autocast, resolve_precision
from ..errors import IgptError
from ..feature_pass import FeaturePass
from ..model import IGPT
from ..progress import progress_bar


def feature_precision(precision: str, device, n_embd: int) -> str:
    """"fp32" or "bf16": the number format probe features of a model of width n_embd are computed in
    on `device`, for precision "auto", "fp32" or "bf16". "auto" is bf16 where the hardware computes it
    natively (CUDA; CPUs with AVX512-BF16 or AMX) and n_embd >= device.BF16_MIN_WIDTH, else fp32."""
    if precision not in PRECISIONS:
        raise IgptError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return resolve_precision(precision, device, n_embd)


@torch.inference_mode()
def extract_features(model: IGPT, ids, layers, *, batch_size: int = 256, bert_masks: int = 0, seed: int = 0,
                     offset: int = 0, precision: str = "auto", progress: bool = False,
                     desc: str = "features") -> np.ndarray:
    """Probe features of `layers` for every image: float32 (len(layers), N, n_embd).

    `ids` (N, T) are palette ids (numpy or torch). Each batch is one call of `model.features`, which
    returns every requested layer from a single forward pass. For BERT models with bert_masks > 0,
    each image's features are the mean over the unmasked input and `bert_masks` random masks
    (p = model.config.mask_prob); the masks come from per-mask seeded streams drawn image by image,
    so they do not depend on batch_size. The masked copies ride in the same forward call as the
    unmasked one (the batch holds batch_size // (bert_masks + 1) images). AR models ignore bert_masks.
    `offset` is the index of ids[0] in a larger set (one process's share of it, under torchrun): the
    mask streams skip that many images, so the shares' features join into the whole set's.
    `precision`: "fp32", "bf16", or "auto" (bf16 where the hardware computes it natively); the
    features come back float32 either way.
    """
    layers = [int(layer) for layer in layers]
    n = model.config.n_layer
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad or not layers:
        raise IgptError(f"layer {bad[0] if bad else '(none)'} is out of range: this model has layers 0..{n}")
    ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
    if ids.ndim != 2:
        raise IgptError(f"ids must be (N, T) palette ids, got shape {tuple(ids.shape)}")
    N, T = ids.shape
    device = next(model.parameters()).device
    precision = feature_precision(precision, device, model.config.n_embd)
    was_training = model.training
    model.eval()
    k = bert_masks if model.config.objective == "bert" else 0
    if k < 0:
        raise IgptError(f"bert_masks must be >= 0, got {bert_masks}")
    rngs = [np.random.default_rng([seed, m]) for m in range(k)]
    for rng in rngs:
        rng.bit_generator.advance(offset * T)  # one 64-bit draw per uniform double: skip `offset` images
    per_call = max(1, batch_size // (k + 1))
    if precision == "bf16" and device.type == "cpu":
        features = FeaturePass(model)  # weights laid out once for bf16; it picks each operation's number format
    else:  # fp32, or bf16 on a GPU, where autocast suffices
        def features(ids, layers, mask=None):
            with autocast(device, precision):
                return model.features(ids, layers, mask)
    out = np.empty((len(layers), N, model.config.n_embd), dtype=np.float32)
    bar = progress_bar(progress, total=N, desc=desc, unit="img", leave=False)
    try:
        for start in range(0, N, per_call):
            batch = ids[start : start + per_call].to(device)
            b = len(batch)
            feats = _batch_features(features, model.config, batch, layers, rngs)
            out[:, start : start + b] = feats.float().cpu().numpy()
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out


def _batch_features(features, config, batch: torch.Tensor, layers: list[int], rngs: list) -> torch.Tensor:
    """(len(layers), b, d) features of one batch through `features` (IGPT.features under autocast, or a FeaturePass);
    with BERT mask streams `rngs`, the mean over the unmasked input and one random mask per stream,
    all in one forward call."""
    if not rngs:
        return features(batch, layers)
    b, T = batch.shape
    k = len(rngs)
    masks = [np.zeros((b, T), dtype=bool)] + [rng.random((b, T)) < config.mask_prob for rng in rngs]
    mask = torch.from_numpy(np.concatenate(masks)).to(batch.device)
    feats = features(batch.repeat(k + 1, 1), layers, mask)  # (L, (k+1)·b, d)
    return feats.view(len(layers), k + 1, b, -1).mean(dim=1)
