"""The precision argument of the likelihood and the inside views: "fp32" (default), "bf16", "auto".

bf16 runs the matrix products in bfloat16 (results come back float32), close to fp32 but not equal
to it; "auto" is whichever of the two `device.resolve_precision` picks for this machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt_core import explain
from igpt_core.data import load_dataset
from igpt_core.device import resolve_precision
from igpt_core.errors import IgptError
from igpt_core.likelihood import pixel_nll, score


@pytest.fixture(scope="module")
def model_and_ids(tiny_run):
    model, palette, _ = tiny_run.load()
    return model, torch.from_numpy(palette.encode(load_dataset("digits", "val").images[:24], 8))


def test_likelihood_in_bf16_is_close_to_fp32_and_says_which_ran(model_and_ids):
    model, ids = model_and_ids
    fp32, bf16 = pixel_nll(model, ids, precision="fp32"), pixel_nll(model, ids, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert abs(float(bf16.mean()) - float(fp32.mean())) < 0.02  # nats per token
    auto = score(model, ids, precision="auto")
    assert auto["precision"] == resolve_precision("auto", "cpu", model.config.n_embd)  # fp32 for narrow models
    assert auto["nats_per_token"] == score(model, ids, precision=auto["precision"])["nats_per_token"]
    with pytest.raises(IgptError, match="precision must be one of"):
        score(model, ids, precision="fp16")


def test_inside_views_take_a_precision(model_and_ids):
    model, ids = model_and_ids
    image = ids[0]
    for view in (lambda p: explain.next_pixel(model, image, 20, precision=p),
                 lambda p: explain.layer_predictions(model, image, precision=p),
                 lambda p: torch.from_numpy(explain.entropy_map(model, image, precision=p)),
                 lambda p: explain.attention_maps(model, image, 20, precision=p).pixels,
                 lambda p: explain.attention_distance(model, ids[:4], precision=p)):
        fp32, bf16 = view("fp32"), view("bf16")
        assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
        np.testing.assert_allclose(bf16.numpy(), fp32.numpy(), atol=0.1)
        with pytest.raises(IgptError, match="precision must be one of"):
            view("half")
