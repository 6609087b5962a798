"""Tests for igpt_core.pretrained.hf: Hugging Face ImageGPT import/export, checked against transformers itself.

Everything is offline: HF models are built with random weights from an ImageGPTConfig and saved
with save_pretrained into tmp folders; the hub is replaced by fakes (an autouse fixture makes any
unplanned hub call fail).
"""

from __future__ import annotations

import json
import os

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import randomize
from safetensors.torch import save_file

from igpt_core.decoder import Decoder
from igpt_core.errors import CheckpointError, RunError
from igpt_core.model import IGPT, ModelConfig
from igpt_core.palette import Palette
from igpt_core.pretrained import hf
from igpt_core.pretrained.labels import imported_label, short_count
from igpt_core.runs import create_run, open_run, save_checkpoint

from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessorPil

SHAPES = [  # small but varied: depth, width, heads, palette size, resolution, the one allowed HF option
    dict(n_layer=2, n_embd=32, n_head=2, vocab_size=17, n_positions=16),
    dict(n_layer=3, n_embd=48, n_head=4, vocab_size=513, n_positions=64),
    dict(n_layer=2, n_embd=48, n_head=2, vocab_size=17, n_positions=64, layer_norm_epsilon=1e-6,
         reorder_and_upcast_attn=True),
]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the Hugging Face hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def hf_model(seed: int = 0, **shape) -> ImageGPTForCausalImageModeling:
    return randomize(ImageGPTForCausalImageModeling(ImageGPTConfig(**shape)), seed, std=0.2)


def random_clusters(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


def save_hf_folder(model, folder, clusters=None, seed: int = 0):
    """A folder as HF users have them: save_pretrained for the model and for the processor."""
    model.save_pretrained(folder)
    cfg = model.config
    clusters = random_clusters(cfg.vocab_size - 1, seed) if clusters is None else clusters
    side = int(round(cfg.n_positions ** 0.5))
    ImageGPTImageProcessorPil(clusters=clusters, size={"height": side, "width": side}).save_pretrained(folder)
    return clusters


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """HF logits aligned with ours: HF reads raw ids, so feed [SOS, x_1..x_{T-1}]."""
    sos = torch.full_like(ids[:, :1], model.config.vocab_size - 1)
    with torch.no_grad():
        return model(torch.cat([sos, ids[:, :-1]], dim=1), use_cache=False).logits


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "513-colours", "upcast-eps"])
def test_import_gives_hf_logits_with_and_without_cache(tmp_path, shape):
    theirs = hf_model(seed=1, **shape)
    clusters = save_hf_folder(theirs, tmp_path / "hf")
    run = hf.import_hf(str(tmp_path / "hf"), "imported", tmp_path / "runs", progress=False)

    assert run.checkpoints() == [0]
    assert run.info["dataset"] == f"imported:{tmp_path / 'hf'}" and run.info["preset"] is None
    source = str(tmp_path / "hf")
    assert run.info["imported"] == {"source": "hf", "model": source, "from": source}
    ours, palette, info = open_run("imported", tmp_path / "runs").load()
    assert info["step"] == 0
    assert imported_label(run) == f"{source} · pre-trained (imported) · {short_count(ours.num_parameters())}"
    np.testing.assert_array_equal(palette.clusters, clusters)
    assert palette == run.palette

    T = shape["n_positions"]
    ids = torch.randint(0, shape["vocab_size"] - 1, (3, T), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(theirs, ids)
    with torch.no_grad():
        close(ours(ids)[0], expected)

        # the decoder (KV cache, folded weights): a prompt chunk [SOS, x1..x3] first, then one pixel at a time
        decoder = Decoder(ours, len(ids))
        sos = torch.full_like(ids[:, :1], ours.config.sos_id)
        close(decoder.feed(torch.cat([sos, ids[:, :3]], dim=1)), expected[:, 3])
        for t in range(4, T):
            close(decoder.feed(ids[:, t - 1 : t]), expected[:, t])


def test_weight_files_other_than_model_safetensors(tmp_path):
    """pytorch_model.bin (with the causal-mask buffers old checkpoints hold) and a sharded safetensors."""
    shape = SHAPES[0]
    theirs = hf_model(seed=3, **shape)
    save_hf_folder(theirs, tmp_path / "ref")
    reference = hf.import_hf(str(tmp_path / "ref"), "ref", tmp_path / "runs", progress=False).load()[0].state_dict()
    state = {k: v.clone() for k, v in theirs.state_dict().items()}

    pickle_dir, shard_dir = tmp_path / "bin", tmp_path / "sharded"
    for folder in (pickle_dir, shard_dir):
        save_hf_folder(theirs, folder)
        (folder / "model.safetensors").unlink()
    n = shape["n_positions"]
    old = dict(state)
    for i in range(shape["n_layer"]):
        old[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        old[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(old, pickle_dir / "pytorch_model.bin")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(shard_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for folder in (pickle_dir, shard_dir):
        model = hf.import_hf(str(folder), folder.name, tmp_path / "runs", progress=False).load()[0]
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], atol=0, rtol=0)


def make_run(runs_dir, name="mine", objective="ar", seed=4):
    config = ModelConfig(vocab_size=17, n_positions=64, n_layer=2, n_head=4, n_embd=32, objective=objective)
    model = IGPT(config)
    randomize(model, seed, std=0.2)
    palette = Palette(random_clusters(16, seed))
    info = {"dataset": "test", "preset": None, "model_config": config.to_dict(), "train_config": None, "classes": None}
    run = create_run(runs_dir, name, info, palette)
    save_checkpoint(run.checkpoint_path(5), model, palette, step=5)
    return run, model, palette


def test_export_loads_in_transformers_with_same_logits_and_ids(tmp_path):
    run, ours, palette = make_run(tmp_path / "runs")
    out = hf.export_hf("mine", tmp_path / "export", tmp_path / "runs")

    theirs, loading = ImageGPTForCausalImageModeling.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensors
    theirs.eval()
    ids = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        close(ours(ids)[0], hf_logits(theirs, ids))

    processor = ImageGPTImageProcessorPil.from_pretrained(out)
    images = np.random.default_rng(6).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    hf_ids = processor(images=list(images), return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(hf_ids, palette.encode(images, 8))

    # and back again: importing the export gives the run's weights
    back = hf.import_hf(str(out), "back", tmp_path / "runs", progress=False).load()[0].state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back[name], tensor, atol=0, rtol=0)


def test_export_replaces_only_its_own_output(tmp_path):
    make_run(tmp_path / "runs")
    out = hf.export_hf("mine", tmp_path / "export", tmp_path / "runs", step=5)
    assert json.loads((out / hf.EXPORT_MARKER).read_text())["step"] == 5
    assert hf.export_hf("mine", out, tmp_path / "runs") == out  # an earlier export: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "runs"]  # no temp folders left

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an earlier igpt export"):
        hf.export_hf("mine", tmp_path / "other", tmp_path / "runs")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_bert_export_refused(tmp_path):
    make_run(tmp_path / "runs", "masked", objective="bert")
    with pytest.raises(CheckpointError, match="BERT.*only AR runs"):
        hf.export_hf("masked", tmp_path / "export", tmp_path / "runs")
    assert not (tmp_path / "export").exists()


def test_hub_id_download_and_failures(tmp_path, monkeypatch):
    save_hf_folder(hf_model(**SHAPES[0]), tmp_path / "snapshot")
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    run = hf.import_hf("someone/imagegpt-tiny", "hub", tmp_path / "runs", progress=False)
    assert calls == ["someone/imagegpt-tiny"] and run.info["source"] == "someone/imagegpt-tiny"

    def unreachable(repo_id, **kwargs):
        raise OSError("Connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError, match="not found or the hub is unreachable.*save_pretrained"):
        hf.import_hf("openai/imagegpt-small", "x", tmp_path / "runs", progress=False)
    # neither a folder nor a hub id: refused without asking the hub
    with pytest.raises(CheckpointError, match="no folder.*not a hub id"):
        hf.import_hf(str(tmp_path / "missing" / "deep" / "folder"), "x", tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "x").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_import_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs = hf_model(**SHAPES[0])
    folder = tmp_path / "hf"
    save_hf_folder(theirs, folder)
    runs = tmp_path / "runs"

    hf.import_hf(str(folder), "taken", runs, progress=False)
    with pytest.raises(RunError, match="already exists"):
        hf.import_hf(str(folder), "taken", runs, progress=False)
    hf.import_hf(str(folder), "taken", runs, overwrite=True, progress=False)

    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "clusters": None}))
    with pytest.raises(CheckpointError, match="no 'clusters'"):
        hf.import_hf(str(folder), "no-clusters", runs, progress=False)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json is missing"):
        hf.import_hf(str(folder), "no-processor", runs, progress=False)
    assert not (runs / "no-clusters").exists() and not (runs / "no-processor").exists()

    evil = tmp_path / "evil"  # a pickle that would run code if loaded without weights_only
    save_hf_folder(theirs, evil)
    (evil / "model.safetensors").unlink()
    torch.save({"x": Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin could not be read"):
        hf.import_hf(str(evil), "evil", runs, progress=False)
    assert not (tmp_path / "pwned").exists()

    config = ModelConfig(vocab_size=17, n_positions=16, n_layer=2, n_head=2, n_embd=32)
    state = dict(theirs.state_dict())
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \[32, 100\].*\[32, 128\]"):
        hf.state_dict_from_hf(state, config)
    del state["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lacks lm_head.weight"):
        hf.state_dict_from_hf(state, config)


BASE = dict(model_type="imagegpt", vocab_size=17, n_positions=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("setting", [
    dict(activation_function="gelu"),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(add_cross_attention=True),
    dict(n_inner=100),
    dict(tie_word_embeddings=True),
    dict(scale_attn_weights=False),
    dict(model_type="gpt2"),
    dict(n_positions=15),  # not a square image
])
def test_unsupported_configs_refused(setting):
    key = next(iter(setting))
    with pytest.raises(CheckpointError, match=key if key != "n_positions" else "square"):
        hf.config_from_hf({**BASE, **setting})


def test_config_defaults_follow_imagegpt():
    assert hf.config_from_hf({"model_type": "imagegpt"}) == ModelConfig()  # iGPT-S's shape, 513 ids, 32²
    accepted = hf.config_from_hf({**BASE, "reorder_and_upcast_attn": True, "n_inner": 128,
                                  "layer_norm_epsilon": 1e-6})
    assert accepted == ModelConfig(vocab_size=17, n_positions=16, n_layer=2, n_head=2, n_embd=32,
                                   layer_norm_epsilon=1e-6)
