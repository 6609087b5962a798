"""Completing images: the paper's half-image completions, unconditional samples, and inpainting.

Everything works on palette ids (T = H·W, raster order); `palette.encode` / `palette.decode` convert.
Autoregressive models decode with a KV cache (`decoder.Decoder`): each new pixel costs one token's
worth of work, not a pass over the whole prefix. The streaming forms yield the partial result as
pixels arrive; the plain forms return the stream's last item, so both give identical results for
the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from .decoder import Decoder, check_precision
from .errors import IgptError
from .model import IGPT


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, n_samples: int) -> None:
    """Refuse sampling settings that make no sense, with one line that says the allowed range."""
    if not temperature > 0:
        raise IgptError(f"temperature must be > 0 (1 samples the model as trained), got {temperature}")
    if top_k is not None and top_k < 1:
        raise IgptError(f"top-k must be at least 1 (or unset for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise IgptError(f"top-p must lie in (0, 1], got {top_p}")
    if not 1 <= n_samples <= 256:
        raise IgptError(f"the number of samples must lie in 1..256, got {n_samples}")


def sample_logits(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One id per row of logits (B, K): temperature, then top-k, then nucleus (top-p) filtering."""
    probs = sampling_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                           top_p: float | None = None) -> torch.Tensor:
    """The distribution sampling draws from, (..., K): logits / temperature, top-k, then top-p."""
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def _generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def as_prompt(model: IGPT, ids) -> torch.Tensor:
    """One image's ids as a flat tensor on the model's device, refused unless it has the model's length."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    T = model.config.n_positions
    if ids.numel() != T:
        side = model.config.image_size
        raise IgptError(f"the image has {ids.numel()} pixels but the model works on {side}×{side} = {T}")
    return ids.to(next(model.parameters()).device)


@torch.inference_mode()
def complete_stream(model: IGPT, ids, keep_rows: int, n_samples: int = 1, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    every: int | None = None, precision: str = "fp32") -> Iterator[tuple[torch.Tensor, int]]:
    """Complete one image from its first `keep_rows` rows, `n_samples` times in one batch.

    Yields (ids (n_samples, T), pixels generated so far, which positions those are (T,) bool)
    after every `every` pixels (default: one row) and once at the end. Positions not generated yet
    hold the prompt's own ids. Works for AR models with the KV cache; BERT models use
    `inpaint_stream` on the masked rows instead.
    precision="int8" decodes AR models with int8 weights: faster on CPUs, approximate (`Decoder`).
    """
    check_precision(model.config, precision)
    side = model.config.image_size
    if not 0 <= keep_rows <= side:
        raise IgptError(f"rows to keep must lie in 0..{side} for this {side}×{side} model, got {keep_rows}")
    if keep_rows == side:  # nothing to generate: the "completion" is the image itself
        check_sampling(temperature, top_k, top_p, n_samples)
        prompt = as_prompt(model, ids)
        yield prompt.expand(n_samples, -1).clone(), 0, torch.zeros_like(prompt, dtype=torch.bool)
        return
    known = torch.zeros(side * side, dtype=torch.bool)
    known[: keep_rows * side] = True
    yield from inpaint_stream(model, ids, known, n_samples, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, every=every, precision=precision)


def complete(model: IGPT, ids, keep_rows: int, n_samples: int = 1, **options) -> torch.Tensor:
    """`complete_stream`'s final result: ids (n_samples, T)."""
    *_, (out, _, _) = complete_stream(model, ids, keep_rows, n_samples, **options)
    return out


def complete_each(models: Iterable[tuple[int, IGPT]], ids, keep_rows: int, n_samples: int = 1, *, seed: int = 0,
                  **options) -> Iterator[tuple[int, torch.Tensor]]:
    """The same prompt completed by each model of `models`, (step, model) pairs such as a run's
    checkpoints: yields (step, ids (n_samples, T)) as each finishes. Every model draws with the same
    `seed`, so where two checkpoints' completions differ, training made the difference. `models` is
    read lazily: a caller may load each checkpoint only while it is completed."""
    for step, model in models:
        yield step, complete(model, ids, keep_rows, n_samples, seed=seed, **options)


def unconditional(model: IGPT, n_samples: int = 1, **options) -> torch.Tensor:
    """Images from nothing: ids (n_samples, T)."""
    blank = torch.zeros(model.config.n_positions, dtype=torch.long)
    return complete(model, blank, 0, n_samples, **options)


@torch.inference_mode()
def inpaint_stream(model: IGPT, ids, known, n_samples: int = 1, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   every: int | None = None, steps: int = 8,
                   precision: str = "fp32") -> Iterator[tuple[torch.Tensor, int]]:
    """Fill the positions where `known` (T,) is False; known positions are never changed.

    AR models decode in raster order with the KV cache, feeding the known pixels as they come
    (runs of known pixels go in as one chunk). BERT models decode iteratively: over `steps`
    rounds, sample every hidden position and keep the most confident ones, as in MaskGIT.
    Yields (ids (n_samples, T), pixels filled so far, which positions those are (T,) bool — the
    same for every sample); the last item is the result. A filled pixel may hold the colour it
    had before, so only the third item tells what is filled.
    precision="int8": AR models only, as in `complete_stream`.
    """
    check_sampling(temperature, top_k, top_p, n_samples)
    check_precision(model.config, precision)
    prompt = as_prompt(model, ids)
    known = torch.as_tensor(known, dtype=torch.bool).reshape(-1).to(prompt.device)
    if known.numel() != prompt.numel():
        raise IgptError(f"the mask has {known.numel()} positions but the image has {prompt.numel()}")
    if known.all():
        raise IgptError("the mask leaves nothing to fill: mark at least one pixel to be generated")
    generator = _generator(seed, prompt.device)
    out = prompt.expand(n_samples, -1).clone()
    if model.config.objective == "bert":
        yield from _bert_fill(model, out, known, generator, steps, temperature, top_k, top_p)
        return
    every = every or model.config.image_size
    T = prompt.numel()
    decoder = Decoder(model, n_samples, precision)
    first = int((~known).nonzero()[0])  # the prompt up to the first hidden pixel goes in as one chunk
    sos = torch.full((1, 1), model.config.sos_id, device=prompt.device)
    # fed once for all samples: every sample starts from the prompt's keys and values
    logits = decoder.feed(torch.cat([sos, prompt[None, :first]], dim=1)).expand(n_samples, -1)
    done = torch.zeros(T, dtype=torch.bool)  # positions generated so far
    known = known.tolist()  # read once per pixel below: Python bools, not tensor indexing
    filled, t = 0, first
    while t < T:
        out[:, t] = sample_logits(logits, generator, temperature, top_k, top_p)
        done[t] = True
        filled += 1
        run_end = t + 1  # the sampled pixel, then any known pixels after it, as one chunk
        while run_end < T and known[run_end]:
            run_end += 1
        if run_end == T:
            break
        logits = decoder.feed(out.narrow(1, t, run_end - t))
        t = run_end
        if filled % every == 0:
            yield out.clone(), filled, done.clone()
    yield out, filled, done


def _bert_fill(model, out, known, generator, steps, temperature, top_k, top_p):
    hidden = (~known).expand_as(out).clone()  # (n, T) positions still to fill
    total = int(hidden[0].sum())
    steps = max(1, min(steps, total))
    for i in range(steps):
        logits, _ = model(out, mask=hidden)
        n, T, K = logits.shape
        proposal = sample_logits(logits.reshape(n * T, K), generator, temperature, top_k, top_p).reshape(n, T)
        confidence = logits.float().log_softmax(-1).gather(-1, proposal[..., None]).squeeze(-1)
        confidence = confidence.masked_fill(~hidden, float("-inf"))
        remaining = int(hidden[0].sum())
        commit = remaining if i == steps - 1 else math.ceil(remaining / (steps - i))  # equal shares per round
        chosen = torch.zeros_like(hidden).scatter(1, confidence.topk(commit, dim=1).indices, True) & hidden
        out[chosen] = proposal[chosen]
        hidden &= ~chosen
        done = ~known & ~hidden[0].cpu()
        yield (out.clone() if i < steps - 1 else out), total - int(hidden[0].sum()), done


def inpaint(model: IGPT, ids, known, n_samples: int = 1, **options) -> torch.Tensor:
    """`inpaint_stream`'s final result: ids (n_samples, T)."""
    *_, (out, _, _) = inpaint_stream(model, ids, known, n_samples, **options)
    return out
