"""FeaturePass (bf16 probe features on a CPU) against the model's own fp32 features and against autocast."""

import math
import threading

import numpy as np
import pytest
import torch

from igpt_core.device import cpu_computes_bf16, onednn_available
from igpt_core.feature_pass import FeaturePass, query_block
from igpt_core.model import IGPT, preset
from igpt_core.probe.features import extract_features


def peaky_model(objective: str, n_positions: int, seed: int = 0) -> IGPT:
    """A tiny model whose weights are large enough that attention is far from uniform and the norms'
    gains vary: a mistake in masking, scaling or folding then changes the features visibly."""
    torch.manual_seed(seed)
    model = IGPT(preset("tiny", vocab_size=17, n_positions=n_positions, objective=objective)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return model


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest relative error of one feature vector (per layer and image)."""
    return ((found - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()


def inputs(model: IGPT, n: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.n_colors, (n, model.config.n_positions), generator=generator)
    mask = None
    if model.config.objective == "bert":
        mask = torch.rand(ids.shape, generator=generator) < model.config.mask_prob
    return ids, mask


@pytest.mark.parametrize("onednn", [None, False], ids=["default", "plain"])
@pytest.mark.parametrize("objective,n_positions", [("ar", 256), ("ar", 49), ("bert", 256), ("bert", 64)])
@torch.inference_mode()
def test_features_match_fp32_within_bf16_precision(objective, n_positions, onednn):
    model = peaky_model(objective, n_positions)
    if onednn is None:  # the default: oneDNN's packed products on CPUs that compute bf16 (this project's), else plain
        assert FeaturePass(model).blocks[0]["fc"].onednn == (onednn_available() and cpu_computes_bf16())
    ids, mask = inputs(model)
    layers = list(range(model.config.n_layer + 1))
    expected = model.features(ids, layers, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.features(ids, layers, mask).float()
    found = FeaturePass(model, onednn=onednn)(ids, layers, mask)
    assert found.dtype == torch.float32 and found.shape == expected.shape
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-3, as autocast's; a wrong mask or fold gives 1e-1 and more.
    assert relative_error(found, expected) < 2e-2
    assert relative_error(found, expected) < 3 * relative_error(autocast, expected)


@torch.inference_mode()
def test_a_causal_mistake_would_show():
    """The test's tolerance can fail: the same pass with future keys let through misses it widely."""
    model = peaky_model("ar", 256)
    ids, _ = inputs(model)
    expected = model.features(ids)
    bidirectional = FeaturePass(model)
    bidirectional.causal = False
    assert relative_error(bidirectional(ids, range(5)), expected) > 0.1


@torch.inference_mode()
def test_layer_subsets_in_any_order_and_batches_split_into_passes():
    model = peaky_model("ar", 256)
    ids, _ = inputs(model, n=20)  # 20 × 256 positions: split into passes of ROWS positions
    fast = FeaturePass(model)
    whole = fast(ids, range(5), None)
    picked = fast(ids, [3, 0, 4], None)
    torch.testing.assert_close(picked, whole[[3, 0, 4]], rtol=0, atol=1e-6)
    one_by_one = torch.cat([fast(ids[i : i + 1], [1], None) for i in range(len(ids))], dim=1)
    torch.testing.assert_close(one_by_one, whole[[1]], rtol=1e-5, atol=1e-5)


def test_query_blocks_divide_the_sequence():
    assert query_block(1024) == 128  # 32 × 32 images: 8 blocks
    assert query_block(576) == 96
    assert query_block(64) == 64 and query_block(49) == 49
    assert query_block(169) == 169  # 13 × 13: blocks of 13 rows would be too small to pay
    for T in (16, 64, 100, 256, 784, 1024, 4096):
        assert T % query_block(T) == 0


def test_extract_features_in_bf16_stays_close_to_fp32():
    """The probe's entry point takes the pass for bf16 on a CPU, BERT masks included."""
    model = peaky_model("bert", 64)
    ids = np.random.default_rng(0).integers(0, 16, (12, 64))
    fp32 = extract_features(model, ids, [0, 2, 4], batch_size=5, bert_masks=2, precision="fp32")
    bf16 = extract_features(model, ids, [0, 2, 4], batch_size=5, bert_masks=2, precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == (3, 12, 128)
    assert relative_error(torch.from_numpy(bf16), torch.from_numpy(fp32)) < 2e-2


@torch.inference_mode()
def test_passes_run_side_by_side_one_per_thread_and_the_callers_thread_count_stays():
    model = peaky_model("ar", 256)
    ids, _ = inputs(model, n=40)  # 40 images of 256 positions: passes of 16, 16 and 8 images
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fast = FeaturePass(model)
        ran_on = []
        one_pass = fast.one_pass
        fast.one_pass = lambda *args: (ran_on.append((threading.get_ident(), torch.get_num_threads())), one_pass(*args))[1]
        side_by_side = fast(ids, range(5))
        assert len(ran_on) == 3 and len({thread for thread, _ in ran_on}) == 2  # two streams
        assert all(count == 1 for _, count in ran_on)  # each on one thread of its own
        assert torch.get_num_threads() == 2
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # threads started afterwards begin with the caller's count too
        torch.set_num_threads(1)
        ran_on.clear()
        one_stream = fast(ids, range(5))
        assert {thread for thread, _ in ran_on} == {threading.get_ident()}
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(side_by_side, one_stream, rtol=0, atol=0)  # the same passes, in order


@pytest.mark.parametrize("objective", ["ar", "bert"])
@torch.inference_mode()
def test_scores_beyond_the_range_of_2_to_the_s_take_the_safe_softmax(objective):
    """Attention logits in the hundreds (2^s beyond bf16's range, 2^±127, in both directions) give
    features as close to fp32's as autocast's: such blocks are computed again with the maximum shifted out."""
    model = peaky_model(objective, 256)
    for block in model.h:
        block.attn.c_attn.weight[:256] *= 12  # q and k (the first 2 × 128 outputs): logits × 144
    ids, mask = inputs(model)
    x = model.h[0].ln_1(model.embed(ids, mask))
    q, k, _ = model.h[0].attn.c_attn(x).split(128, dim=-1)
    logits = q.view(6, 256, 4, 32)[:, :, 0] @ k.view(6, 256, 4, 32)[:, :, 0].transpose(1, 2) / math.sqrt(32)
    assert logits.max() > 200 and logits.min() < -200  # in base 2: beyond 2^±127 (× log2(e) = 1.44)
    layers = list(range(model.config.n_layer + 1))
    expected = model.features(ids, layers, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model.features(ids, layers, mask).float()
    found = FeaturePass(model)(ids, layers, mask)
    assert torch.isfinite(found).all()
    assert relative_error(found, expected) < 3 * relative_error(autocast, expected)
