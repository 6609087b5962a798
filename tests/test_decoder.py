"""The decoder (KV cache, weights laid out for one token at a time) against the model's own forward pass."""

import copy
import gc
import weakref

import pytest
import torch
from conftest import randomize

from igpt_core import decoder as decoder_module
from igpt_core.decoder import Decoder
from igpt_core.device import cpu_vendor
from igpt_core.errors import IgptError
from igpt_core.model import IGPT, ModelConfig
from tests.test_model import random_model

SHAPES = [  # depth, width, heads, palette, resolution and eps all varied
    dict(n_layer=2, n_embd=32, n_head=4, vocab_size=17, n_positions=36),
    dict(n_layer=3, n_embd=48, n_head=2, vocab_size=513, n_positions=64, layer_norm_epsilon=1e-6),
]


def randomized(shape) -> IGPT:
    torch.manual_seed(0)  # the test ids too: the float32 error bounds below were measured on these inputs
    return randomize(IGPT(ModelConfig(**shape)))


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def decode_all(model, ids):
    """Every position's logits from the decoder, one token at a time after SOS."""
    decoder = Decoder(model, len(ids))
    steps = [decoder.feed(torch.full((len(ids), 1), model.config.sos_id))]
    steps += [decoder.feed(ids[:, t : t + 1]) for t in range(model.config.n_positions - 1)]
    assert decoder.length == model.config.n_positions
    with pytest.raises(ValueError, match="exceeds n_positions"):
        decoder.feed(ids[:, :1])
    return torch.stack(steps, 1)


@pytest.mark.parametrize("shape", SHAPES, ids=["16-colours", "512-colours"])
def test_one_token_at_a_time_computes_the_same_function_as_the_forward_pass(shape):
    model = randomized(shape)
    ids = torch.randint(0, model.config.n_colors, (3, model.config.n_positions))
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        full, _ = model(ids)
        truth, _ = exact(ids)
    # in float64 the folded weights change nothing beyond float64 rounding: the same function
    torch.testing.assert_close(decode_all(exact, ids), truth, atol=1e-12, rtol=1e-12)
    # in float32 the decoder is as close to the truth as the model's own forward pass is
    forward_error = (full.double() - truth).abs().max()
    decoder_error = (decode_all(model, ids).double() - truth).abs().max()
    assert decoder_error <= 1.5 * forward_error + 1e-6, (decoder_error, forward_error)


@pytest.mark.parametrize("shape", SHAPES, ids=["16-colours", "512-colours"])
def test_chunks_and_a_shared_prompt_equal_the_full_forward_pass(shape):
    model = randomized(shape).double()  # float64: a wrong mask or cache position shows, rounding does not
    ids = torch.randint(0, model.config.n_colors, (3, model.config.n_positions))
    ids[:, :10] = ids[0, :10]  # one prompt, three different continuations
    with torch.no_grad():
        full, _ = model(ids)
    decoder = Decoder(model, 3)  # one prompt, fed once for three sequences
    sos = torch.full((1, 1), model.config.sos_id)
    close(decoder.feed(torch.cat([sos, ids[:1, :5]], 1)), full[:1, 5])
    close(decoder.feed(ids[:1, 5:10]), full[:1, 10])
    close(decoder.feed(ids[:, 10:20]), full[:, 20])  # a chunk: causal among itself, sees all cached positions
    close(decoder.feed(ids[:, 20:21]), full[:, 21])
    with pytest.raises(ValueError, match="must come before"):
        decoder.feed(ids[:1, 21:22])


def test_decoder_is_a_snapshot_and_refuses_what_it_cannot_do():
    model = random_model()
    decoder = Decoder(model, 2)
    sos = torch.full((2, 1), model.config.sos_id)
    before = decoder.feed(sos)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # later training is not seen by an existing decoder ...
    decoder.length = 0
    close(decoder.feed(sos), before)
    close(Decoder(model, 2).feed(sos), 2 * before)  # ... but by a new one
    with pytest.raises(ValueError, match="holds 2 sequences"):
        decoder.feed(torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(IgptError, match="autoregressive"):
        Decoder(random_model("bert"), 1)


@pytest.mark.parametrize("onednn", [False, True], ids=["plain-matrices", "onednn-packed"])
def test_both_matrix_layouts_are_as_exact_as_the_forward_pass(monkeypatch, onednn):
    monkeypatch.setattr(decoder_module, "use_onednn", lambda device, batch_size, width: onednn)
    model = randomized(SHAPES[1])
    ids = torch.randint(0, model.config.n_colors, (2, model.config.n_positions))
    ids[1, :7] = ids[0, :7]  # one prompt, two different continuations
    with torch.no_grad():
        full, _ = model(ids)
        truth, _ = copy.deepcopy(model).double()(ids)
    decoder = Decoder(model, 2)
    assert decoder.onednn is onednn
    sos = torch.full((1, 1), model.config.sos_id)
    steps = [decoder.feed(torch.cat([sos, ids[:1, :7]], 1)).expand(2, -1)]  # a shared prompt, then one by one
    steps += [decoder.feed(ids[:, t : t + 1]) for t in range(7, model.config.n_positions - 1)]
    decoder_error = (torch.stack(steps, 1).double() - truth[:, 7:]).abs().max()
    assert decoder_error <= 1.5 * (full.double() - truth).abs().max() + 1e-6


def test_onednn_is_chosen_where_it_was_measured_faster(monkeypatch):
    cpu, amd = torch.device("cpu"), "AuthenticAMD"
    use = decoder_module.use_onednn
    assert use(cpu, 8, 512, amd) and use(cpu, 2, 256, amd)
    assert not use(cpu, 8, 128, amd)  # small matrices: its call cost dominates
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not use(cpu, 1, 512, amd)  # one thread, one sequence: MKL streams faster
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert use(cpu, 1, 512, amd)
    assert not any(use(cpu, batch, 512, "GenuineIntel") for batch in (1, 2, 8))  # MKL on its own maker's CPUs
    assert cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "")  # read from /proc/cpuinfo


def test_decoders_alive_at_once_share_one_copy_of_the_weights_and_free_it_after():
    model = randomized(SHAPES[0])
    first, second = Decoder(model, 1), Decoder(model, 1)
    assert first.layers is second.layers  # two users completing at once: one folded copy
    kept = weakref.ref(first.layers)
    del first, second
    gc.collect()
    assert kept() is None  # freed with the last decoder: nothing stays behind after the requests
    third = Decoder(model, 1)
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(2)
    assert Decoder(model, 1).layers is not third.layers  # changed weights: folded again
