"""`make figures` (scripts/figures.py) trains its runs offline and draws every picture small enough
to commit: here at --tiny sizes, into tmp_path."""

from __future__ import annotations

from PIL import Image

import figures

PICTURES = ["completions_digits.png", "completions_photos.png", "inside.png", "probe.png"]


def test_figures_trains_and_draws_every_picture_under_the_size_limit(tmp_path):
    out, runs = tmp_path / "images", tmp_path / "runs"
    figures.main(["--tiny", "--out", str(out), "--runs-dir", str(runs)])
    assert sorted(path.name for path in out.iterdir()) == sorted(PICTURES)
    for name in PICTURES:
        path = out / name
        assert path.stat().st_size <= figures.MAX_BYTES, name
        with Image.open(path) as image:
            image.verify()  # a whole, readable PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 100, (name, image.size)
    assert {"digits", "photos"} <= {path.name for path in runs.iterdir()}
    assert (runs / "digits" / "probes" / "digits.json").exists(), "the digits run was probed"
    # A second call keeps the runs (--skip-existing) and only redraws.
    stamp = (runs / "digits" / "run.json").stat().st_mtime_ns
    figures.main(["--tiny", "--out", str(out), "--runs-dir", str(runs)])
    assert (runs / "digits" / "run.json").stat().st_mtime_ns == stamp
