"""`igpt inside` end to end: a real process on a tiny trained run, its picture, its numbers, its errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igpt_core import cli, explain
from igpt_core.images import load_image
from tests.test_cli import igpt


def igpt_here(*args, cwd, monkeypatch, capsys):
    """The same command in this process (through cli.main, as the installed script runs it): the
    bad-input cases each need their own run, and a fresh interpreter per case costs seconds."""
    monkeypatch.chdir(cwd)
    try:
        cli.main([str(a) for a in args])
        status = 0
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def digit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inside")
    image = np.zeros((8, 8, 3), np.uint8)
    image[1:7, 3:5] = 255
    Image.fromarray(image).save(folder / "digit.png")
    (folder / "broken.png").write_bytes(b"not a picture")
    return folder


@pytest.mark.parametrize("run_fixture", ["tiny_run", "bert_run"])
def test_inside_writes_the_picture_and_the_numbers(request, digit, run_fixture, monkeypatch, capsys):
    run = request.getfixturevalue(run_fixture)
    args = ["inside", run.name, "--runs-dir", run.path.parent, "--image", "digit.png", "--pixel", "5,4",
            "--out", "inside.png", "--json"]
    if run_fixture == "tiny_run":  # once as a user runs it, in a process of its own
        out = igpt(*args, cwd=digit).stdout
    else:
        status, out, _ = igpt_here(*args, cwd=digit, monkeypatch=monkeypatch, capsys=capsys)
        assert status == 0
    result = json.loads(out)

    model, palette, _ = run.load()
    ids = palette.encode(load_image(digit / "digit.png")[None], 8)[0]
    t = 4 * 8 + 3  # --pixel 5,4 counts from 1: row 5, column 4 is 0-based (4, 3)
    probabilities = explain.next_pixel(model, ids, t)
    assert result["top_ids"] == probabilities.topk(8).indices.tolist()
    np.testing.assert_allclose(result["top_probabilities"], probabilities.topk(8).values, rtol=1e-5)
    assert result["true_id"] == int(ids[t]) and result["step"] == max(run.checkpoints())
    assert result["pixel"] == [5, 4]
    assert result["true_probability"] == pytest.approx(float(probabilities[ids[t]]), rel=1e-5)
    if run_fixture == "tiny_run":  # BERT's layer readings hide a masking group, next_pixel the pixel alone
        assert result["layer_true_probability"][-1] == pytest.approx(result["true_probability"], rel=1e-4)
    assert len(result["layer_true_probability"]) == model.config.n_layer + 1
    attention = np.array(result["attention_mean_over_heads"])
    assert attention.shape == (2, 8, 8)
    if run_fixture == "tiny_run":  # AR: nothing on the pixel or after it; the rest of the row is the SOS
        assert np.all(attention.reshape(2, -1)[:, t:] == 0)
        np.testing.assert_allclose(attention.reshape(2, -1).sum(-1) + np.mean(result["attention_sos"], -1), 1, rtol=1e-5)
    else:
        assert result["attention_sos"] is None
        np.testing.assert_allclose(attention.reshape(2, -1).sum(-1), 1, rtol=1e-5)

    picture = np.asarray(Image.open(digit / "inside.png"))
    assert picture.shape[0] > 400 and picture.shape[1] > 400
    assert (picture == [0, 200, 255]).all(-1).sum() > 100  # the chosen pixel is outlined in every panel


@pytest.mark.parametrize("args, message", [
    (["--pixel", "9,1"], "pixel (9, 1) is outside the 8×8 image: rows and columns run 1..8"),
    (["--pixel", "0,1"], "pixel (0, 1) is outside the 8×8 image"),
    (["--pixel", "three"], "a pixel is ROW,COL counted from 1"),
    (["--pixel", "1,2,3"], "a pixel is ROW,COL counted from 1"),
    (["--pixel", "1,1", "--step", "999"], "no checkpoint at step 999"),
    (["--pixel", "1,1", "--image", "broken.png"], "broken.png"),
    (["--pixel", "1,1", "--image", "missing.png"], "no image at"),
])
def test_inside_bad_input_gets_one_clear_line(tiny_run, digit, args, message, monkeypatch, capsys):
    if "--image" not in args:
        args = [*args, "--image", "digit.png"]
    status, _, err = igpt_here("inside", tiny_run.name, "--runs-dir", tiny_run.path.parent, *args, "--out", "bad.png",
                               cwd=digit, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and message in err
    assert not (digit / "bad.png").exists()


def test_inside_has_help(tmp_path, monkeypatch, capsys):
    status, text, _ = igpt_here("inside", "--help", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0
    assert "usage: igpt inside" in text and "--pixel ROW,COL" in text and "logit lens" in text


def test_parse_pixel_counts_from_one_at_the_top_left():
    from igpt_core.errors import IgptError
    from igpt_core.images import parse_pixel

    assert parse_pixel("1,1", 8) == (0, 0) and parse_pixel("8, 3", 8) == (7, 2) and parse_pixel(" 2; 5 ", 8) == (1, 4)
    for text in ("0,1", "9,1", "1,9", "x,y", "1", ""):
        with pytest.raises(IgptError):
            parse_pixel(text, 8)


def test_surprise_picture_runs_from_zero_to_the_pictures_most_surprising_pixel():
    from igpt_core.render import heatmap, surprise_picture

    view = np.zeros((4, 4, 3), np.uint8)
    nll = np.arange(16, dtype=np.float64).reshape(4, 4) / 4  # 0 .. 3.75 nats
    picture = surprise_picture(view, nll, pixel=1)
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert tuple(heatmap(np.array([[0.0]]), vmax=3.75)[0, 0]) in colours  # 0 nats: the dark end
    assert tuple(heatmap(np.array([[3.75]]), vmax=3.75)[0, 0]) in colours  # the maximum: the bright end
    doubled = surprise_picture(view, nll * 2, pixel=1)  # the scale follows the picture's own maximum
    assert np.array_equal(doubled[20:], picture[20:])
