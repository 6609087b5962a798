"""Tests for igpt_core.explain: attention against Hugging Face's, the logit lens, next-pixel
distributions, BERT masking, and attention distance on a model built by hand."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from igpt_core import explain, load_dataset
from igpt_core.pretrained import hf
from igpt_core.errors import IgptError
from igpt_core.likelihood import masking_groups
from igpt_core.model import IGPT, ModelConfig
from igpt_core.runs import open_run
from conftest import randomize
from tests.test_hf import SHAPES, save_hf_folder
from tests.test_model import random_model

from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402  (a dev dependency)


def some_ids(model, seed=0, n=None):
    shape = (model.config.n_positions,) if n is None else (n, model.config.n_positions)
    return torch.randint(0, model.config.n_colors, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "513-colours", "upcast-eps"])
def test_attention_maps_equal_hugging_face_output_attentions(tmp_path, shape):
    theirs = ImageGPTForCausalImageModeling(ImageGPTConfig(**shape, attn_implementation="eager"))
    randomize(theirs, seed=7)
    save_hf_folder(theirs, tmp_path / "hf")
    ours = hf.import_hf(str(tmp_path / "hf"), "imported", tmp_path / "runs", progress=False).load()[0]

    ids = some_ids(ours, seed=8)
    sos = torch.tensor([ours.config.sos_id])
    with torch.no_grad():  # HF reads raw tokens: [SOS, pixel 0 .. pixel T-2]
        layers = theirs(torch.cat([sos, ids[:-1]])[None], output_attentions=True, use_cache=False).attentions
    expected = torch.stack(layers)[:, 0]  # (L, nh, T, T): query row t; key 0 is SOS, key j is pixel j - 1
    T, side = len(ids), ours.config.image_size
    for t in (0, 1, side + 2, T - 1):
        maps = explain.attention_maps(ours, ids, t)
        assert maps.pixels.shape == (shape["n_layer"], shape["n_head"], side, side)
        torch.testing.assert_close(maps.sos, expected[:, :, t, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps.pixels.flatten(2)[..., : T - 1], expected[:, :, t, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps.pixels.flatten(2).sum(-1) + maps.sos, torch.ones(maps.sos.shape))
        assert torch.all(maps.pixels.flatten(2)[..., t:] == 0)  # the pixel itself and the future: exactly nothing


def test_model_attention_weights_are_exactly_zero_on_the_future():
    model = random_model()
    ids = some_ids(model, n=2)
    with torch.no_grad():
        for weights in model.attention_weights(ids):
            assert weights.shape == (2, model.config.n_head, 36, 36)
            future = torch.ones(36, 36, dtype=torch.bool).triu(1)
            assert torch.all(weights[..., future] == 0)
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.config.n_head, 36))


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_last_layer_prediction_is_the_models_own(objective):
    model = random_model(objective)
    ids = some_ids(model, seed=1)
    lens = explain.layer_predictions(model, ids)
    assert lens.shape == (model.config.n_layer + 1, 36, model.config.n_colors)
    with torch.no_grad():
        if objective == "ar":
            expected = model(ids[None])[0][0].log_softmax(-1)
        else:  # every pixel read with its masking group hidden
            expected = torch.zeros_like(lens[-1])
            for group in masking_groups(model.config, 36):
                expected[group] = model(ids[None], mask=group[None])[0][0, group].log_softmax(-1)
    torch.testing.assert_close(lens[-1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lens[0], lens[-1])  # the embeddings alone predict something else
    torch.testing.assert_close(lens.exp().sum(-1), torch.ones(lens.shape[:2]))


def test_next_pixel_ar_is_the_softmax_of_the_logits_and_reshapes_like_sampling():
    model = random_model()
    ids = some_ids(model, seed=2)
    with torch.no_grad():
        logits = model(ids[None])[0][0]
    for t in (0, 7, 35):
        torch.testing.assert_close(explain.next_pixel(model, ids, t), logits[t].softmax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(explain.next_pixel(model, ids, 7, temperature=0.5), (logits[7] / 0.5).softmax(-1))
    top = explain.next_pixel(model, ids, 7, top_k=3)
    assert (top > 0).sum() == 3 and set(top.topk(3).indices.tolist()) == set(logits[7].topk(3).indices.tolist())
    assert math.isclose(float(top.sum()), 1, rel_tol=1e-6)
    assert explain.entropy(top) < explain.entropy(explain.next_pixel(model, ids, 7)) <= math.log(16)


def test_next_pixel_bert_masks_the_pixel_itself():
    model = random_model("bert")
    ids = some_ids(model, seed=3)
    t = 14
    recoloured = ids.clone()
    recoloured[t] = (ids[t] + 5) % 16
    torch.testing.assert_close(explain.next_pixel(model, recoloured, t), explain.next_pixel(model, ids, t), atol=0, rtol=0)
    maps, again = explain.attention_maps(model, ids, t), explain.attention_maps(model, recoloured, t)
    assert maps.sos is None
    torch.testing.assert_close(maps.pixels, again.pixels, atol=0, rtol=0)
    torch.testing.assert_close(maps.pixels.flatten(2).sum(-1), torch.ones(2, 4))
    neighbour = ids.clone()
    neighbour[t + 1] = (ids[t + 1] + 5) % 16  # a pixel it does see moves the distribution
    assert not torch.allclose(explain.next_pixel(model, neighbour, t), explain.next_pixel(model, ids, t))


def test_next_pixel_each_is_next_pixel_at_every_checkpoint(tiny_run):
    steps = tiny_run.checkpoints()
    models = [(step, tiny_run.load(step)[0]) for step in steps]
    ids = some_ids(models[0][1], seed=4)
    each = list(explain.next_pixel_each(iter(models), ids, 20, temperature=0.7, top_k=5))
    assert [step for step, _ in each] == steps
    for (step, probabilities), (_, model) in zip(each, models):
        torch.testing.assert_close(probabilities, explain.next_pixel(model, ids, 20, temperature=0.7, top_k=5))
        assert (probabilities > 0).sum() == 5
    assert not torch.allclose(each[0][1], each[-1][1]), "training moves the distribution"


def previous_pixel_model(side=4, n_head=2) -> IGPT:
    """An AR model whose every head puts all its weight on one neighbour of the predicted pixel: the
    pixel to its left in the first row, the pixel above it below that. Positions are one-hot
    embeddings; queries map position t to the key position holding that neighbour; values, MLPs
    and colour embeddings are zero, so the stream (and the pattern) stays the same in every layer."""
    T = side * side
    config = ModelConfig(vocab_size=3, n_positions=T, n_layer=2, n_head=n_head, n_embd=n_head * T)
    model = IGPT(config).eval()
    C = config.n_embd
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.ln_f, *(n for b in model.h for n in (b.ln_1, b.ln_2))]:
            norm.weight.fill_(1)
        model.wpe.weight[:, :T] = torch.eye(T)
        for block in model.h:
            weight = block.attn.c_attn.weight  # (3C, C): Q | K | V
            for h in range(n_head):
                for t in range(1, T):
                    neighbour = t - side if t >= side else t - 1
                    weight[h * T + neighbour + 1, t] = 10.0  # query of pixel t looks for the key holding `neighbour`
                weight[C + h * T : C + (h + 1) * T, :T] = torch.eye(T)
    return model


def test_attention_distance_of_a_one_neighbour_model_is_one_pixel():
    model = previous_pixel_model()
    ids = some_ids(model, n=3)
    maps = explain.attention_maps(model, ids[0], 9)  # pixel (2, 1) looks at (1, 1)
    assert maps.pixels[:, :, 1, 1].min() > 1 - 1e-6
    distance = explain.attention_distance(model, ids, batch_size=2)
    assert distance.shape == (2, 2)
    torch.testing.assert_close(distance, torch.ones(2, 2), atol=1e-5, rtol=0)


def test_attention_distance_of_trained_runs(tiny_run, bert_run):
    for run in (tiny_run, bert_run):
        model = open_run(run.name, run.path.parent).load()[0]
        distance = explain.attention_distance(model, some_ids(model, n=3))
        side = model.config.image_size
        assert distance.shape == (2, 2) and torch.all(distance > 0) and torch.all(distance < side * math.sqrt(2))


def test_bad_inputs_say_what_is_wrong():
    model = random_model()
    ids = some_ids(model)
    with pytest.raises(IgptError, match="outside the 6×6 image"):
        explain.next_pixel(model, ids, 36)
    with pytest.raises(IgptError, match="36"):
        explain.attention_maps(model, ids[:20], 3)
    with pytest.raises(IgptError, match="palette ids"):
        explain.layer_predictions(model, ids + 16)
    with pytest.raises(IgptError, match="temperature"):
        explain.next_pixel(model, ids, 3, temperature=0)
    with pytest.raises(IgptError, match="pixels"):
        explain.attention_distance(model, ids[:20])


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_a_freshly_initialised_model_attends_uniformly(objective):
    """At init q·k ≈ 0, so every head spreads its weight evenly: the distance of uniform attention."""
    config = ModelConfig(vocab_size=17, n_positions=36, n_layer=2, n_head=2, n_embd=32, objective=objective)
    torch.manual_seed(0)
    model = IGPT(config).eval()
    distance = explain.attention_distance(model, some_ids(model, n=2))
    torch.testing.assert_close(distance, torch.full((2, 2), explain.uniform_distance(config)), atol=0.02, rtol=0)


def test_run_distances_are_stored_and_measured_once(tiny_run, tmp_path):
    shutil.copytree(tiny_run.path, tmp_path / "runs" / "copy")
    run = open_run("copy", tmp_path / "runs")
    assert explain.load_distances(run) is None
    calls = []
    table = explain.run_distances(run, [run.checkpoints()[0]], images=8, on_progress=lambda *a: calls.append(a))
    assert calls == [(1, 1)] and {r["step"] for r in table["rows"]} == {run.checkpoints()[0]}
    assert explain.load_distances(run) == table
    table = explain.run_distances(run, "all", images=8, on_progress=lambda *a: calls.append(a))
    assert len(calls) == len(run.checkpoints()) and {r["step"] for r in table["rows"]} == set(run.checkpoints())
    model = run.load()[0]
    ids = torch.from_numpy(run.palette.encode(load_dataset("digits", "val", resolution=8).images[:8], 8))
    last = [r["distance"] for r in table["rows"] if r["step"] == run.checkpoints()[-1]]
    assert last == pytest.approx(explain.attention_distance(model, ids).flatten().tolist())
    explain.run_distances(run, "all", images=8, on_progress=lambda *a: calls.append(a))
    assert len(calls) == len(run.checkpoints())  # nothing left to measure
    assert [p.name for p in explain.distance_path(run).parent.iterdir()] == ["distance.json"]  # no temp files

    explain.distance_path(run).write_text('{"rows": [')
    with pytest.raises(IgptError, match="distance.json are damaged"):
        explain.load_distances(run)
