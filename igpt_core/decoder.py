"""Generating pixels one at a time: an autoregressive model's weights laid out for decoding, and its KV cache.

`model.py` is the network as the paper and OpenAI's weights define it, written for reading and
training. Generation runs the same network one token at a time, where a step is a handful of
matrix-vector products and a few dozen small operations, so two costs dominate:

- at iGPT-S sizes, reading the weights (288 MB per pixel in fp32). On CPUs a (batch, in) @ (in, out)
  product streams them faster than nn.Linear's (out, in) layout, so the weights are stored
  transposed, or packed for oneDNN where that is faster still (`use_onednn`);
- at small sizes, the number of operations per step (each costs microseconds of dispatch). Every
  constant that can be folded into a weight is: the norms' gains into the product that reads them,
  the attention's 1/√head_dim into the query weights, quick-GELU's 1.702 into the MLP's weights
  (x·σ(1.702x) = silu(1.702x) / 1.702). The RMS norm divides each row by one number, so it can
  divide the product instead of the input: `addcdiv(b, x @ W, ‖x‖ ⊕ √(d·eps))` is the whole
  "norm, then linear" in three operations.

The result is the model's own function: in float64 it equals `IGPT.forward` to 1e-12, and in
float32 it is as close to that float64 truth as `IGPT.forward` itself is (tests/test_decoder.py);
it matches Hugging Face's ImageGPT to 1e-5 (tests/test_hf.py). A `Decoder` is a snapshot: weights
changed after it was made (more training) are not seen; make a new one.

`precision="int8"` (opt-in, CPU) approximates that function where reading the weights is the cost:
the blocks' four products per layer hold int8 weights, one scale per output channel, and quantise
their input on the fly (dynamic quantisation), so a pixel reads a quarter of the bytes. The KV
cache is bfloat16 (half the bytes), attended to in bfloat16 on CPUs with AMX and in float32 over
widened copies elsewhere (`cpu_has_amx`). Embeddings, norms and the head (about 1% of the weights
at iGPT-S sizes, and where the logits are made) stay float32. A model is quantised once, by its
first int8 decoder; later ones re-use that while its weights are unchanged (`_blocks`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .device import cpu_has_amx, cpu_vendor, onednn_available
from .errors import IgptError
from .model import IGPT, QUICK_GELU, ModelConfig


def use_onednn(device: torch.device, batch_size: int, width: int, vendor: str | None = None) -> bool:
    """Whether oneDNN's pre-packed matrix products beat MKL's addmm for these decoding steps.

    Measured, not timed at run time, so that on a given machine and thread count the same seed always
    gives the same pixels: oneDNN wins on AMD CPUs for batches of 2+ at widths >= 256, and at batch 1
    only with 2+ threads at width >= 512; small matrices lose to its call cost. On Intel CPUs MKL,
    tuned for them, is as fast or faster, so the weights stay plain. `vendor` defaults to this CPU's.
    """
    if device.type != "cpu" or not onednn_available():
        return False
    if (cpu_vendor() if vendor is None else vendor) == "GenuineIntel":
        return False
    return (batch_size >= 2 and width >= 256) or (torch.get_num_threads() >= 2 and width >= 512)


PRECISIONS = ("fp32", "int8")


def check_precision(config, precision: str) -> None:
    """Refuse a precision the decoder cannot run for this model, with a message that says why."""
    if precision not in PRECISIONS:
        raise IgptError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and config.objective != "ar":
        raise IgptError("int8 decoding is for autoregressive models; BERT models fill masks with full passes "
                        "of the float model (use the default precision)")


LEVELS = 63  # int8 weights hold -63..63: see Int8Matrix
# Float32 bytes of one layer's cache widened at once without AMX: a few sequences, so that the buffer
# stays in the CPU's cache (widening all of a large batch at once loses to a float32 cache).
WIDE_BYTES = 8 << 20


class Int8Matrix(NamedTuple):
    """A weight (in, out) as int8, one symmetric scale per output channel, packed for fbgemm.

    fbgemm multiplies the row's uint8 codes (quantised on the fly from its min and max) by these
    levels in int32. Levels stop at ±63 so that CPUs without VNNI, which add pairs of uint8 × int8
    products in saturating int16, never saturate (255 · 63 · 2 < 32767) and give the results
    those with VNNI give. (The other way to that, 127 levels and 7-bit inputs, erred as much on a
    random iGPT-S-shaped product: RMS error 0.0229 both ways.)
    """

    packed: torch.Tensor  # fbgemm's packed levels, owned by this (opaque, byte) tensor
    shape: torch.Tensor  # a zero-strided (out, in) stand-in: the kernel reads only the weight's shape
    level_sums: torch.Tensor  # (out,) int32: each channel's sum of levels, to remove the input's zero point
    scale: torch.Tensor  # (out,) float32: one level's value in each output channel
    bias: torch.Tensor  # (out,) the bias in units of `scale` (the kernel adds it before the scaling); or zeros


def _int8_matrix(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Matrix:
    """`weight` (in, out) quantised per output channel, with its float32 bias, if any, for `int8_product`.

    The kernel is fbgemm's, through `torch.fbgemm_linear_int8_weight_fp32_activation`: the fastest
    int8 product measured on CPUs (faster than `quantized.linear_dynamic`, the same kernel behind a
    TorchScript weight object that costs ~15 us a call to hand over, and than oneDNN's, torchao's or
    `_weight_int8pack_mm`). These tensor-argument functions are deprecated yet still in PyTorch 2.13
    and warn once per process (`_silence_fbgemm_warnings`). If a PyTorch drops them, `_build` says
    so, and this function and `int8_product` are the one place to change.
    """
    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=0).clamp(min=1e-30) / LEVELS
    levels = torch.round(w / scale).clamp_(-LEVELS, LEVELS).to(torch.int8).T.contiguous()  # (out, in)
    n_out, n_in = levels.shape
    bias = torch.zeros(n_out) if bias is None else bias.to(torch.float32) / scale
    _silence_fbgemm_warnings()
    return Int8Matrix(torch.fbgemm_pack_quantized_matrix(levels), torch.zeros((), dtype=torch.int8).expand(n_out, n_in),
                      levels.sum(dim=1, dtype=torch.int32), scale, bias.contiguous())


def int8_product(x: torch.Tensor, matrix: Int8Matrix) -> torch.Tensor:
    """x @ weight (+ bias) in units of `matrix.scale` (the caller scales it, often within another operation);
    x float32 (rows, in), quantised to uint8 over the whole tensor."""
    return torch.fbgemm_linear_int8_weight_fp32_activation(
        x, matrix.shape, matrix.packed, matrix.level_sums, 1.0, 0, matrix.bias)


@lru_cache(maxsize=1)
def _silence_fbgemm_warnings() -> None:
    """Call the fbgemm functions once, their deprecation warnings silenced: each warns only on its
    first call in a process, so no later call shows one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fbgemm.* is deprecated")
        levels = torch.zeros(1, 1, dtype=torch.int8)
        int8_product(torch.zeros(1, 1), Int8Matrix(torch.fbgemm_pack_quantized_matrix(levels), levels,
                                                    torch.zeros(1, dtype=torch.int32), torch.ones(1), torch.zeros(1)))


def _has_int8_kernels() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and all(
        hasattr(torch, f) for f in ("fbgemm_pack_quantized_matrix", "fbgemm_linear_int8_weight_fp32_activation"))


# A model's blocks as decoders read them, by layout, re-used while its weights are unchanged.
# - int8 blocks are kept while the model lives: quantising is a pass over every weight (about a
#   second at iGPT-S sizes, as long as decoding 40 pixels), so a demo's second completion, or `score`
#   over many batches, quantises nothing.
# - float blocks (a folded copy of the weights) are shared by the decoders alive at once and freed
#   with the last of them: two users completing at once hold one copy of the weights, not two, and
#   nothing stays behind after the requests.
# "Unchanged" is told by each parameter's storage and version counter, which every in-place update
# (an optimiser step, `load_state_dict`, `copy_` under no_grad) advances; like autograd's own check
# of saved tensors, it cannot see writes made through `.data`.
_blocks: weakref.WeakKeyDictionary[IGPT, dict[tuple, tuple]] = weakref.WeakKeyDictionary()


class _Layers(list):
    """Every layer's weights as `Decoder.feed` reads them (a list a weak reference can point to)."""


def _weights_key(model: IGPT) -> tuple:
    return tuple((name, t.data_ptr(), t._version, t.dtype, t.device) for name, t in model.named_parameters())


def _shared_layers(model: IGPT | None, layout: tuple, build: Callable[[], list]) -> _Layers:
    """The model's blocks in `layout` (precision first), built by `build()` unless a decoder made them already."""
    if model is None:
        return _Layers(build())
    key, kept = _weights_key(model), _blocks.setdefault(model, {}).get(layout)
    if kept is not None and kept[0] == key:
        layers = kept[1] if layout[0] == "int8" else kept[1]()
        if layers is not None:
            return layers
    layers = _Layers(build())
    _blocks[model][layout] = (key, layers if layout[0] == "int8" else weakref.ref(layers))
    return layers


class Decoder:
    """Feed palette tokens, get the next pixel's logits; keys and values stay in a cache.

    >>> decoder = Decoder(model, batch_size=4)
    >>> logits = decoder.feed(prompt)  # prompt (1, t): the same tokens for all 4 sequences, computed once
    >>> logits = decoder.feed(tokens)  # tokens (4, t) at positions decoder.length ..; logits (4, n_colors)

    `precision` is "fp32" (the model's own function, in the model's dtype) or "int8" (see the module's
    docstring; CPU float32 models only).
    """

    def __init__(self, model: IGPT, batch_size: int, precision: str = "fp32"):
        first = next(model.parameters())
        self._build(model.config, model.state_dict().__getitem__, first.device, first.dtype, batch_size, precision,
                    model)

    @classmethod
    def from_weights(cls, config: ModelConfig, weight: Callable[[str], torch.Tensor], batch_size: int,
                     precision: str = "fp32") -> Decoder:
        """A decoder made from `weight(name)`, IGPT's state-dict tensors (on the CPU), asked for one at a time.

        With int8, each layer is quantised before the next is read, so a model whose float32 weights
        do not fit in memory (iGPT-L: 5.4 GB) can be decoded in about a quarter of that, from a
        `safetensors.safe_open` file or weights made on the fly.
        """
        decoder = cls.__new__(cls)
        decoder._build(config, weight, torch.device("cpu"), torch.float32, batch_size, precision, None)
        return decoder

    def _build(self, config: ModelConfig, weight, device: torch.device, dtype: torch.dtype, batch_size: int,
               precision: str, model: IGPT | None) -> None:
        if config.objective != "ar":
            raise IgptError("one-token-at-a-time decoding is for autoregressive models; BERT models fill masks "
                            "by iterative decoding (igpt_core.sample.inpaint)")
        check_precision(config, precision)
        if precision == "int8" and (device.type != "cpu" or dtype != torch.float32):
            raise IgptError(f"int8 decoding runs float32 models on the CPU; this model is {dtype} on {device}")
        if precision == "int8" and not _has_int8_kernels():
            raise IgptError("int8 decoding needs PyTorch's fbgemm kernels (x86 CPUs); "
                            f"this build has {', '.join(torch.backends.quantized.supported_engines)} and "
                            "not the fbgemm functions it calls (use the default precision)")
        self.config, self.precision = config, precision
        self.device, self.dtype = device, dtype
        self.onednn = self.dtype == torch.float32 and use_onednn(self.device, batch_size, config.n_embd)
        d, self.n_head = config.n_embd, config.n_head
        self.head_dim = d // config.n_head
        # rms_norm(x) = x / √(mean(x²) + eps) = √d · x / √(‖x‖² + d·eps): the √d goes into the weights
        root_d = math.sqrt(d)
        self.root_d_eps = torch.tensor(math.sqrt(d * config.layer_norm_epsilon), device=self.device, dtype=self.dtype)

        # Folded in float64 (where the device has it), so that each stored weight is the float32 (or
        # model dtype) rounding of the exact product: the decoder is then as exact as the model itself.
        # int8 rounds far more coarsely than float32, so its weights are folded in float32.
        exact = precision == "fp32" and self.device.type in ("cpu", "cuda")
        fold = torch.float64 if exact else torch.float32
        p = lambda name: weight(name).detach().to(fold)  # noqa: E731
        self.wte, self.wpe = self._keep(p("wte.weight")), self._keep(p("wpe.weight"))
        layout = (precision, self.onednn and batch_size)  # oneDNN packs its weights for a batch size
        self.layers = _shared_layers(model, layout,
                                     lambda: [self._block(p, i, batch_size) for i in range(config.n_layer)])
        self.head = self._matrix((p("lm_head.weight") * p("ln_f.weight")).T * root_d, batch_size)  # no bias
        # (n_layer, B, 2, nh, n_positions, hs): keys then values, so that one copy stores both
        shape = (config.n_layer, batch_size, 2, self.n_head, config.n_positions, self.head_dim)
        self.kv_dtype = torch.bfloat16 if precision == "int8" else self.dtype
        self.kv = torch.empty(shape, device=self.device, dtype=self.kv_dtype)
        # bfloat16 attention is fast only with AMX; elsewhere each layer's cache is widened to float32,
        # a few sequences at a time, into this buffer (small enough to stay in the CPU's cache)
        self._wide = None
        if precision == "int8" and not cpu_has_amx():
            per_sequence = math.prod(shape[2:]) * self.dtype.itemsize
            rows = max(1, min(batch_size, WIDE_BYTES // per_sequence))
            self._wide = torch.empty((rows, *shape[2:]), device=self.device, dtype=self.dtype)
        # each layer's cache, and its keys and values, as views made once (a step then only narrows them)
        self._cache = [(kv, kv[:, 0], kv[:, 1]) for kv in self.kv]
        self.length = 0  # positions filled; the next token sits at this position
        self.diverged = False  # whether the sequences have been fed different tokens yet

    def _block(self, p: Callable[[str], torch.Tensor], i: int, batch_size: int) -> tuple:
        """Block i's four products and their biases, as `feed` reads them: matrices for x @ W, (in, out)."""
        d, root_d = self.config.n_embd, math.sqrt(self.config.n_embd)
        w = lambda name: p(f"h.{i}.{name}")  # noqa: E731
        query = slice(0, d)  # c_attn's outputs are Q | K | V
        attn_w = w("attn.c_attn.weight") * w("ln_1.weight")  # (3d, d): the norm's gain scales the inputs
        attn_b = w("attn.c_attn.bias").clone()
        attn_w[query] /= math.sqrt(self.head_dim)  # attention's scale, applied to the queries once
        attn_b[query] /= math.sqrt(self.head_dim)
        fc_w = w("mlp.c_fc.weight") * w("ln_2.weight") * QUICK_GELU
        normed = [(attn_w.T * root_d, attn_b), (fc_w.T * root_d, w("mlp.c_fc.bias") * QUICK_GELU)]
        plain = [(w("attn.c_proj.weight").T, w("attn.c_proj.bias")),
                 (w("mlp.c_proj.weight").T / QUICK_GELU, w("mlp.c_proj.bias"))]
        if self.precision == "int8":  # a normed product's bias is added after its division, so it stays out
            (attn, attn_b), (fc, fc_b) = ((_int8_matrix(m), self._keep(b)) for m, b in normed)
            (proj, proj_b), (out, out_b) = ((_int8_matrix(m, b), None) for m, b in plain)
        else:
            (attn, attn_b), (fc, fc_b), (proj, proj_b), (out, out_b) = (
                (self._matrix(m, batch_size), self._keep(b)) for m, b in normed + plain)
        return attn, attn_b, proj, proj_b, fc, fc_b, out, out_b

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def _matrix(self, t: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A weight (in, out) in the layout `_product` reads: plain, or packed for oneDNN."""
        t = self._keep(t)
        return torch.ops.mkldnn._reorder_linear_weight(t.T.contiguous(), batch_size) if self.onednn else t

    def _product(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight (+ bias)."""
        if isinstance(weight, Int8Matrix):
            assert bias is None, "an int8 product's bias is held with its weight (_int8_matrix)"
            return int8_product(x, weight).mul_(weight.scale)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return x @ weight if bias is None else torch.addmm(bias, x, weight)

    def _add_product(self, out: torch.Tensor, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> None:
        """out += x @ weight (+ bias), in place (int8: the scaling and the addition in one operation)."""
        if isinstance(weight, Int8Matrix):
            out.addcmul_(int8_product(x, weight), weight.scale)
        else:
            out.add_(self._product(x, weight, bias))

    def _normed_product(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) @ weight (+ bias), the norm's gain and √d already in `weight`; with a bias, into
        `out` if given (which may be of a narrower dtype: the result is rounded once, when written)."""
        norm = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.root_d_eps)  # √(‖x‖² + d·eps)
        product = self._product(x, weight)
        return product.div_(norm) if bias is None else torch.addcdiv(bias, product, norm, out=out)

    def _attention(self, queries: torch.Tensor, kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int,
                   mask) -> torch.Tensor:
        """The new queries (B, nh, T, hs) attended over the cache's first `end` positions, (B, nh, T, hs)."""
        if self._wide is not None:
            return self._widened_attention(queries, kv, end, mask)
        keys, values = k.narrow(2, 0, end), v.narrow(2, 0, end)  # (B, nh, end, hs) each, views of the cache
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=1.0)

    def _widened_attention(self, queries: torch.Tensor, kv: torch.Tensor, end: int, mask) -> torch.Tensor:
        """Attention over a bfloat16 cache `kv` (B, 2, nh, positions, hs) computed in float32, its first
        `end` positions widened into `self._wide` a few sequences at a time."""
        rows = len(self._wide)
        parts = []
        for first in range(0, len(kv), rows):
            part = kv[first : first + rows].narrow(3, 0, end)
            wide = self._wide[: len(part)].narrow(3, 0, end)
            wide.copy_(part)
            parts.append(F.scaled_dot_product_attention(queries[first : first + rows].to(self.dtype), wide[:, 0],
                                                        wide[:, 1], attn_mask=mask, scale=1.0))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def feed(self, tokens: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """Tokens (B, t) at positions length..length+t-1; the logits after the last one, (B, n_colors),
        or with `every_position` after each of them, (B, t, n_colors) (scoring a sequence in one call).

        B is the decoder's batch size, or 1 for tokens that every sequence shares (a prompt): they
        are computed once and their keys and values copied to every sequence. Tokens are network
        inputs: the first call starts with the SOS id (`config.sos_id`), and the logits after
        token i predict pixel i (token i is pixel i-1).
        """
        B, T = tokens.shape
        start, end = self.length, self.length + T
        if end > self.config.n_positions:
            raise ValueError(f"sequence of {end} tokens exceeds n_positions={self.config.n_positions}")
        shared = B == 1 and self.batch_size > 1
        if shared and self.diverged:
            raise ValueError("tokens shared by every sequence must come before tokens that differ between them")
        if B != self.batch_size and not shared:
            raise ValueError(f"this decoder holds {self.batch_size} sequences, got tokens for {B}")
        self.diverged = self.diverged or not shared
        nh, hs, d = self.n_head, self.head_dim, self.config.n_embd
        x = (F.embedding(tokens, self.wte) + self.wpe[start:end]).view(B * T, d)  # the residual stream
        # new queries see every cached position and, among themselves, only earlier ones
        mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
        # each layer's queries, keys and values, written straight in the cache's dtype
        qkv_rows = torch.empty(B * T, 3 * d, device=self.device, dtype=self.kv_dtype)
        reduced = self.kv_dtype != self.dtype  # int8's bfloat16 cache
        for (kv, k, v), (attn_w, attn_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b) in zip(self._cache, self.layers):
            if shared:  # computed for the first sequence only
                kv, k, v = kv[:1], k[:1], v[:1]
            qkv = self._normed_product(x, attn_w, attn_b, out=qkv_rows).view(B, T, 3, nh, hs).permute(0, 2, 3, 1, 4)
            kv.narrow(3, start, T).copy_(qkv.narrow(1, 1, 2))  # this step's keys and values, in one copy
            queries = qkv.select(1, 0)
            y = self._attention(queries, kv, k, v, end, mask)
            y = (y.to(self.dtype) if reduced else y).transpose(1, 2).reshape(B * T, d)
            self._add_product(x, y, proj_w, proj_b)  # x is this step's own tensor: added to in place
            h = F.silu(self._normed_product(x, fc_w, fc_b), inplace=True)  # quick-GELU, its 1.702 folded in
            self._add_product(x, h, out_w, out_b)
        if shared:  # every sequence gets the shared tokens' keys and values
            self.kv[:, 1:, :, :, start:end] = self.kv[:, :1, :, :, start:end]
        self.length = end
        if every_position:
            return self._normed_product(x, self.head).view(B, T, -1)
        return self._normed_product(x.view(B, T, d)[:, -1].contiguous(), self.head)
