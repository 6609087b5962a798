"""Hugging Face ImageGPT <-> igpt runs: import OpenAI's released weights, export our AR models.

Hugging Face's `ImageGPTForCausalImageModeling` is OpenAI's iGPT block exactly (docs/design.md §3), so
conversion is renaming and transposing, nothing else:

- names: ours are HF's without the `transformer.` prefix (`lm_head.weight` has none in either);
- HF's Conv1D layers (c_attn, c_proj, c_fc) store weights (in, out); our nn.Linear stores (out, in);
- old HF checkpoints also hold `h.{i}.attn.bias` / `h.{i}.attn.masked_bias`: causal-mask buffers,
  not parameters (unlike `h.{i}.attn.c_attn.bias`), so they are dropped.

The SOS token is the same in both (id vocab_size - 1); only the calling convention differs: HF's
model reads raw ids, so HF([SOS, x1..x_{T-1}]) gives the logits of our model(x1..xT).

Imported runs hold one checkpoint, at step 0 (no igpt training happened). transformers itself is
never imported here: config.json and preprocessor_config.json are plain JSON.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, IgptError, RunError, first_line
from ..files import atomic_write_json, building_folder
from ..model import IGPT, ModelConfig
from ..palette import Palette
from ..runs import Run, create_run, list_runs, open_run, runs_root, save_checkpoint
from .labels import imported_record, openai_model_name

_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # not attn.c_attn.bias: that is a parameter
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
EXPORT_MARKER = "igpt_export.json"  # lets export_hf replace its own earlier output, and nothing else
_FOLDER_HINT = "a local folder saved with save_pretrained (config.json, model.safetensors or pytorch_model.bin, " \
               "preprocessor_config.json with the clusters)"


# -- state dicts and configs ------------------------------------------------------------------------


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no init cost even for iGPT-L
        return {k: v.shape for k, v in IGPT(config).state_dict().items()}


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF ImageGPTForCausalImageModeling names/layout -> ours (float32), checked against `config`."""
    state, hf = {}, {}  # hf: our name -> the name in the file, for messages
    for hf_name, tensor in hf_state.items():
        name = hf_name.removeprefix("transformer.")
        if _MASK_BUFFER.search(name):
            continue
        hf[name] = hf_name
        tensor = tensor.to(torch.float32)
        state[name] = tensor.t().contiguous() if _CONV1D.search(name) and tensor.ndim == 2 else tensor
    expected = _expected_shapes(config)

    def hf_shape(name):  # report shapes in the file's own layout, which is what the user can inspect
        shape = list(expected[name])
        return shape[::-1] if _CONV1D.search(name) else shape

    missing = [name for name in expected if name not in state]
    if missing:
        hf.update({name: ("" if name == "lm_head.weight" else "transformer.") + name for name in missing})
        hint = (" — only ImageGPTForCausalImageModeling checkpoints have the output head (not ImageGPTModel "
                "or ImageGPTForImageClassification)" if "lm_head.weight" in missing else "")
        raise CheckpointError(f"the checkpoint lacks {hf[missing[0]]} ({len(missing)} tensors missing){hint}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"the checkpoint holds tensors an iGPT model does not have, e.g. {hf[unexpected[0]]!r} "
                              f"({len(unexpected)} in all)")
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{hf[name]} has shape {list(hf_state[hf[name]].shape)} but config.json implies "
                                  f"{hf_shape(name)}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names/layout -> HF ImageGPTForCausalImageModeling's (contiguous, ready for safetensors)."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        hf_name = name if name == "lm_head.weight" else "transformer." + name
        out[hf_name] = (tensor.t() if _CONV1D.search(name) else tensor).contiguous()
    return out


def config_from_hf(hf_config: dict) -> ModelConfig:
    """An AR ModelConfig from a HF ImageGPT config.json dict; missing fields take ImageGPTConfig's defaults.

    Settings that change the network in ways our model does not implement are refused, so that an
    import never silently gives different logits. reorder_and_upcast_attn only changes the order of
    float operations, so it is accepted.
    """
    get = lambda key, default: default if hf_config.get(key) is None else hf_config[key]  # noqa: E731
    if get("model_type", "imagegpt") != "imagegpt":
        raise CheckpointError(f"config.json is for model_type {hf_config['model_type']!r}, not 'imagegpt'")
    n_embd = get("n_embd", 512)
    refusals = [
        (get("activation_function", "quick_gelu") != "quick_gelu",
         f"activation_function {hf_config.get('activation_function')!r} (iGPT uses quick_gelu)"),
        (not get("scale_attn_weights", True), "scale_attn_weights false"),
        (get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx true"),
        (get("add_cross_attention", False), "add_cross_attention true"),
        (get("n_inner", 4 * n_embd) != 4 * n_embd, f"n_inner {hf_config.get('n_inner')} (iGPT's MLP is 4 × n_embd)"),
        (get("tie_word_embeddings", False), "tie_word_embeddings true (iGPT's output head is separate)"),
    ]
    bad = [what for refused, what in refusals if refused]
    if bad:
        raise CheckpointError(f"config.json asks for {', '.join(bad)}: igpt's model does not implement that, "
                              "so its logits would differ")
    try:
        return ModelConfig(vocab_size=get("vocab_size", 513), n_positions=get("n_positions", 1024),
                           n_layer=get("n_layer", 24), n_head=get("n_head", 8), n_embd=n_embd,
                           objective="ar", layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-5)))
    except IgptError as err:
        raise CheckpointError(f"config.json does not describe a model igpt can hold: {err}") from None


# -- reading a save_pretrained folder ---------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}; expected {_FOLDER_HINT}")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, pytorch_model.bin, or either one sharded with an *.index.json."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            files = [folder / single]
        elif (folder / index).is_file():
            files = [folder / f for f in dict.fromkeys(_read_json(folder / index).get("weight_map", {}).values())]
        else:
            continue
        state = {}
        for file in files:
            try:
                if file.suffix == ".safetensors":
                    state.update(load_file(str(file), device="cpu"))
                else:  # a pickle: weights_only refuses anything but tensors and plain containers
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            except pickle.UnpicklingError:
                raise CheckpointError(f"{file} could not be read: it holds objects other than tensors, and "
                                      "unpickling them could run code; ask for a safetensors file") from None
            except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
                raise CheckpointError(f"{file} could not be read ({first_line(err)}); it may be truncated or not a "
                                      "weights file") from None
        return state
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors or pytorch_model.bin")


def _download(repo_id: str, progress: bool) -> Path:
    """The hub snapshot of repo_id: configs plus one weights format (safetensors if the repo has it)."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    configs = ["config.json", "preprocessor_config.json"]
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=configs + ["model.safetensors", "model*.safetensors*"]))
        if not any(folder.glob("*.safetensors")):  # older repos (openai/imagegpt-*) ship only the pickle
            folder = Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=configs + ["pytorch_model.bin", "pytorch_model*.bin*"]))
    # The hub raises many types (HTTP, offline, not found, invalid id, connection): all mean "not here".
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and the Hugging Face hub could not provide it "
            f"({first_line(err)}): the id was not found or the hub is unreachable. Pass {_FOLDER_HINT} instead"
        ) from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return folder


def _locate(source: str, progress: bool) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise CheckpointError(f"{source} is a file; pass the folder that holds it ({_FOLDER_HINT})")
    if not _HUB_ID.fullmatch(source) or len(source) > 96 or ".." in source or "--" in source:
        raise CheckpointError(f"there is no folder {source!r}, and it is not a hub id like 'openai/imagegpt-small'; "
                              f"pass {_FOLDER_HINT}")
    return _download(source, progress)


# -- OpenAI's released models -----------------------------------------------------------------------

# The three sizes on the Hugging Face hub (the paper's iGPT-S/M/L at 32×32, 512 colours; ImageNet
# weights): what each is, and its download (float32 pytorch_model.bin: 4 bytes per parameter).
OPENAI_MODELS = {
    "openai/imagegpt-small": ("iGPT-S, 24 layers × 512, 76M parameters", "0.3 GB"),
    "openai/imagegpt-medium": ("iGPT-M, 36 layers × 1024, 455M parameters", "1.8 GB"),
    "openai/imagegpt-large": ("iGPT-L, 48 layers × 1536, 1.4B parameters", "5.4 GB"),
}


def find_imported(source: str, runs_dir=None) -> Run | None:
    """The run imported from `source` (a hub id or folder) with a checkpoint, if there is one."""
    for run in list_runs(runs_dir):
        try:
            if run.info.get("source") == source and run.checkpoints():
                return run
        except IgptError:  # an unreadable run.json is not the one we look for
            continue
    return None


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache ($HF_HOME) holds repo_id's config, so importing needs no network."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def import_once(repo_id: str, runs_dir=None, *, progress: bool = True) -> Run:
    """The run made from hub id `repo_id`, importing it (as run `owner-name`) the first time."""
    run = find_imported(repo_id, runs_dir)
    if run is not None:
        return run
    if hub_offline() and not in_hub_cache(repo_id):
        raise CheckpointError(f"{repo_id} is not on this machine and the Hugging Face hub is switched off "
                              "(HF_HUB_OFFLINE=1): connect, unset it, and choose it again")
    return import_hf(repo_id, repo_id.replace("/", "-"), runs_dir, progress=progress)


# -- import / export --------------------------------------------------------------------------------


def import_hf(source: str, name: str, runs_dir=None, *, overwrite: bool = False, progress: bool = True) -> Run:
    """Make run `name` from a HF ImageGPT model: a save_pretrained folder, or a hub id (downloaded).

    The run's single checkpoint is at step 0. Everything is read and checked before the run
    folder is written, so a bad source leaves no half-made run behind.
    """
    target = runs_root(runs_dir) / name
    if target.exists() and not overwrite:  # before a download of possibly gigabytes
        raise RunError(f"a run named {name!r} already exists at {target}: pass overwrite=True "
                              "(--overwrite) to replace it, or choose another name")
    folder = _locate(str(source), progress)
    config = config_from_hf(_read_json(folder / "config.json"))
    clusters = _read_json(folder / "preprocessor_config.json").get("clusters")
    if clusters is None:
        raise CheckpointError(f"{folder / 'preprocessor_config.json'} holds no 'clusters' (the colour palette); "
                              "save the ImageGPT image processor beside the model")
    try:
        palette = Palette(clusters)
    except IgptError as err:
        raise CheckpointError(f"the clusters in {folder / 'preprocessor_config.json'} are unusable: {err}") from None
    if len(palette) != config.n_colors:
        raise CheckpointError(f"the processor has {len(palette)} clusters but the model predicts {config.n_colors} "
                              "colours (vocab_size - 1)")
    state = state_dict_from_hf(_read_weights(folder), config)
    with torch.device("meta"):
        model = IGPT(config)
    model.load_state_dict(state, assign=True)  # adopt the tensors as they are: no second copy of the weights

    model_name = (openai_model_name(config) if source in OPENAI_MODELS else None) or str(source)
    info = {"dataset": f"imported:{source}", "preset": None, "model_config": config.to_dict(), "train_config": None,
            "classes": None, "source": str(source), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "imported": imported_record("hf", model_name, source)}
    # The weights go in before the run appears: a run without them would only confuse later commands.
    return create_run(runs_dir, name, info, palette, overwrite=overwrite,
                      fill=lambda run: save_checkpoint(run.checkpoint_path(0), model, palette, step=0, source=str(source)))


def _hf_config_json(config: ModelConfig) -> dict:
    return {
        "architectures": ["ImageGPTForCausalImageModeling"],
        "model_type": "imagegpt",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "quick_gelu",
        # our models train without dropout (as the paper); HF would otherwise apply 0.1 when fine-tuning
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "dtype": "float32",
    }


def _processor_json(palette: Palette, size: int) -> dict:
    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": palette.clusters.tolist(),  # float32 values written exactly, in [-1, 1] like HF's
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 2,  # PIL bilinear, as images.resize
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,  # (x / 255 - 0.5) / 0.5 = x / 127.5 - 1, the space the clusters live in
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_color_quantize": True,
    }


def export_hf(run_name: str, out_dir, runs_dir=None, step: int | None = None) -> Path:
    """Write a run's checkpoint (default: the last) as a HF save_pretrained folder; returns its path.

    Loadable with ImageGPTForCausalImageModeling.from_pretrained and ImageGPTImageProcessor(Pil)
    .from_pretrained. The folder is written beside out_dir and renamed into place; an existing
    out_dir is replaced only if it is empty or an earlier export.
    """
    run = open_run(run_name, runs_dir)
    if run.model_config.objective != "ar":
        raise CheckpointError(f"run {run_name!r} is a BERT-objective model: Hugging Face's ImageGPT is causal only, "
                              "so it would give different logits; only AR runs can be exported")
    out_dir = Path(out_dir)
    replaceable = out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / EXPORT_MARKER).is_file())
    if out_dir.exists() and not replaceable:
        raise CheckpointError(f"{out_dir} exists and is not an earlier igpt export; choose a new or empty folder")
    step = run.resolve_step(step)
    model, palette, _ = run.load(step)

    with building_folder(out_dir, replace=True) as tmp:  # an old export is swapped out only once the new one is whole
        save_file(state_dict_to_hf(model.state_dict()), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})  # transformers refuses safetensors files without this
        atomic_write_json(tmp / "config.json", _hf_config_json(model.config))
        atomic_write_json(tmp / "preprocessor_config.json", _processor_json(palette, model.config.image_size))
        atomic_write_json(tmp / EXPORT_MARKER, {"run": run.name, "step": step, "source": str(run.path)})
    return out_dir
