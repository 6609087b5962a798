"""Palette: exact nearest-colour ids (same as Hugging Face's processor), round trips, image inputs."""

import numpy as np
import pytest
from PIL import Image

from igpt_core.errors import IgptError, ImageError
from igpt_core.images import center_box, crop, load_image, painted_cells, resize, square_from_drag, to_rgb
from igpt_core.palette import Palette


@pytest.mark.parametrize("k", [16, 512])
def test_ids_equal_hugging_face_processor(k):
    from transformers import ImageGPTImageProcessorPil

    rng = np.random.default_rng(k)
    clusters = rng.uniform(-1, 1, (k, 3)).astype(np.float32)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    processor = ImageGPTImageProcessorPil(clusters=clusters, size={"height": 32, "width": 32})
    expected = np.array(processor(list(images), return_tensors="np")["input_ids"])
    assert np.array_equal(Palette(clusters).encode(images, 32), expected)
    # and with a resize on the way (HF: PIL bilinear)
    big = rng.integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    expected = np.array(processor(list(big), return_tensors="np")["input_ids"])
    assert np.array_equal(Palette(clusters).encode(big, 32), expected)


def test_quantize_is_nearest_colour_by_brute_force():
    rng = np.random.default_rng(1)
    palette = Palette(rng.uniform(-1, 1, (40, 3)))
    pixels = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    x = pixels / 127.5 - 1
    brute = ((x[:, None] - palette.clusters[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    assert np.array_equal(palette.quantize(pixels), brute)
    assert np.array_equal(palette.quantize(pixels), brute)  # second call: from the remembered table


def test_fit_finds_the_colours_of_a_few_colour_image_and_round_trips():
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [250, 250, 250]], np.uint8)
    rng = np.random.default_rng(0)
    image = colours[rng.integers(0, 4, (16, 16))]
    palette = Palette.fit(image[None], k=8)
    assert len(palette) == 8
    ids = palette.quantize(image)
    assert np.array_equal(palette.dequantize(ids), image)  # exact: the colours are in the palette


def test_fit_kmeans_on_many_colours_reduces_error():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    small, large = Palette.fit(images, 4), Palette.fit(images, 64)
    err = lambda p: np.abs(p.dequantize(p.quantize(images)).astype(int) - images).mean()  # noqa: E731
    assert err(large) < err(small) < 128


def test_save_load(tmp_path):
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (10, 3)))
    palette.save(tmp_path / "p.json")
    assert Palette.load(tmp_path / "p.json") == palette
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(IgptError, match="not valid"):
        Palette.load(tmp_path / "bad.json")


def test_decode_rejects_ids_outside_the_palette():
    with pytest.raises(IgptError, match="0..9"):
        Palette(np.zeros((10, 3))).dequantize(np.array([3, 10]))


def test_to_rgb_accepts_grey_rgba_float_and_16_bit():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb(grey).shape == (3, 4, 3) and (to_rgb(grey)[..., 1] == grey).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    assert (to_rgb(rgba) == [200, 0, 0]).all()  # alpha dropped
    assert to_rgb(np.ones((2, 2, 3)) * 0.5).max() == 128
    assert to_rgb(np.full((2, 2), 65535, np.uint16)).max() == 255
    with pytest.raises(ImageError, match="shape"):
        to_rgb(np.zeros((2, 2, 5)))
    with pytest.raises(ImageError, match="float"):
        to_rgb(np.full((2, 2, 3), 3.0))


def test_load_image_modes_and_bad_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "g16.png")
    for name in ("c.jpg", "p.png", "g16.png"):
        assert load_image(tmp_path / name).dtype == np.uint8
    assert load_image(tmp_path / "g16.png").max() == 40000 * 255 // 65535
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    for name, message in [("empty.png", "empty"), ("text.png", "not an image"), ("cut.png", "truncated"),
                          ("missing.png", "no image at")]:
        with pytest.raises(ImageError, match=message):
            load_image(tmp_path / name)


def test_view_is_resize_then_nearest_colours():
    rng = np.random.default_rng(5)
    palette = Palette(rng.uniform(-1, 1, (16, 3)))
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    small, ids, view = palette.view(image, 8)
    assert np.array_equal(small, resize(image, 8)) and ids.shape == (64,)
    assert np.array_equal(ids, palette.encode(image[None], 8)[0])
    assert np.array_equal(view, palette.colors[ids].reshape(8, 8, 3))


def test_square_from_drag_keeps_the_start_corner_and_stays_inside():
    h, w = 200, 300
    assert square_from_drag(h, w, (40, 30), (150, 95)) == (40, 30, 110)  # the longer side of the drag
    assert square_from_drag(h, w, (280, 150), (120, 250)) == (230, 150, 50)  # leftwards, stopped by the bottom
    assert square_from_drag(h, w, (100, 100), (90, 20)) == (20, 20, 80)  # up and left
    assert square_from_drag(h, w, (-20, 10), (500, 400)) == (0, 10, 190)  # from outside: clamped to the picture
    assert square_from_drag(h, w, (5, 5), (5, 5))[2] == 1  # a click is one pixel, never empty


def test_crop_and_its_checks():
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    assert np.array_equal(crop(image, None), image[:, 2:8]) and center_box(6, 10) == (2, 0, 6)
    assert np.array_equal(crop(image, (7, 1, 3)), image[1:4, 7:10])
    for box in [(8, 0, 3), (0, 0, 0), (-1, 0, 2), (0, 4, 3)]:
        with pytest.raises(ImageError, match="does not fit in the 10×6 picture"):
            crop(image, box)


def test_painted_cells():
    assert painted_cells(None, 8) is None and painted_cells(np.zeros((64, 64), bool), 8) is None
    mask = np.zeros((64, 64), bool)
    mask[8:16, 0:24] = True  # exactly model pixels (1, 0..2) at 8 screen pixels a model pixel
    expected = np.zeros((8, 8), bool)
    expected[1, 0:3] = True
    assert np.array_equal(painted_cells(mask, 8), expected)
    thin = np.zeros((64, 64), bool)
    thin[20, :] = True  # thinner than a quarter of a pixel everywhere: still counts
    assert painted_cells(thin, 8)[2].all() and painted_cells(thin, 8).sum() == 8


def exact_nearest(clusters, pixels):
    """Brute force over every centre, float64 differences: the ids quantize must give."""
    x = pixels.reshape(-1, 3) / 127.5 - 1
    centers = np.asarray(clusters, np.float64)[None]
    return np.concatenate([np.square(chunk[:, None] - centers).sum(-1).argmin(1) for chunk in np.split(x, range(0, len(x), 2048))])


def test_new_then_remembered_colours_of_photos_equal_hugging_face():
    from transformers import ImageGPTImageProcessorPil

    from igpt_core.data import load_dataset

    crops = load_dataset("photos", "train").images
    clusters = Palette.fit(crops[:200], 64).clusters  # a palette fitted to such photos, as in a real run
    processor = ImageGPTImageProcessorPil(clusters=clusters, size={"height": 32, "width": 32})
    palette = Palette(clusters)
    for images in (crops[200:260], crops[230:290]):  # new colours, then half remembered and half new
        expected = np.array(processor(list(images), return_tensors="np")["input_ids"])
        assert np.array_equal(palette.encode(images, 32), expected)


def test_near_ties_and_exact_ties_get_the_exact_nearest_centre():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 3), dtype=np.uint8)
    x = pixels / 127.5 - 1
    # around each pixel, two centres at distances that differ by ~1e-7: below float32's resolution
    direction = rng.normal(size=(300, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = rng.uniform(0.01, 0.05, (300, 1))
    near_pairs = np.concatenate([x + radius * direction, x - radius * (1 + 1e-7) * direction]).astype(np.float32)
    clusters = np.concatenate([rng.uniform(-1, 1, (40, 3)), near_pairs, near_pairs[:50]])  # and exact duplicates
    palette = Palette(clusters)
    truth = exact_nearest(palette.clusters, pixels)
    assert np.array_equal(palette.quantize(pixels), truth)
    assert np.array_equal(palette.quantize(pixels), truth)  # again, from the table
    # the case is adversarial: float32 distances, as Hugging Face computes them, get some of these wrong
    x32, c32 = x.astype(np.float32), palette.clusters
    float32 = ((x32**2).sum(1)[:, None] - 2 * x32 @ c32.T + (c32**2).sum(1)[None]).argmin(1)
    assert (float32 != truth).any()
    # exact ties go to the lower id: a centre and its copy; pixel 0 (-1 in each channel) halfway between two
    copies = Palette(np.array([[0.5, 0, 0], [-1, -1, -1], [0, 0, 0], [0, 0, 0], [-0.5, 0, 0]]))
    assert copies.quantize(np.array([[127, 128, 128]], np.uint8))[0] == 2
    halfway = Palette(np.array([[0.9, 0.9, 0.9], [-0.5, -1, -1], [-1, -1, -1.5], [-1.5, -1, -1]]))
    assert halfway.quantize(np.zeros((1, 3), np.uint8))[0] == 1


def test_colours_on_the_search_cells_boundaries_are_exact():
    # the first and last values of cells of 4, 16 and 64 values (see palette.CELLS), and a few others
    rng = np.random.default_rng(5)
    clusters = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    values = np.unique(np.r_[0, 3, 4, 15, 16, 63, 64, 127, 128, 191, 192, 251, 252, 255, rng.integers(0, 256, 16)])
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)
    assert np.array_equal(Palette(clusters).quantize(grid), exact_nearest(clusters, grid))


def test_every_colour_of_a_met_cell_is_exact():
    # meeting one colour answers its whole cell of 4 x 4 x 4 colours (palette.CELLS[-1] = 2 bits):
    # those answers, given later from the table, must be exact too
    rng = np.random.default_rng(7)
    for clusters in (rng.uniform(-1, 1, (512, 3)), rng.normal(0, 0.3, (256, 3)).clip(-1, 1)):
        palette = Palette(clusters)
        met = rng.integers(0, 256, (200, 3), dtype=np.uint8)
        palette.quantize(met)
        filled = np.count_nonzero(palette._table)
        inside = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
        cells = ((met[:, None] >> 2 << 2) + inside[None]).reshape(-1, 3).astype(np.uint8)
        assert np.array_equal(palette.quantize(cells), exact_nearest(palette.clusters, cells))
        assert np.count_nonzero(palette._table) == filled  # all from the table: nothing new was computed
