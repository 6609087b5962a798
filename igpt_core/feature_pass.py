"""Probe features in bf16 on a CPU: the network of model.py, its weights laid out once for this one job.

`IGPT.features` under torch.autocast gives the same numbers to bf16's precision, but on a CPU it
leaves most of the hardware's bf16 speed unused (measured at iGPT-S's shapes on a 2-core AMD EPYC with
AVX512-BF16, docs/performance.md): autocast casts every weight again for every batch; `F.linear`
first copies its bias into the output; PyTorch's fused CPU attention kernel runs no faster in bf16
than in fp32; and each elementwise step is a pass over memory of its own. This pass, used by
`probe.extract_features` whenever features are computed in bf16 on a CPU:

- casts the weights to bf16 once, packed for oneDNN (PyTorch's CPU matrix library) with the bias
  added inside the product, and quick-GELU done there too: x·σ(1.702x) = silu(1.702x) / 1.702, so
  c_fc's weights carry the 1.702 and c_proj's the 1/1.702, and the product ends in oneDNN's "swish";
- folds each norm's gain g into the product that reads the norm: W·(g ⊙ n) = (W·diag(g))·n, so a
  norm is one pass (x / rms(x), written straight into bf16); a probe feature, the mean over
  positions of g ⊙ x / rms(x), is g ⊙ (the mean of x / rms(x)), taken in fp32;
- computes attention in blocks of query rows, each block against only the keys it may see (causal:
  about half the products of the full T × T scores), in reused buffers. The scores come out of the
  product rounded to bf16 (the fused kernel keeps them in fp32), in powers of 2 (the query's weights
  carry log2 e), and the softmax is 2^s / Σ 2^s, each computed in fp32 and rounded to bf16;
- runs independent passes of ROWS positions side by side, one per core, instead of spreading each
  pass over all cores.

The residual stream stays fp32 throughout, as under autocast. tests/test_feature_pass.py checks the
result against fp32 `IGPT.features` and against autocast's, for AR and BERT models.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .device import cpu_computes_bf16, onednn_available
from .model import IGPT, QUICK_GELU

ROWS = 4096  # positions per forward pass (4 images of 32 × 32): larger batches spill the caches and run slower
# A block whose rows' Σ 2^s fall outside this range takes the safe softmax: below it, the scores may have
# lost precision to underflow; above it, the sum or the output might overflow.
SUMS = (2.0**-64, 2.0**100)
QUERY_BLOCK = 128  # query rows per attention block: the block's scores stay small, and causal blocks skip most masked keys


def query_block(T: int) -> int:
    """Query rows per attention block: the largest divisor of T up to QUERY_BLOCK, or all of T when
    that divisor is too small to be worth a block (T = p² for a prime p)."""
    block = max(c for c in range(1, min(T, QUERY_BLOCK) + 1) if T % c == 0)
    return block if block >= 32 or block == T else T


class Product:
    """y = x @ W.T + b in bf16, optionally followed by silu, with W packed once (oneDNN where present)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rows: int, silu: bool = False, onednn: bool = True):
        self.silu = silu
        self.bias = bias.detach().to(torch.bfloat16)
        weight = weight.detach().to(torch.bfloat16).contiguous()
        self.onednn = onednn
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if self.onednn else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish" if self.silu else "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.silu(y, inplace=True) if self.silu else y


class FeaturePass:
    """Probe features of an IGPT in bf16 on a CPU: `FeaturePass(model)(ids, layers, mask)` gives what
    `model.features(ids, layers, mask)` gives, (len(layers), B, n_embd) fp32, to bf16's precision.

    Built once per feature extraction: it holds a bf16 copy of the weights (half the fp32 model's size).
    `onednn`: pack the weights for oneDNN (default: where this PyTorch has it and the CPU computes bf16
    natively; oneDNN's bf16 products need AVX-512 or AMX), else plain `F.linear`.
    """

    def __init__(self, model: IGPT, onednn: bool | None = None):
        self.model = model
        onednn = onednn_available() and cpu_computes_bf16() if onednn is None else onednn
        config = model.config
        self.causal = config.objective == "ar"
        self.n_head = config.n_head
        self.eps = config.layer_norm_epsilon
        rows = max(1, ROWS // config.n_positions) * config.n_positions
        self.blocks = []
        with torch.no_grad():
            for block in model.h:
                g1, g2 = block.ln_1.weight.float(), block.ln_2.weight.float()
                attn, mlp = block.attn, block.mlp
                # Attention's 1/√hs rides in the query's weights (the first C outputs of c_attn), and so does
                # log2(e): the scores come out in powers of 2, for the softmax's exp2 (see Attention).
                scale = torch.ones(3 * config.n_embd)
                scale[: config.n_embd] = math.log2(math.e) / math.sqrt(config.n_embd // config.n_head)
                self.blocks.append(dict(
                    gain=g1.clone(),
                    qkv=Product(attn.c_attn.weight * g1 * scale[:, None], attn.c_attn.bias * scale, rows, onednn=onednn),
                    proj=Product(attn.c_proj.weight, attn.c_proj.bias, rows, onednn=onednn),
                    fc=Product(mlp.c_fc.weight * g2 * QUICK_GELU, mlp.c_fc.bias * QUICK_GELU, rows, silu=True, onednn=onednn),
                    out=Product(mlp.c_proj.weight / QUICK_GELU, mlp.c_proj.bias, rows, onednn=onednn),
                ))
            self.final_gain = model.ln_f.weight.float().clone()

    def __call__(self, ids: torch.Tensor, layers, mask: torch.Tensor | None = None) -> torch.Tensor:
        layers = [int(layer) for layer in layers]
        per_pass = max(1, ROWS // ids.shape[1])
        passes = [(ids[i : i + per_pass], None if mask is None else mask[i : i + per_pass])
                  for i in range(0, len(ids), per_pass)]
        threads = torch.get_num_threads()
        streams = min(threads, len(passes))
        if streams <= 1:
            return torch.cat([self.one_pass(part, layers, part_mask) for part, part_mask in passes], dim=1)
        # Independent passes side by side, one per core, rather than each pass spread over all cores: most
        # of a pass's operations are too small to share well. Profiled at iGPT-S's shapes, one thread did
        # attention's small products 1.7× and the softmax 1.3× faster per core than two threads sharing
        # them, the weights' large products 1.1×; in all 5-10% faster on 2 cores. torch.set_num_threads in
        # a worker sets that thread's own count (OpenMP keeps one per thread) and the count threads started
        # later begin with, which is put back at the end; the caller's own count never changes.
        def start_stream():
            torch.set_num_threads(max(1, threads // streams))

        try:
            with ThreadPoolExecutor(streams, initializer=start_stream) as pool:
                parts = list(pool.map(lambda job: self.one_pass(job[0], layers, job[1]), passes))
        finally:
            torch.set_num_threads(threads)
        return torch.cat(parts, dim=1)

    @torch.inference_mode()
    @torch.autocast("cpu", enabled=False)  # the number formats are chosen here, op by op
    def one_pass(self, ids: torch.Tensor, layers: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """Features of one forward pass: blocks up to the deepest layer asked for."""
        n = len(self.blocks)
        x = self.model.embed(ids, mask).float()  # (B, T, C): the fp32 residual stream
        B, T, C = x.shape
        x = x.view(B * T, C)
        normed = torch.empty(B * T, C, dtype=torch.bfloat16)  # each norm's output, reused
        scratch = torch.empty(B * T, C)  # the norm in fp32 before its one rounding: faster than writing bf16 directly
        attention = Attention(B, T, C, self.n_head, self.causal)
        found = {}
        for i, w in enumerate(self.blocks[: min(max(layers) + 1, n)]):
            mean = self.norm(x, normed, scratch, B, T, mean=i in layers)
            if i in layers:
                found[i] = mean * w["gain"]
            if i == max(layers):
                break
            x += w["proj"](attention(w["qkv"](normed).view(B, T, 3 * C)))
            self.norm(x, normed, scratch, B, T, mean=False)
            x += w["out"](w["fc"](normed))
        if n in layers:
            found[n] = self.norm(x, normed, scratch, B, T, mean=True) * self.final_gain
        return torch.stack([found[layer] for layer in layers])

    def norm(self, x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, B: int, T: int,
             mean: bool) -> torch.Tensor | None:
        """out = x / rms(x) in bf16 (the norm without its gain, which the next product holds); returns
        the fp32 mean of x / rms(x) over each image's positions, (B, C), if `mean`."""
        C = x.shape[1]
        inv_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(self.eps).rsqrt_()
        out.copy_(torch.mul(x, inv_rms, out=scratch))
        return torch.bmm(inv_rms.view(B, 1, T), x.view(B, T, C)).view(B, C) / T if mean else None


class Attention:
    """softmax(q·kᵀ)·v for every head of one pass's (B, T, 3C) projections, q already scaled by
    log2(e)/√hs, by blocks of query rows, each block against only the keys it may see; in buffers made
    once per pass and reused by every layer (fresh large tensors cost page faults of their own).

    The softmax is taken as 2^s / Σ 2^s without first subtracting each row's largest score, and the
    division is done on the block's output (c × hs numbers) rather than on its probabilities (c × seen):
    2^s in place and its sum take under half the time of torch.softmax (0.3 against 0.6 ns an element
    on one core of the Zen 5, in bf16). The shift by the maximum only guards against leaving the
    floating-point range (2^s beyond 2^127 or below 2^-126): where a row's sum falls outside SUMS, the
    block is computed again with torch.softmax.
    """

    def __init__(self, B: int, T: int, C: int, n_head: int, causal: bool):
        self.causal = causal
        c = self.c = query_block(T)
        H, hs, nb = n_head, C // n_head, T // c
        # Heads first: q (B, blocks, H, c, hs), k and v (B, H, T, hs); each block's output lands in out
        # (B, blocks, H, c, hs). oneDNN's batched product takes only whole matrices, so the keys and values a
        # block sees (a prefix of each head's) are copied into seen_k and seen_v first; the keys stay
        # untransposed (copying them transposed is 20 times slower), and the product reads them as kᵀ.
        self.q = torch.empty(B, nb, H, c, hs, dtype=torch.bfloat16)
        self.k = torch.empty(B, H, T, hs, dtype=torch.bfloat16)
        self.v = torch.empty_like(self.k)
        self.seen_k = torch.empty(H * T * hs, dtype=torch.bfloat16)
        self.seen_v = torch.empty_like(self.seen_k)
        self.out = torch.empty_like(self.q)
        self.merged = torch.empty(B, nb, c, H, hs, dtype=torch.bfloat16)  # out with the heads side by side again
        self.scores = torch.empty(H * c * T, dtype=torch.bfloat16)
        self.probs = torch.empty_like(self.scores)
        # Within the diagonal block, keys after the query get -inf (added: faster than masked_fill on a strided view).
        self.future = torch.zeros(c, c, dtype=torch.bfloat16).masked_fill_(torch.ones(c, c, dtype=torch.bool).triu(1), float("-inf"))

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3C) bf16 → (B·T, C) bf16, valid until the next call."""
        B, nb, H, c, hs = self.q.shape
        T = nb * c
        parts = qkv.view(B, T, 3, H, hs)
        self.q.copy_(parts[:, :, 0].reshape(B, nb, c, H, hs).permute(0, 1, 3, 2, 4))
        self.k.copy_(parts[:, :, 1].permute(0, 2, 1, 3))
        self.v.copy_(parts[:, :, 2].permute(0, 2, 1, 3))
        for b in range(B):
            for j in range(nb):
                seen = (j + 1) * c if self.causal else T  # keys this block of queries may attend to
                s = self.scores[: H * c * seen].view(H, c, seen)
                p = self.probs[: H * c * seen].view(H, c, seen)
                k, v = self.k[b], self.v[b]
                if seen < T:
                    k = self.seen_k[: H * seen * hs].view(H, seen, hs).copy_(k[:, :seen])
                    v = self.seen_v[: H * seen * hs].view(H, seen, hs).copy_(v[:, :seen])
                out = self.out[b, j]
                total = self.scores_of(self.q[b, j], k, s, j).exp2_().sum(-1, keepdim=True)  # bf16, summed in fp32 inside
                smallest, largest = torch.aminmax(total)
                if SUMS[0] < smallest.item() and largest.item() < SUMS[1]:
                    torch.matmul(s, v, out=out).div_(total)
                else:  # the safe way: scores again, shifted by their maximum inside torch.softmax
                    torch.softmax(self.scores_of(self.q[b, j], k, s, j).mul_(math.log(2)), -1, out=p)  # 2^s = e^(s·ln 2)
                    torch.matmul(p, v, out=out)
        self.merged.copy_(self.out.permute(0, 1, 3, 2, 4))
        return self.merged.view(B * T, H * hs)

    def scores_of(self, q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, j: int) -> torch.Tensor:
        """s = q·kᵀ (in powers of 2) for query block j, keys after each query at -inf if causal."""
        torch.matmul(q, k.transpose(1, 2), out=s)
        if self.causal:
            c = self.future.shape[0]
            s[:, :, j * c : (j + 1) * c].add_(self.future)
        return s
