"""int8 decoding: what the decoder holds, how close it stays to float32 on a trained run, what it refuses."""

import gc
import weakref

import pytest
import torch

import igpt_core.decoder as decoder_module
from igpt_core.data import load_dataset
from igpt_core.decoder import LEVELS, Decoder, Int8Matrix, int8_product
from igpt_core.device import cpu_has_amx
from igpt_core.errors import IgptError
from igpt_core.likelihood import pixel_nll, score
from igpt_core.sample import complete, inpaint, unconditional
from tests.test_decoder import SHAPES, randomized


def test_int8_decoder_holds_per_channel_int8_weights_and_gives_float32_logits():
    model = randomized(SHAPES[1])
    d, config = model.config.n_embd, model.config
    decoder, exact = Decoder(model, 2, "int8"), Decoder(model, 2)
    assert decoder.precision == "int8" and exact.kv.dtype == torch.float32
    assert decoder.kv.dtype == torch.bfloat16  # half the bytes; attended to in float32 unless the CPU has AMX
    assert (decoder._wide is None) == cpu_has_amx()
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    layer, exact_layer = decoder.layers[0], exact.layers[0]
    for matrix, bias, exact_matrix, exact_bias, (n_out, n_in) in zip(layer[::2], layer[1::2], exact_layer[::2],
                                                                    exact_layer[1::2], shapes):
        assert isinstance(matrix, Int8Matrix) and matrix.shape.shape == (n_out, n_in)
        scale = matrix.scale  # one per output channel
        assert scale.shape == (n_out,) and scale.dtype == torch.float32
        # the kernel itself, fed each unit vector, returns its weights: whole levels within ±63
        rows = int8_product(torch.eye(n_in), matrix) - matrix.bias
        levels = rows.round()
        assert (rows - levels).abs().max() < 1e-3 and levels.abs().max() <= LEVELS
        assert (levels.abs().amax(dim=0) == LEVELS).all()  # symmetric: each channel's largest weight uses every level
        assert ((levels * scale - exact_matrix).abs() <= scale / 2 + 1e-6).all()  # the folded fp32 weights, rounded
        if bias is None:  # the two products without a norm before them hold their bias with the weight
            assert torch.allclose(matrix.bias * scale, exact_bias, atol=1e-6)
        else:  # the others add it after the norm's division
            assert not matrix.bias.any() and torch.allclose(bias, exact_bias, atol=1e-6)
    assert [b is None for b in layer[1::2]] == [False, True, False, True]  # attn, proj, fc, out
    assert isinstance(decoder.head, torch.Tensor) and decoder.head.dtype == torch.float32  # the head stays fp32
    sos = torch.full((1, 1), config.sos_id)
    logits = decoder.feed(torch.cat([sos, torch.zeros(1, 4, dtype=torch.long)], 1))  # a shared prompt
    assert logits.shape == (1, config.n_colors) and logits.dtype == torch.float32
    every = decoder.feed(torch.zeros(2, 3, dtype=torch.long), every_position=True)
    assert every.shape == (2, 3, config.n_colors) and decoder.length == 8


def test_a_decoder_from_weights_read_one_at_a_time_equals_one_from_the_model():
    model = randomized(SHAPES[0])
    state = model.state_dict()
    asked = []
    ids = torch.randint(0, model.config.n_colors, (2, 6))
    ids[:, 0] = model.config.sos_id
    for precision in ("fp32", "int8"):
        lazy = Decoder.from_weights(model.config, lambda name: asked.append(name) or state[name], 2, precision)
        expected = Decoder(model, 2, precision).feed(ids, every_position=True)
        assert torch.equal(lazy.feed(ids, every_position=True), expected)
    assert set(asked) == set(state)  # every weight was read, through the callable alone


def test_the_cache_widened_one_sequence_at_a_time_gives_the_logits_of_all_at_once(monkeypatch):
    # without AMX the bfloat16 cache is widened to float32 a few sequences at a time (WIDE_BYTES)
    monkeypatch.setattr(decoder_module, "cpu_has_amx", lambda: False)
    model = randomized(SHAPES[1])
    ids = torch.randint(0, model.config.n_colors, (3, 7))
    ids[:, 0] = model.config.sos_id
    at_once = Decoder(model, 3, "int8")
    monkeypatch.setattr(decoder_module, "WIDE_BYTES", 1)
    one_by_one = Decoder(model, 3, "int8")
    assert len(at_once._wide) == 3 and len(one_by_one._wide) == 1
    for decoder in (at_once, one_by_one):  # a shared prompt, then one token per sequence
        decoder.feed(ids[:1, :4])
        decoder.feed(ids[:, 4:6])
    torch.testing.assert_close(one_by_one.feed(ids[:, 6:]), at_once.feed(ids[:, 6:]), rtol=0, atol=1e-6)


def test_a_model_is_quantised_once_until_its_weights_change():
    model = randomized(SHAPES[0])
    ids = torch.randint(0, model.config.n_colors, (2, 6))
    ids[:, 0] = model.config.sos_id

    def fresh(m):  # quantised from scratch: nothing is cached for a decoder made from weights
        return Decoder.from_weights(m.config, m.state_dict().__getitem__, 2, "int8").feed(ids, every_position=True)

    first, second = Decoder(model, 2, "int8"), Decoder(model, 1, "int8")
    assert second.layers is first.layers  # the same packed blocks, at any batch size
    before = first.feed(ids, every_position=True)
    assert torch.equal(before, fresh(model))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # one training step changes every weight
    model(ids)[0].logsumexp(-1).mean().backward()
    optimizer.step()
    after = Decoder(model, 2, "int8")
    assert after.layers is not first.layers and torch.equal(after.feed(ids, every_position=True), fresh(model))
    assert not torch.equal(after.layers[0][0].scale, first.layers[0][0].scale)

    model.load_state_dict(randomized(SHAPES[0]).state_dict())  # weights loaded in place
    assert torch.equal(Decoder(model, 2, "int8").feed(ids, every_position=True), fresh(model))

    kept = weakref.ref(model)  # the cache holds no reference to the model: it goes when the model goes
    del model, first, second, after
    gc.collect()
    assert kept() is None


@pytest.fixture(scope="module")
def trained(tiny_run):
    model, palette, _ = tiny_run.load()
    images = load_dataset("digits", "test").images[:64]
    return model, torch.from_numpy(palette.encode(images, model.config.image_size))


@pytest.mark.parametrize("attention", [torch.float32, torch.bfloat16])
def test_int8_stays_close_to_fp32_on_a_trained_run(trained, attention, monkeypatch):
    # both ways on every machine: the bfloat16 cache is attended to in bfloat16 only on CPUs with AMX
    monkeypatch.setattr(decoder_module, "cpu_has_amx", lambda: attention == torch.bfloat16)
    model, ids = trained
    assert (Decoder(model, 1, "int8")._wide is None) == (attention == torch.bfloat16)
    fp32, int8 = score(model, ids), score(model, ids, precision="int8")
    assert int8["precision"] == "int8" and fp32["precision"] == "fp32"
    assert abs(int8["bits_per_token"] / fp32["bits_per_token"] - 1) < 0.01  # the bound: within 1%
    with torch.inference_mode():
        logits, _ = model(ids)
        sos = torch.full_like(ids[:, :1], model.config.sos_id)
        approx = Decoder(model, len(ids), "int8").feed(torch.cat([sos, ids[:, :-1]], 1), every_position=True)
    # teacher-forced: the same most likely colour at >= 98% of positions (measured: 99.9%), logits
    # within 0.1 (measured: 0.03, against logits of size ~2)
    assert (logits.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.98
    assert (logits - approx).abs().max() < 0.1
    side = model.config.image_size
    greedy = [complete(model, ids[i], side // 2, 1, top_k=1, precision=p) for i in range(8) for p in ("fp32", "int8")]
    same = torch.stack([(a == b).float().mean() for a, b in zip(greedy[::2], greedy[1::2])])
    assert same.mean() >= 0.9  # greedy completions: measured identical on 50 of 50 images


def test_int8_sampling_keeps_the_prompt_and_is_seeded(trained):
    model, ids = trained
    side = model.config.image_size
    a = complete(model, ids[0], side // 2, 3, seed=5, precision="int8")
    assert a.shape == (3, side * side) and torch.equal(a[:, : side * side // 2], ids[0, : side * side // 2].expand(3, -1))
    assert torch.equal(a, complete(model, ids[0], side // 2, 3, seed=5, precision="int8"))
    assert unconditional(model, 2, seed=1, precision="int8").shape == (2, side * side)


def test_int8_is_refused_for_bert_models_bad_names_and_non_float32_models(trained, bert_run):
    model, ids = trained
    bert, _, _ = bert_run.load()
    known = torch.ones(ids.shape[1], dtype=torch.bool)
    known[-5:] = False
    with pytest.raises(IgptError, match="int8 decoding is for autoregressive models"):
        inpaint(bert, ids[0], known, precision="int8")
    with pytest.raises(IgptError, match="int8 decoding is for autoregressive models"):
        pixel_nll(bert, ids[:2], precision="int8")
    with pytest.raises(IgptError, match="autoregressive"):
        Decoder(bert, 1, "int8")
    for call in (lambda: Decoder(model, 1, "int4"), lambda: complete(model, ids[0], 2, precision="float16")):
        with pytest.raises(IgptError, match="precision must be one of fp32, int8"):
            call()
    with pytest.raises(IgptError, match="float32 models on the CPU"):
        Decoder(randomized(SHAPES[0]).double(), 1, "int8")
