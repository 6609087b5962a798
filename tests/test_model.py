"""The model: causality, features, BERT masking, presets, save/load (KV-cache decoding: test_decoder.py)."""

import math

import pytest
import torch
from conftest import randomize

from igpt_core.errors import CheckpointError, ConfigError
from igpt_core.model import IGPT, preset
from igpt_core.palette import Palette
from igpt_core.runs import load_checkpoint, save_checkpoint


def random_model(objective="ar", **overrides):
    config = preset("tiny", vocab_size=17, n_positions=36, n_layer=2, n_embd=32, n_head=4, objective=objective, **overrides)
    return randomize(IGPT(config))


def test_causality_gradient_of_later_inputs_is_zero():
    model = random_model()
    ids = torch.randint(0, 16, (2, 36))
    x = model._embed(model._inputs(ids)).detach().requires_grad_(True)
    h, _ = model._blocks(x)
    t = 17
    h[:, t].sum().backward()
    assert x.grad[:, t + 1 :].abs().max() == 0  # nothing after t reaches position t
    assert x.grad[:, : t + 1].abs().max() > 0


def test_logits_at_t_do_not_depend_on_pixel_t_or_later():
    model = random_model()
    ids = torch.randint(0, 16, (1, 36))
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 16
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :21], b[:, :21])  # logits[t] predict pixel t from pixels < t
    assert not torch.allclose(a[:, 21:], b[:, 21:])


def test_bert_is_bidirectional_and_masks_zero_the_colour():
    model = random_model("bert")
    ids = torch.randint(0, 16, (1, 36))
    changed = ids.clone()
    changed[0, 30] = (changed[0, 30] + 1) % 16
    a, _ = model(ids)
    b, _ = model(changed)
    assert not torch.allclose(a[:, :30], b[:, :30])  # later pixels do reach earlier positions
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 30] = True
    c, _ = model(ids, mask=mask)
    d, _ = model(changed, mask=mask)
    torch.testing.assert_close(c, d)  # a masked pixel's colour is invisible


def test_bert_loss_is_on_masked_positions_only():
    model = random_model("bert")
    ids = torch.randint(0, 16, (2, 36))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, [3, 9]] = True
    logits, loss = model(ids, targets=ids, mask=mask)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(loss, nll[mask].mean())


def test_ar_loss_scores_every_pixel_including_the_first():
    model = random_model()
    ids = torch.randint(0, 16, (2, 36))
    logits, loss = model(ids, targets=ids)
    assert logits.shape == (2, 36, 16)
    manual = -logits.log_softmax(-1).gather(-1, ids[..., None]).mean()
    torch.testing.assert_close(loss, manual)


def test_features_are_the_input_norm_of_each_block_averaged_over_positions():
    model = random_model()
    ids = torch.randint(0, 16, (2, 36))
    feats = model.features(ids)  # all layers 0..n_layer
    assert feats.shape == (3, 2, 32)
    # by hand, through the modules: the stream after l blocks, normed by the next reader
    x = model._embed(model._inputs(ids))
    expected = [model.h[0].ln_1(x).mean(1)]
    x = model.h[0](x, True)
    expected.append(model.h[1].ln_1(x).mean(1))
    x = model.h[1](x, True)
    expected.append(model.ln_f(x).mean(1))
    torch.testing.assert_close(feats, torch.stack(expected))
    torch.testing.assert_close(model.features(ids, [2, 0]), torch.stack([expected[2], expected[0]]))
    with pytest.raises(ValueError, match="out of range"):
        model.features(ids, [3])


def test_norm_is_rms_without_mean_or_bias():
    model = random_model()
    norm = model.h[0].ln_1
    x = torch.randn(4, 32) + 3.0  # a mean that a LayerNorm would remove
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert not any(name.endswith("ln_1.bias") for name, _ in model.named_parameters())


def test_presets_match_the_paper_parameter_counts():
    paper = {"s": 76e6, "m": 455e6, "l": 1.36e9, "xl": 6.8e9}
    for name, count in paper.items():
        with torch.device("meta"):
            model = IGPT(preset(name, vocab_size=513, n_positions=1024))
        assert math.isclose(model.num_parameters(), count, rel_tol=0.02), (name, model.num_parameters())


def test_preset_overrides_are_typed():
    assert preset("tiny", n_layer=2).n_layer == 2
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown model setting"):
        preset("tiny", n_layers=2)
    with pytest.raises(ConfigError, match="takes a int"):
        preset("tiny", n_layer="2")
    with pytest.raises(ConfigError, match="square"):
        preset("tiny", n_positions=50)


def test_save_load_gives_identical_logits(tmp_path):
    model = random_model()
    palette = Palette(torch.rand(16, 3).numpy() * 2 - 1)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, palette, step=7)
    loaded, loaded_palette, info = load_checkpoint(path)
    ids = torch.randint(0, 16, (2, 36))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert loaded_palette == palette and info["step"] == 7
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_bad_checkpoints_get_clear_errors(tmp_path):
    model = random_model()
    palette = Palette(torch.rand(16, 3).numpy() * 2 - 1)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, model, palette)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(3, 2)}, foreign)
    with pytest.raises(CheckpointError, match="import-hf"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="colours"):
        save_checkpoint(tmp_path / "x.safetensors", model, Palette(torch.rand(8, 3).numpy()))
