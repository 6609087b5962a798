"""igpt_core.analysis: CKA's defining properties, per-class accuracy, projections, and reading a run's
cached probe features back (written here in the stored formats)."""

import json
from pathlib import Path

import numpy as np
import pytest

from igpt_core import analysis
from igpt_core.analysis import cka_matrix, cka_over_training, linear_cka, pca_2d, pca_over_training, per_class_accuracy
from igpt_core.probe.cache import FeatureCache, checkpoint_key
from igpt_core.runs import Run


def _direct_unbiased_cka(x, y):
    """Song et al. (2012)'s unbiased HSIC written with n × n kernel matrices, term by term."""
    def hsic(k, l):
        n = k.shape[0]
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        ones = np.ones(n)
        return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_cka_of_a_representation_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(200, 30))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20))
    y = x @ rng.normal(size=(20, 12)) + 0.5 * rng.normal(size=(300, 12))
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    base = linear_cka(x, y)
    assert linear_cka(x, 7.5 * y @ rotation) == pytest.approx(base, abs=1e-10)
    assert linear_cka(0.01 * x, y) == pytest.approx(base, abs=1e-10)
    # ...but not to an anisotropic stretch, which changes what "similar" means
    assert abs(linear_cka(x, y * np.linspace(0.1, 10, 12)) - base) > 1e-3


def test_cka_of_independent_features_is_near_zero_at_large_n():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5000, 16)), rng.normal(size=(5000, 16))
    assert abs(linear_cka(x, y)) < 0.01
    assert linear_cka(x[:50], y[:50]) < 0.3  # the unbiased estimator: small samples are not inflated towards 1


def test_cka_equals_the_direct_formula_on_small_inputs():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 7))
    y[:, :3] += x[:, :3]
    assert linear_cka(x, y) == pytest.approx(_direct_unbiased_cka(x, y), rel=1e-10)


def test_minibatch_cka_averages_hsic_and_stays_close_to_the_full_estimate():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 10))
    y = x @ rng.normal(size=(10, 10)) + rng.normal(size=(2000, 10))
    assert linear_cka(x, y, batch_size=500) == pytest.approx(linear_cka(x, y), abs=0.02)
    assert linear_cka(x, x, batch_size=333) == pytest.approx(1.0, abs=1e-12)  # a 2-image sliver is left out


def test_cka_rejects_mismatched_or_tiny_inputs():
    with pytest.raises(ValueError, match="same images"):
        linear_cka(np.zeros((10, 2)), np.zeros((11, 2)))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(np.ones((3, 2)), np.ones((3, 2)))


def test_cka_matrices_within_a_checkpoint_and_over_training():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(100, 8))
    layers = {0: base, 1: base @ rng.normal(size=(8, 8)), 2: rng.normal(size=(100, 8))}
    m = cka_matrix(layers)
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] > 0.5 > abs(m[0, 2])
    over = cka_over_training({10: {0: layers[2], 1: layers[1]}, 20: {0: layers[0], 1: layers[1]}})
    assert over.shape == (2, 2) and np.allclose(over[:, 1], 1)  # the last checkpoint against itself
    assert over[1, 0] == pytest.approx(1.0) and abs(over[0, 0]) < 0.5  # layer 1 settled, layer 0 changed


def test_per_class_accuracy_from_a_confusion_matrix():
    confusion = np.array([[8, 2, 0], [1, 1, 0], [0, 0, 0]])
    acc = per_class_accuracy(confusion)
    assert acc[:2] == pytest.approx([0.8, 0.5]) and np.isnan(acc[2])


def test_pca_keeps_the_largest_variance_and_frames_do_not_flip():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 5)) * np.array([10, 3, 1, 0.1, 0.1])
    coords, variance = pca_2d(x)
    assert coords.shape == (400, 2) and variance[0] > variance[1] > 0
    assert np.std(coords[:, 0]) == pytest.approx(np.std(x[:, 0]), rel=0.05)
    frames = pca_over_training({1: x, 2: -x, 3: x * 1.01})  # a sign flip between checkpoints is undone
    assert np.allclose(frames[2], frames[1]) and np.allclose(frames[3], frames[1] * 1.01)


def test_cka_matrix_summaries_agree_with_pairwise_cka_on_both_paths():
    rng = np.random.default_rng(7)
    for n in (60, analysis.GRAM_IMAGES + 5):  # Gram matrices, then features pair by pair
        base = rng.normal(size=(n, 6))
        layers = {0: base, 1: base @ rng.normal(size=(6, 4)) + rng.normal(size=(n, 4)), 2: rng.normal(size=(n, 3))}
        pairwise = [[linear_cka(layers[a], layers[b]) for b in range(3)] for a in range(3)]
        assert cka_matrix(layers) == pytest.approx(np.array(pairwise), abs=1e-9)
        other = {5: layers[1], 6: layers[2]}
        assert cka_matrix(layers, other) == pytest.approx(np.array(pairwise)[:, 1:], abs=1e-9)


def test_evenly_spaced_keeps_first_and_last_and_all_when_few():
    assert analysis.evenly_spaced(5, None).tolist() == [0, 1, 2, 3, 4]
    assert analysis.evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert analysis.evenly_spaced(101, 5).tolist() == [0, 25, 50, 75, 100]


# -- a run's cached features, written by hand in the stored formats -------------------------------------------

CLASSES = [f"class {i}" for i in range(4)]


def layer_features(step: int, n_layer: int, n: int = 40, width: int = 6) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Features that change with training: deeper layers and later checkpoints separate the classes more."""
    rng = np.random.default_rng(step)
    labels = np.arange(n) % len(CLASSES)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), width))
    return {layer: (rng.normal(size=(n, width)) + (layer + 1) * np.log10(step) * centres[labels] / 4).astype(np.float32)
            for layer in range(n_layer + 1)}, labels


def write_cached_run(runs_dir: Path, name: str, steps, cached, n_layer: int = 3) -> dict:
    """A run with checkpoint files, a probe table (with confusion matrices and class names) at `steps`, and
    features cached for the steps in `cached`, as `probe_run` leaves them. Returns {step: features}."""
    path = runs_dir / name
    (path / "checkpoints").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({
        "format": 1, "name": name, "dataset": "digits", "preset": "tiny",
        "model_config": {"n_layer": n_layer, "n_embd": 6, "n_head": 2, "vocab_size": 17, "n_positions": 64,
                         "objective": "ar"}, "train_config": {"seed": 0, "steps": max(steps)}}))
    rows = []
    for i, step in enumerate(steps):
        (path / "checkpoints" / f"step_{step:07d}.safetensors").write_bytes(b"not read by the analyses")
        for layer in range(n_layer + 1):
            right = [min(10, 3 + i + layer + t) for t in range(4)]  # of 10 test images per class
            confusion = [[right[t] if c == t else (10 - right[t] if c == (t + 1) % 4 else 0) for c in range(4)]
                         for t in range(4)]
            rows.append({"step": step, "val_loss": 2.0 - 0.1 * i, "layer": layer, "C": 1.0,
                         "val_acc": round(0.3 + 0.05 * i + 0.04 * layer - 0.03 * (layer == n_layer), 4),
                         "test_acc": round(0.25 + 0.05 * i + 0.05 * layer, 4), "confusion": confusion})
    table = {"format": 1, "dataset": "digits", "objective": "ar", "n_layer": n_layer, "created": "2026-01-01",
             "settings": {"classes": CLASSES, "seed": 0, "bert_masks": 0}, "rows": rows,
             "references": {"raw_pixels": None, "random_init": []}, "data_hashes": {"test": "testhash"}}
    (path / "probes").mkdir()
    (path / "probes" / "digits.json").write_text(json.dumps(table))
    run = Run(path)
    written = {}
    for step in cached:
        features, labels = layer_features(step, n_layer)
        FeatureCache(run, f"step_{step:07d}", checkpoint_key(run, step), "digits", 0, 0).write(
            "test", "testhash", features, labels)
        written[step] = features
    return written


BIG_STEPS = (131_000, 262_000, 524_000, 1_000_000)  # steps like those of OpenAI's imported checkpoints


def test_a_runs_cached_features_read_back_subsampled_and_by_layer(tmp_path):
    written = write_cached_run(tmp_path, "big", BIG_STEPS, cached=BIG_STEPS[1:])
    assert analysis.probed_steps("big", runs_dir=tmp_path) == list(BIG_STEPS)
    assert analysis.probed_features("big", BIG_STEPS[0], runs_dir=tmp_path) is None  # not cached
    found = analysis.probed_features("big", 262_000, layers=[2], max_images=10, runs_dir=tmp_path)
    assert list(found.features) == [2] and found.images.tolist() == analysis.evenly_spaced(40, 10).tolist()
    assert np.array_equal(found.features[2], written[262_000][2][found.images])
    assert found.labels.tolist() == (found.images % 4).tolist()
    assert analysis.probed_features("big", 262_000, layers=[2, 7], runs_dir=tmp_path) is None  # no layer 7
    over = analysis.layer_over_training("big", 1, runs_dir=tmp_path)
    assert over.missing == [131_000] and list(over.by_step) == list(BIG_STEPS[1:])
    assert all(np.array_equal(over.by_step[s], written[s][1]) for s in BIG_STEPS[1:])


def test_cka_over_training_of_a_run_equals_the_in_memory_computation(tmp_path):
    written = write_cached_run(tmp_path, "big", BIG_STEPS, cached=BIG_STEPS[:1] + BIG_STEPS[2:])
    result = analysis.run_cka_over_training("big", runs_dir=tmp_path)
    assert result.steps == [131_000, 524_000, 1_000_000] and result.missing == [262_000]
    assert result.reference == 1_000_000 and result.layers == [0, 1, 2, 3]
    assert result.values == pytest.approx(cka_over_training(written), abs=1e-12)
    assert np.allclose(result.values[:, -1], 1) and (result.values[:, 0] < 1).all()
    none = analysis.run_cka_over_training("big", "mnist", runs_dir=tmp_path)  # never probed on it
    assert none.steps == [] and none.reference is None and none.values.size == 0
