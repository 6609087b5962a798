"""Completion, streaming, inpainting and likelihood on a tiny trained run."""

import math

import numpy as np
import pytest
import torch

from igpt_core.errors import IgptError
from igpt_core.likelihood import pixel_nll, score, surprise_map
from igpt_core.sample import complete, complete_each, complete_stream, inpaint, inpaint_stream, sample_logits, unconditional


@pytest.fixture(scope="module")
def model_and_ids(tiny_run):
    from igpt_core.data import load_dataset

    model, palette, _ = tiny_run.load()
    images = load_dataset("digits", "test").images[:8]
    return model, torch.from_numpy(palette.encode(images, 8))


def test_seeded_sampling_is_reproducible_and_seeds_differ(model_and_ids):
    model, ids = model_and_ids
    a = complete(model, ids[0], 4, 4, seed=3)
    assert torch.equal(a, complete(model, ids[0], 4, 4, seed=3))
    assert not torch.equal(a, complete(model, ids[0], 4, 4, seed=4))


def test_kept_pixels_are_never_changed(model_and_ids):
    model, ids = model_and_ids
    for keep in (0, 1, 5, 8):
        out = complete(model, ids[1], keep, 3, seed=0)
        assert out.shape == (3, 64)
        assert torch.equal(out[:, : keep * 8], ids[1, : keep * 8].expand(3, -1))


def test_streaming_yields_growing_prefixes_ending_in_the_plain_result(model_and_ids):
    model, ids = model_and_ids
    items = list(complete_stream(model, ids[2], 3, 2, seed=5))
    assert len(items) >= 5  # at least once per generated row
    counts = [n for _, n, _ in items]
    assert counts == sorted(counts) and counts[-1] == 5 * 8
    for (prev, n, done), (nxt, _, _) in zip(items, items[1:]):
        filled = 3 * 8 + n
        assert torch.equal(done, torch.arange(64).ge(3 * 8) & torch.arange(64).lt(filled))  # the pixels it made
        assert torch.equal(prev[:, :filled], nxt[:, :filled])  # nothing generated is changed later
    assert torch.equal(items[-1][0], complete(model, ids[2], 3, 2, seed=5))


def test_inpainting_changes_only_masked_pixels(model_and_ids, bert_run):
    _, ids = model_and_ids
    known = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.6
    for model in (model_and_ids[0], bert_run.load()[0]):
        out = inpaint(model, ids[3], known, 3, seed=1)
        assert torch.equal(out[:, known], ids[3, known].expand(3, -1))
        assert (out[:, ~known] != ids[3, ~known]).any()  # something was actually sampled
    rounds = list(inpaint_stream(bert_run.load()[0], ids[3], known, 1, steps=4, seed=0))
    assert len(rounds) == 4
    for (_, n, done), (_, _, later) in zip(rounds, rounds[1:]):  # BERT fills in no fixed order: it says where
        assert int(done.sum()) == n and not (done & known).any() and (later >= done).all()
    assert torch.equal(rounds[-1][2], ~known)


def test_ar_sampling_follows_the_model_distribution():
    # top-k 1 is greedy: each pixel is the argmax of the logits given the pixels before it
    from tests.test_model import random_model

    model = random_model()
    out = unconditional(model, 2, top_k=1, seed=0)
    logits, _ = model(out)
    assert torch.equal(logits.argmax(-1), out)


def test_top_p_and_top_k_restrict_the_choices():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(2000, -1))
    g = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, g, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_logits(logits, g, top_k=3).tolist()) == {0, 1, 2}
    counts = torch.bincount(sample_logits(logits, g), minlength=4) / 2000
    assert counts[0] == pytest.approx(0.5, abs=0.05)


def test_bad_sampling_options_are_refused(model_and_ids):
    model, ids = model_and_ids
    for options, message in [(dict(temperature=0), "temperature"), (dict(top_p=1.5), "top-p"),
                             (dict(top_k=0), "top-k")]:
        with pytest.raises(IgptError, match=message):
            complete(model, ids[0], 4, 1, **options)
    with pytest.raises(IgptError, match="0..8"):
        complete(model, ids[0], 9, 1)
    with pytest.raises(IgptError, match="nothing to fill"):
        inpaint(model, ids[0], torch.ones(64, dtype=torch.bool))
    with pytest.raises(IgptError, match="pixels"):
        complete(model, ids[0, :10], 1)


def test_dataset_likelihood_is_the_mean_of_per_pixel_nll(model_and_ids):
    model, ids = model_and_ids
    nll = pixel_nll(model, ids)
    result = score(model, ids, batch_size=3)
    assert result["nats_per_token"] == pytest.approx(float(nll.double().mean()), rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(result["nats_per_token"] / math.log(2))
    assert result["bits_per_subpixel"] == pytest.approx(result["bits_per_token"] / 3)
    assert "lossy" in result["note"]
    _, loss = model(ids, targets=ids)
    assert result["nats_per_token"] == pytest.approx(loss.item(), rel=1e-5)
    surprise = surprise_map(model, ids[4])
    assert surprise.shape == (8, 8) and np.allclose(surprise.ravel(), nll[4].numpy())


def test_complete_each_gives_every_checkpoint_the_same_seed(tiny_run, model_and_ids):
    _, ids = model_and_ids
    steps = tiny_run.checkpoints()
    loaded = []

    def checkpoints():  # one model at a time, as an app holding each checkpoint only while it is used would
        for step in steps:
            loaded.append(step)
            yield step, tiny_run.load(step)[0]

    results = []
    for step, out in complete_each(checkpoints(), ids[3], 4, 3, seed=7):
        assert loaded[-1] == step, "each checkpoint is loaded only when it is completed"
        results.append((step, out))
    assert [step for step, _ in results] == steps and len(steps) >= 3
    for step, out in results:
        assert torch.equal(out, complete(tiny_run.load(step)[0], ids[3], 4, 3, seed=7))
        assert torch.equal(out[:, :32], ids[3, :32].expand(3, -1))
    assert len({out.numpy().tobytes() for _, out in results}) > 1, "training changes the completions"
