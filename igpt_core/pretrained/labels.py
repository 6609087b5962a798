"""What an imported run is, in a few words: its run.json's "imported" record and the label made from it.

Both importers (Hugging Face folders or hub ids, OpenAI's TensorFlow checkpoints) record in run.json

    "imported": {"source": "hf" | "openai-tf", "model": "OpenAI iGPT-S", "from": hub id, URL or folder}

so that a model someone else trained is never shown as if igpt had trained it.
"""

from __future__ import annotations

import torch

from ..model import IGPT, PRESETS, ModelConfig
from ..runs import Run

SOURCES = {"hf": "Hugging Face", "openai-tf": "OpenAI's TensorFlow checkpoints"}
OPENAI_SIZES = {"s": "iGPT-S", "m": "iGPT-M", "l": "iGPT-L"}  # the sizes OpenAI released (the paper's Table 1)


def imported_record(source: str, model: str, origin: str) -> dict:
    """The "imported" entry of run.json: `source` is "hf" or "openai-tf", `origin` where the files came from."""
    if source not in SOURCES:
        raise ValueError(f"unknown import source {source!r}; one of {', '.join(SOURCES)}")
    return {"source": source, "model": model, "from": str(origin)}


def openai_model_name(config: ModelConfig) -> str | None:
    """"OpenAI iGPT-S" (or -M, -L) if `config` has that released model's shape: 32×32 images, 512 colours."""
    for size, name in OPENAI_SIZES.items():
        shape = PRESETS[size]
        if (config.n_positions, config.vocab_size) == (1024, 513) and all(
                getattr(config, key) == value for key, value in shape.items()):
            return f"OpenAI {name}"
    return None


def parameter_count(config: ModelConfig) -> int:
    """Parameters of a model of this config (built on the meta device: no memory, even for iGPT-L)."""
    with torch.device("meta"):
        return IGPT(config).num_parameters()


def short_count(n: int) -> str:
    """76M, 455M, 1.36B: a parameter count cut (not rounded) to the digits shown, as OpenAI states its sizes."""
    if n >= 10**9:
        return f"{n // 10**7 / 100:.2f}B"
    if n >= 10**6:
        return f"{n // 10**6}M"
    if n >= 10**3:
        return f"{n // 10**3}K"
    return str(n)


def imported_label(run: Run) -> str | None:
    """E.g. "OpenAI iGPT-S · pre-trained (imported) · 76M" for an imported run; None for one igpt trained.

    Runs imported from Hugging Face before run.json held an "imported" record are recognised by their
    dataset ("imported:SOURCE").
    """
    info = run.info
    record = info.get("imported")
    dataset = str(info.get("dataset") or "")
    if isinstance(record, dict):
        model = str(record.get("model") or "")
    elif dataset.startswith("imported:"):  # imported before run.json held the record: the hub id or folder
        model = dataset.removeprefix("imported:")
    else:
        return None
    config = run.model_config
    if not model or model.startswith("openai/imagegpt-"):  # OpenAI's hub ids: say which model it is
        model = openai_model_name(config) or model or run.name
    return f"{model} · pre-trained (imported) · {short_count(parameter_count(config))}"
