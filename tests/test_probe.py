"""Tests for igpt_core.probe (linear probes) and igpt_core.training.finetune (classifier runs).

One tiny digits run (2 layers, width 32, 30 steps) is trained once per module and shared; tests
that damage files work on a copy. Everything runs offline in well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from igpt_core import probe as probe_mod
from igpt_core.data import load_dataset
from igpt_core.errors import IgptError
from igpt_core.training import classify, finetune
from igpt_core.model import IGPT
from igpt_core.probe import (ProbeTable, extract_features, feature_precision, fit_probe, fit_probes, load_probe_results,
                             probe_run, spearman)
from igpt_core.runs import open_run
from igpt_core.training import TrainConfig, start_run, train

TINY = dict(n_layer=2, n_embd=32, n_head=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def ar_run(runs_dir):
    run = start_run("tiny-ar", dataset="digits", preset_name="tiny", model_overrides=dict(TINY),
                    train_config=TrainConfig(steps=30, checkpoints=[10, 30], eval_every=10, batch_size=32),
                    runs_dir=runs_dir)
    train(run, progress=False)
    return run


@pytest.fixture(scope="module")
def table(ar_run, runs_dir):
    return probe_run("tiny-ar", runs_dir=runs_dir, progress=False)


@pytest.fixture(scope="module")
def digits_ids(ar_run):
    model, palette, _ = ar_run.load(30)
    images = load_dataset("digits", "val").images[:40]
    return model, torch.from_numpy(palette.encode(images, 8))


# -- the probe table ---------------------------------------------------------------------------------


def test_one_row_per_checkpoint_and_layer(table, ar_run):
    keys = [(r["step"], r["layer"]) for r in table.rows]
    assert sorted(keys) == [(s, layer) for s in (10, 30) for layer in range(3)]
    assert len(set(keys)) == len(keys)
    val_losses = ar_run.val_losses()
    for row in table.rows:
        assert 0 <= row["val_acc"] <= 1 and 0 <= row["test_acc"] <= 1
        assert row["C"] in probe_mod.DEFAULT_CS
        assert row["val_loss"] == pytest.approx(val_losses[row["step"]])
    assert max(r["test_acc"] for r in table.rows) > 0.4  # chance is 0.1
    assert table.note is None  # digits are already at the model's 8×8


def test_results_file_format(table, ar_run):
    stored = load_probe_results(ar_run)
    assert stored.to_dict() == json.loads((ar_run.path / "probes" / "digits.json").read_text())
    assert stored.dataset == "digits" and stored.objective == "ar" and stored.n_layer == 2
    assert stored.rows == table.rows and stored.created and stored.path == table.path
    assert load_probe_results(ar_run, "mnist") is None  # never probed on it


def test_confusion_matrices_agree_with_the_stored_accuracies(table):
    n_test = table.settings["n_test"]
    assert table.class_names == list("0123456789")
    scored = [(table.confusion(r["step"], r["layer"]), r["test_acc"]) for r in table.rows]
    scored += [(table.reference_confusion("raw_pixels"), table.references["raw_pixels"]["test_acc"])]
    scored += [(table.reference_confusion("random_init", r["layer"]), r["test_acc"])
               for r in table.references["random_init"]]
    for counts, test_acc in scored:
        assert counts.shape == (10, 10) and counts.dtype == np.int64 and counts.min() >= 0
        assert counts.sum() == n_test
        assert np.trace(counts) / counts.sum() == pytest.approx(test_acc, abs=1e-12)
    # rows are true classes: each row sums to that class's test count
    labels = load_dataset("digits", "test").labels
    np.testing.assert_array_equal(scored[0][0].sum(axis=1), np.bincount(labels, minlength=10))
    row = table.rows[-1]
    per_class = table.per_class_accuracy(row["step"], row["layer"])
    counts = table.confusion(row["step"], row["layer"])
    np.testing.assert_allclose(per_class, np.diag(counts) / counts.sum(axis=1))
    with pytest.raises(KeyError):
        table.confusion(999, 0)


def test_confusion_matrix_orders_rows_by_true_class():
    counts = probe_mod.confusion_matrix([2, 2, 0, 1], [2, 0, 0, 2], classes=[0, 1, 2])
    np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 0, 1], [1, 0, 1]])
    with pytest.raises(IgptError, match="not one of the classes"):
        probe_mod.confusion_matrix([3], [0], classes=[0, 1, 2])


def test_results_without_confusion_matrices_still_load(table, ar_run, tmp_path):
    copy = shutil.copytree(ar_run.path, tmp_path / "tiny-ar")
    path = copy / "probes" / "digits.json"
    value = json.loads(path.read_text())
    for row in value["rows"] + value["references"]["random_init"] + [value["references"]["raw_pixels"]]:
        del row["confusion"]
    del value["data_hashes"]
    path.write_text(json.dumps(value))
    old = load_probe_results(open_run("tiny-ar", tmp_path))
    assert [r["test_acc"] for r in old.rows] == [r["test_acc"] for r in table.rows]
    assert old.confusion(30, 1) is None and old.per_class_accuracy(30, 1) is None
    assert old.reference_confusion("raw_pixels") is None
    assert probe_mod.cached_features("tiny-ar", None, 30, runs_dir=tmp_path) is None  # no data hashes stored
    value["rows"][0]["confusion"] = [[1, 2], [3]]
    path.write_text(json.dumps(value))
    with pytest.raises(IgptError, match="confusion"):
        load_probe_results(open_run("tiny-ar", tmp_path))


def test_cached_features_read_back_without_the_model(table, ar_run, runs_dir, monkeypatch):
    calls = []
    original = IGPT.features
    monkeypatch.setattr(IGPT, "features", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    layers, labels = probe_mod.cached_features("tiny-ar", "digits", 30, runs_dir=runs_dir)
    assert calls == []
    test = load_dataset("digits", "test")
    np.testing.assert_array_equal(labels, test.labels)
    assert sorted(layers) == [0, 1, 2]
    model, palette, _ = ar_run.load(30)
    expected = extract_features(model, palette.encode(test.images, 8), [0, 1, 2])  # same precision as the probe
    for layer in (0, 1, 2):
        assert layers[layer].dtype == np.float32
        np.testing.assert_array_equal(layers[layer], expected[layer])
    train_layers, train_labels = probe_mod.cached_features(ar_run, None, 10, split="train", runs_dir=runs_dir)
    assert len(train_labels) == table.settings["n_train"] == len(train_layers[1])
    assert probe_mod.cached_features(ar_run, "digits", 20, runs_dir=runs_dir) is None  # no such checkpoint
    assert probe_mod.cached_features(ar_run, "mnist", 30, runs_dir=runs_dir) is None  # never probed on it


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        x, y = rng.integers(0, 5, n).astype(float), rng.normal(size=n)
        x[:2] = [0, 1]  # some spread
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman([1, 2], [2, 1]) is None  # too few points
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # no spread


def test_best_layer_rule_and_loss_accuracy_rho(tmp_path):
    def row(step, layer, val_acc, val_loss):
        return {"step": step, "layer": layer, "val_acc": val_acc, "test_acc": val_acc - 0.01, "C": 1.0,
                "val_loss": val_loss}

    rows = [row(10, 0, 0.5, 3.0), row(10, 1, 0.6, 3.0), row(10, 2, 0.6, 3.0),  # a tie: the shallower layer
            row(20, 0, 0.5, 2.0), row(20, 1, 0.8, 2.0), row(20, 2, 0.7, 2.0),
            row(30, 0, 0.6, 1.5), row(30, 1, 0.8, 1.5), row(30, 2, 0.9, 1.5)]
    table = ProbeTable("digits", rows, {}, "ar", 2, tmp_path / "digits.json")
    assert [(r["step"], r["layer"]) for r in table.best_by_step()] == [(10, 1), (20, 1), (30, 2)]
    assert (table.best()["step"], table.best()["layer"]) == (30, 2)
    assert table.loss_accuracy_rho() == pytest.approx(-1.0)  # lower loss, better best layer, every time
    rows[-1]["val_acc"] = rows[-2]["val_acc"] = rows[-3]["val_acc"] = 0.55
    assert table.loss_accuracy_rho("val_acc") == pytest.approx(spearmanr([3.0, 2.0, 1.5], [0.6, 0.8, 0.55]).statistic)


def test_references_present_and_sensible(table):
    raw = table.references["raw_pixels"]
    assert raw["test_acc"] > 0.8  # logistic regression on digit pixels is a strong baseline
    rand = table.references["random_init"]
    assert [r["layer"] for r in rand] == [0, 1, 2]
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in rand)
    assert max(r["test_acc"] for r in rand) > 0.2


def test_cached_features_are_reused(table, runs_dir, monkeypatch):
    files = sorted(p.name for p in (runs_dir / "tiny-ar" / "probes" / "features").iterdir())
    assert any(f.startswith("step_0000030-digits-train-") and f.endswith(".npz") for f in files)
    assert any(f.startswith("random_init-digits-test-") for f in files)
    calls = []
    original = IGPT.features

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IGPT, "features", counting)
    again = probe_run("tiny-ar", runs_dir=runs_dir, progress=False)
    assert calls == []
    assert again.rows == table.rows
    # A subset of what is cached needs no forward pass either, and keeps the other rows stored.
    probe_run("tiny-ar", runs_dir=runs_dir, checkpoints=[30], layers=[1], progress=False)
    assert calls == []
    assert len(load_probe_results(open_run("tiny-ar", runs_dir)).rows) == 6


def test_damaged_results_file_is_reported(ar_run, tmp_path):
    copy = shutil.copytree(ar_run.path, tmp_path / "tiny-ar")
    path = copy / "probes" / "digits.json"
    path.write_text('{"dataset": "digits", "rows": [')
    with pytest.raises(IgptError, match="digits.json"):
        load_probe_results(open_run("tiny-ar", tmp_path))
    value = {"dataset": "digits", "rows": [{"step": 30, "layer": 1, "val_acc": 3.0, "test_acc": 0.5, "C": 1.0,
                                            "val_loss": None}],
             "references": {}, "objective": "ar", "n_layer": 2}
    path.write_text(json.dumps(value))
    with pytest.raises(IgptError, match="damaged"):
        load_probe_results(open_run("tiny-ar", tmp_path))
    # Probing again replaces the damaged file (from the copied feature cache) and says so.
    again = probe_run("tiny-ar", runs_dir=tmp_path, checkpoints="last", layers=[1], progress=False)
    assert "damaged" in again.note and [(r["step"], r["layer"]) for r in again.rows] == [(30, 1)]
    assert load_probe_results(open_run("tiny-ar", tmp_path)).rows == again.rows


# -- features ----------------------------------------------------------------------------------------------


def test_layer0_features_match_a_hand_computation(digits_ids):
    model, ids = digits_ids
    feats = extract_features(model, ids, [0], precision="fp32")
    with torch.no_grad():  # the AR input: SOS, then pixels 1..T-1; the probe feature: mean of block 0's ln_1
        inputs = torch.cat([torch.full_like(ids[:, :1], model.config.sos_id), ids[:, :-1]], dim=1)
        x = model.wte(inputs) + model.wpe(torch.arange(ids.shape[1]))
        expected = model.h[0].ln_1(x).mean(dim=1).numpy()
    assert feats.shape == (1, len(ids), 32) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[0], expected, rtol=1e-5, atol=1e-6)


def test_all_layers_in_one_call_equal_per_layer_calls(digits_ids, monkeypatch):
    model, ids = digits_ids
    calls = []
    original = IGPT.features
    monkeypatch.setattr(IGPT, "features", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    together = extract_features(model, ids, [2, 0, 1], batch_size=16, precision="fp32")
    assert len(calls) == 3  # one forward pass per batch of 16 (40 images), for all three layers
    for i, layer in enumerate([2, 0, 1]):
        np.testing.assert_allclose(together[i], extract_features(model, ids, [layer], precision="fp32")[0], rtol=1e-5,
                                   atol=1e-6)


def test_bf16_features_stay_close_to_fp32(digits_ids):
    model, ids = digits_ids
    fp32 = extract_features(model, ids, [0, 1, 2], precision="fp32")
    bf16 = extract_features(model, ids, [0, 1, 2], precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # the products really ran in bf16
    cosine = (bf16 * fp32).sum(-1) / (np.linalg.norm(bf16, axis=-1) * np.linalg.norm(fp32, axis=-1))
    assert cosine.min() > 0.99
    auto = extract_features(model, ids, [0, 1, 2], precision="auto")
    np.testing.assert_array_equal(auto, fp32)  # "auto" keeps fp32 below BF16_MIN_WIDTH (this model: 32)
    assert feature_precision("auto", "cpu", 32) == "fp32" and feature_precision("bf16", "cpu", 32) == "bf16"
    with pytest.raises(IgptError, match="precision must be one of auto, fp32, bf16"):
        extract_features(model, ids, [0], precision="fp16")


def test_probe_table_records_the_precision(table, ar_run, runs_dir, tmp_path):
    # the default "auto" is a setting only where it resolves to bf16: fp32 tables made before stay valid
    assert "precision" not in table.settings  # "auto" at width 32 is fp32
    copy = shutil.copytree(ar_run.path, tmp_path / "tiny-ar")
    result = probe_run("tiny-ar", runs_dir=tmp_path, checkpoints=[30], layers=[1], references=False,
                       precision="bf16", progress=False)
    assert result.settings["precision"] == "bf16"
    fp32 = probe_run("tiny-ar", runs_dir=tmp_path, checkpoints=[30], layers=[1], references=False,
                     precision="fp32", progress=False)
    assert "precision" not in fp32.settings and "other settings" in fp32.note
    layers, _ = probe_mod.cached_features("tiny-ar", None, 30, runs_dir=tmp_path)
    model, palette, _ = ar_run.load(30)
    expected = extract_features(model, palette.encode(load_dataset("digits", "test").images, 8), [1], precision="fp32")
    np.testing.assert_array_equal(layers[1], expected[0])
    assert len(list((copy / "probes" / "features").glob("step_0000030-digits-test-*.npz"))) >= 2


def test_fit_probe_separable():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    x = rng.normal(size=(120, 5)) + 4 * np.eye(3, 5)[y]
    result = fit_probe(x[::2], y[::2], x[1::2], y[1::2], x[1::2], y[1::2], Cs=(0.1, 1.0))
    assert result["val_acc"] > 0.9 and result["test_acc"] > 0.9 and result["C"] in (0.1, 1.0)


def collinear_features(seed: int = 0) -> tuple:
    """fit_probe's arguments at the default run's sizes (digits: 1294 / 144 / 359 images, 128 dims):
    a random linear map of the pixels, so the 128 dims span only 64 and L-BFGS's path is sensitive
    to rounding (unpinned, 2 BLAS threads took one more iteration than 1 on these)."""
    proj = np.random.default_rng(seed).normal(size=(192, 128))
    out = []
    for split in ("train", "val", "test"):
        data = load_dataset("digits", split)
        out += [(data.images.reshape(len(data.images), -1) / 255.0 @ proj).astype(np.float32), data.labels]
    return tuple(out)


FIT_IN_A_PROCESS = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from igpt_core.probe import fit_probe
arrays = np.load(sys.argv[1])
result = fit_probe(*(arrays[f"a{i}"] for i in range(6)))
print(json.dumps({"blas_threads": max(pool["num_threads"] for pool in threadpool_info()), "result": result}))
"""


def test_probe_results_identical_with_1_and_2_threads(tmp_path):
    np.savez(tmp_path / "features.npz", **{f"a{i}": a for i, a in enumerate(collinear_features())})
    procs = {}
    for threads in (1, 2):
        env = dict(os.environ, **{name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                   "MKL_NUM_THREADS")})
        procs[threads] = subprocess.Popen([sys.executable, "-c", FIT_IN_A_PROCESS, str(tmp_path / "features.npz")],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for threads, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        out[threads] = json.loads(stdout)
    assert [out[t]["blas_threads"] for t in (1, 2)] == [1, 2]  # the processes really had 1 and 2 threads
    assert out[1]["result"] == out[2]["result"]  # accuracies, chosen C and every C's iteration count
    assert out[1]["result"]["test_acc"] > 0.5


def test_fits_in_worker_processes_equal_fits_in_this_one():
    arrays = collinear_features()
    jobs = [(("dims", n), tuple(a[:, :n] if a.ndim == 2 else a for a in arrays)) for n in (16, 32, 48)]
    seen = []
    here = fit_probes(jobs, Cs=(0.1, 1.0), workers=1)
    there = fit_probes(jobs, Cs=(0.1, 1.0), workers=2, on_fit=lambda key, result: seen.append(key))
    assert there == here and sorted(seen) == sorted(key for key, _ in jobs)


def test_concatenated_layers_are_probed_as_one_feature(table, ar_run, runs_dir):
    result = probe_run("tiny-ar", runs_dir=runs_dir, checkpoints=[30], layers=[1], concat=[2, 1], progress=False)
    assert [(r["step"], r["layers"]) for r in result.concat] == [(30, [1, 2])]
    stored = load_probe_results(open_run("tiny-ar", runs_dir))
    assert stored.concat == result.concat and len(stored.rows) == 6  # its own rows; the others kept
    # the same fit as fit_probe on the cached features of layers 1 and 2 side by side
    model, palette, _ = ar_run.load(30)
    splits = {}
    for split in ("train", "val", "test"):
        data = load_dataset("digits", split)
        feats = extract_features(model, palette.encode(data.images, 8), [1, 2])
        splits[split] = (np.concatenate(list(feats), axis=1), data.labels)
    expected = fit_probe(*splits["train"], *splits["val"], *splits["test"])
    row = result.concat[0]
    assert (row["val_acc"], row["test_acc"], row["C"]) == (expected["val_acc"], expected["test_acc"], expected["C"])
    with pytest.raises(IgptError, match=r"concatenated layer 3 is out of range.*0\.\.2"):
        probe_run("tiny-ar", runs_dir=runs_dir, concat=[1, 3], progress=False)
    with pytest.raises(IgptError, match="at least two different layers"):
        probe_run("tiny-ar", runs_dir=runs_dir, concat=[1, 1], progress=False)


# -- errors and notes --------------------------------------------------------------------------------------


def test_unlabelled_dataset_is_refused(ar_run, runs_dir):
    with pytest.raises(IgptError, match="has no labels"):
        probe_run("tiny-ar", "photos", runs_dir=runs_dir, progress=False)


def test_bad_checkpoint_or_layer(ar_run, runs_dir):
    with pytest.raises(IgptError, match=r"no checkpoint at step 20.*\[10, 30\]"):
        probe_run("tiny-ar", runs_dir=runs_dir, checkpoints=[20], progress=False)
    with pytest.raises(IgptError, match=r"layer 5 is out of range.*0\.\.2"):
        probe_run("tiny-ar", runs_dir=runs_dir, layers=[5], progress=False)


def test_other_resolution_is_resized_with_a_note(ar_run, runs_dir, tmp_path):
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 215)):
        (tmp_path / label).mkdir()
        for i in range(15):
            pixels = np.clip(rng.normal(level, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    result = probe_run("tiny-ar", f"folder:{tmp_path}", runs_dir=runs_dir, checkpoints=[30], layers=[1],
                       progress=False)
    assert "resized" in result.note and "32×32" in result.note and "8×8" in result.note
    assert [(r["step"], r["layer"]) for r in result.rows] == [(30, 1)]
    assert result.path.parent == ar_run.path / "probes"


# -- BERT --------------------------------------------------------------------------------------------------


def test_bert_feature_averaging(runs_dir):
    run = start_run("tiny-bert", dataset="digits", preset_name="tiny", objective="bert", model_overrides=dict(TINY),
                    train_config=TrainConfig(steps=10, checkpoints=[10], eval_every=10, batch_size=32),
                    runs_dir=runs_dir)
    train(run, progress=False)
    model, palette, _ = run.load()
    ids = torch.from_numpy(palette.encode(load_dataset("digits", "val").images[:20], 8))
    plain = extract_features(model, ids, [1, 2], bert_masks=0, precision="fp32")
    averaged = extract_features(model, ids, [1, 2], bert_masks=2, batch_size=256, precision="fp32")
    assert not np.allclose(plain, averaged)
    # Masks are seeded per image, so the batch size does not change the result.
    np.testing.assert_allclose(averaged, extract_features(model, ids, [1, 2], bert_masks=2, batch_size=7, precision="fp32"),
                               rtol=1e-5, atol=1e-6)
    result = probe_run("tiny-bert", runs_dir=runs_dir, bert_masks=2, layers=[1], max_train=300,
                       references=False, progress=False)
    assert result.objective == "bert" and result.settings["bert_masks"] == 2
    assert [(r["step"], r["layer"]) for r in result.rows] == [(10, 1)]


# -- fine-tuning -------------------------------------------------------------------------------------------


def test_finetune_and_classify(ar_run, runs_dir):
    summary = finetune("tiny-ar", runs_dir=runs_dir, steps=150, lr=3e-3, eval_every=10, progress=False)
    assert summary["run"] == "tiny-ar-ft-digits" and summary["augment"] is False
    assert summary["test_acc"] > 0.5  # chance is 0.1
    run = open_run("tiny-ar-ft-digits", runs_dir)
    info = run.info
    assert info["kind"] == "classifier" and info["base_run"] == "tiny-ar" and info["classes"] == list("0123456789")
    assert info["test_acc"] == summary["test_acc"] and info["train_config"]["lr"] == 3e-3
    assert run.checkpoints() == [summary["best_step"]]
    assert (run.path / "head.safetensors").is_file()
    rows = run.metrics()
    assert {"step", "loss", "clf_loss", "gen_loss"} <= set(rows[1]) and any("val_acc" in r for r in rows)
    model, _, _ = run.load()  # the backbone is a normal checkpoint
    assert model.config.n_layer == 2

    train_images = load_dataset("digits", "train")
    hits = 0
    for image, label in zip(train_images.images[:10], train_images.labels[:10]):
        probs = classify("tiny-ar-ft-digits", image, runs_dir=runs_dir)
        assert sum(p for _, p in probs) == pytest.approx(1.0, abs=1e-5)
        assert [p for _, p in probs] == sorted((p for _, p in probs), reverse=True)
        hits += probs[0][0] == str(label)
    assert hits >= 5

    with pytest.raises(IgptError, match="igpt finetune"):
        classify("tiny-ar", train_images.images[0], runs_dir=runs_dir)
    with pytest.raises(IgptError, match="already exists"):
        finetune("tiny-ar", runs_dir=runs_dir, steps=1, progress=False)
