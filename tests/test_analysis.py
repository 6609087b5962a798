"""igpt_core.analysis: CKA's defining properties, per-class accuracy, projections."""

import numpy as np
import pytest

from igpt_core.analysis import cka_matrix, cka_over_training, linear_cka, pca_2d, pca_over_training, per_class_accuracy


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
