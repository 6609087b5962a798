"""The Image GPT model: one file, top to bottom — norm, attention, MLP, block, model.

The block is OpenAI's iGPT block exactly (so that their released weights give the same logits,
see docs/design.md §3): RMS-style norm without bias, quick-GELU, pre-norm residuals, an untied 512-way
head and a start-of-sequence token (id = number of colours) that precedes pixel 1.

One class serves both objectives of the paper:
- "ar":   causal attention; logits[:, t] predict pixel t from pixels < t (SOS is prepended inside).
- "bert": bidirectional attention; masked positions have their colour embedding zeroed (no mask
          token) and the loss is taken on masked positions only.

Generating one pixel at a time (with a KV cache) runs this same network from `decoder.py`, which
lays the weights out for that job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

QUICK_GELU = 1.702  # OpenAI's GELU approximation x · sigmoid(1.702 x)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 513  # palette colours + 1 for the SOS token (id vocab_size - 1), as Hugging Face counts
    n_positions: int = 1024  # pixels per image: image_size ** 2 (32 × 32 in the paper's main models)
    n_layer: int = 24  # transformer blocks
    n_head: int = 8  # attention heads; n_embd must divide by it
    n_embd: int = 512  # width of the residual stream
    objective: str = "ar"  # "ar" (autoregressive, causal) or "bert" (masked, bidirectional)
    mask_prob: float = 0.15  # BERT: each position masked independently with this probability
    layer_norm_epsilon: float = 1e-5  # inside the square root, as in OpenAI's code

    def __post_init__(self):
        side = math.isqrt(self.n_positions)
        if side * side != self.n_positions:
            raise ConfigError(f"n_positions must be a square (image side²), got {self.n_positions}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.objective not in ("ar", "bert"):
            raise ConfigError(f"objective must be 'ar' or 'bert', got {self.objective!r}")
        if self.vocab_size < 3:
            raise ConfigError(f"vocab_size must be at least 3 (2 colours + SOS), got {self.vocab_size}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"mask_prob must lie in (0, 1), got {self.mask_prob}")

    @property
    def n_colors(self) -> int:
        return self.vocab_size - 1

    @property
    def sos_id(self) -> int:
        return self.vocab_size - 1

    @property
    def image_size(self) -> int:
        return math.isqrt(self.n_positions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# The paper's sizes (Table 1 / §4) and a CPU-sized one. vocab_size and n_positions come from the data.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),  # trains on digits in ~2 min on 2 CPU cores
    "s": dict(n_layer=24, n_head=8, n_embd=512),  # iGPT-S, 76M parameters
    "m": dict(n_layer=36, n_head=8, n_embd=1024),  # iGPT-M, 455M
    "l": dict(n_layer=48, n_head=16, n_embd=1536),  # iGPT-L, 1.36B
    # iGPT-XL, 6.8B: 60 layers of width 3072, as the paper describes it. Neither the paper nor
    # OpenAI's released code (S, M and L only) gives XL's head count; 24 heads make head_dim 128, as
    # in iGPT-M and GPT-3's largest models, a size fused attention kernels handle well. Needs --fsdp.
    "xl": dict(n_layer=60, n_head=24, n_embd=3072),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset with typed overrides, e.g. preset("tiny", vocab_size=17, n_positions=64)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = ModelConfig(**PRESETS[name])
    known = {f.name: f.type for f in fields(ModelConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown model setting {key!r}; known: {', '.join(known)}")
        expected = type(getattr(base, key))
        if expected is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"model setting {key} takes a {expected.__name__}, got {value!r}")
        overrides[key] = value
    return replace(base, **overrides)


class Norm(nn.Module):
    """RMS-style norm, as in OpenAI's iGPT: no mean subtraction, no bias, eps inside the sqrt."""

    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # Q | K | V, packed in that order
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, causal: bool):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh·hs)
        return self.c_proj(y)

    def probabilities(self, x, causal: bool):
        """The attention weights forward() uses, spelled out: softmax(q·k / √hs), (B, nh, T, T).

        Only for looking inside the model (forward keeps the fused kernel, which never forms them).
        Row t is query position t; causal rows put exact zeros on keys after t.
        """
        B, T, C = x.shape
        q, k, _ = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(QUICK_GELU * h))  # quick-GELU, as OpenAI's iGPT


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, causal: bool):
        x = x + self.attn(self.ln_1(x), causal)  # residual on the raw stream, not the normed one
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # colours + SOS
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(config.n_embd, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.n_colors, bias=False)  # not tied: 512 outputs, 513 inputs
        self.gradient_checkpointing = False  # recompute block activations in backward (large presets)
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 · depth)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.lm_head.weight)  # the paper zero-initialises the logit projection

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the network ---------------------------------------------------------------------------------

    def _inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids as the network reads them. AR: SOS then pixels 1..T-1. BERT: the pixels."""
        if self.config.objective == "ar":
            sos = torch.full_like(ids[:, :1], self.config.sos_id)
            return torch.cat([sos, ids[:, :-1]], dim=1)
        return ids

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream before block 0, (B, T, n_embd): colour plus position embeddings of the
        network's inputs for palette ids (B, T) (AR: SOS, then pixels 1..T-1; BERT: the pixels, with
        the colour of masked positions zeroed)."""
        return self._embed(self._inputs(ids), mask)

    def _embed(self, tokens, mask: torch.Tensor | None = None):
        T = tokens.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds n_positions={self.config.n_positions}")
        tok = self.wte(tokens)  # (B, T, C)
        if mask is not None:  # BERT: masked positions keep their position, lose their colour
            tok = tok * (~mask).unsqueeze(-1).to(tok.dtype)
        return tok + self.wpe(torch.arange(T, device=tokens.device))  # (T, C) positions, broadcast over the batch

    def _blocks(self, x, stop: int | None = None, collect=()):
        """Run blocks 0..stop-1. Returns the stream and {layer: normed stream} for layers in collect."""
        causal = self.config.objective == "ar"
        stop = self.config.n_layer if stop is None else stop
        collected = {}
        for i, block in enumerate(self.h[:stop]):
            if i in collect:
                collected[i] = block.ln_1(x)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        if self.config.n_layer in collect and stop == self.config.n_layer:
            collected[self.config.n_layer] = self.ln_f(x)
        return x, collected

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """ids: (B, T) palette ids, T <= n_positions. Returns (logits (B, T, n_colors), loss or None).

        AR: logits[:, t] predict ids[:, t] from ids[:, :t]; loss = mean cross-entropy over all T.
        BERT: `mask` (B, T) bool marks positions hidden from the model; if None and targets are
        given (training), one is drawn with p = mask_prob. Loss over masked positions only.
        Loss in nats per token.
        """
        if self.config.objective == "bert" and mask is None and targets is not None:
            mask = torch.rand(ids.shape, device=ids.device) < self.config.mask_prob
        if self.config.objective == "ar" and mask is not None:
            raise ValueError("masks are for BERT-objective models; AR models see only the past anyway")
        x = self.embed(ids, mask)
        x, _ = self._blocks(x)
        logits = self.readout(x)  # (B, T, n_colors)
        loss = None
        if targets is not None:
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
            if self.config.objective == "bert":
                weight = mask.to(nll.dtype)
                loss = (nll * weight).sum() / weight.sum().clamp(min=1)
            else:
                loss = nll.mean()
        return logits, loss

    # -- features for probes -------------------------------------------------------------------------

    def features(self, ids: torch.Tensor, layers=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's probe feature for each requested layer: mean over positions of the norm that
        reads the residual stream after `layer` blocks (block `layer`'s input norm; for
        layer == n_layer, the final norm ln_f). Layers run 0..n_layer; default: all.

        Returns (len(layers), B, n_embd), in the order asked. One forward pass for all layers,
        stopping after the deepest one needed.
        """
        n = self.config.n_layer
        layers = list(range(n + 1)) if layers is None else [int(layer) for layer in layers]
        bad = [layer for layer in layers if not 0 <= layer <= n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: this model has layers 0..{n}")
        x = self.embed(ids, mask)
        _, collected = self._blocks(x, stop=min(max(layers) + 1, n), collect=set(layers))  # block l's input norm needs blocks < l
        return torch.stack([collected[layer].mean(dim=1) for layer in layers])

    # -- looking inside ------------------------------------------------------------------------------

    def readout(self, stream: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream (..., n_embd): the final norm, then the head."""
        return self.lm_head(self.ln_f(stream))

    def residual_streams(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the embeddings and after each block, (n_layer + 1, B, T, n_embd).

        Positions are the network's inputs (AR: SOS at 0, pixel i at i + 1); `readout` of the last
        one gives forward()'s logits, of an earlier one the "logit lens" reading of that layer.
        """
        causal = self.config.objective == "ar"
        x = self.embed(ids, mask)
        streams = [x]
        for block in self.h:
            x = block(x, causal)
            streams.append(x)
        return torch.stack(streams)

    def attention_weights(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Each block's attention weights in turn, (B, nh, T, T): query row t over key positions (AR:
        key 0 is SOS, key j is pixel j - 1). One layer at a time, as T² per head adds up fast.
        """
        causal = self.config.objective == "ar"
        x = self.embed(ids, mask)
        for block in self.h:
            yield block.attn.probabilities(block.ln_1(x), causal)
            x = block(x, causal)
