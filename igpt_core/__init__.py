"""igpt_core: Image GPT ("Generative Pretraining from Pixels", Chen et al., ICML 2020) in PyTorch.

This file is the library's public surface: the apps, the CLI and the notebooks import from here.
Drawing helpers stay in their module (`from igpt_core import render`), as do the inside views
(`explain`) and the representation analyses (`analysis`).
"""

from . import analysis, explain, render
from .data import (DATASETS, SPLITS, Dataset, DatasetStream, Shards, builtin_photos, check_token_palette,
                   load_dataset, open_dataset, open_shards, palette_ids, shards_path)
from .decoder import Decoder
from .device import pick_device, resolve_precision
from .errors import CheckpointError, ConfigError, DatasetError, IgptError, ImageError, LostPeersError, RunError
from .files import safe_name
from .images import (center_box, center_square, crop, load_image, painted_cells, parse_pixel, resize, square_from_drag,
                     square_inside, to_rgb)
from .likelihood import bits_per_token, likelihood_kind, pixel_nll, score, surprise_map
from .model import IGPT, PRESETS, ModelConfig, preset
from .palette import Palette
from .pretrained import (OPENAI_MODELS, OPENAI_STEPS, export_hf, find_imported, hub_offline, import_hf, import_once,
                         import_openai, imported_label, in_hub_cache)
from .probe import (PAPER_FOLDER, ProbeTable, cached_features, fit_probe, load_probe_results, make_paper, paper_plan,
                    probe_run, spearman)
from .runs import (ModelCache, Run, list_runs, load_checkpoint, open_run, parse_memory, return_freed_memory, runs_root,
                   save_checkpoint, scan_runs)
from .sample import complete, complete_each, complete_stream, inpaint, inpaint_stream, unconditional
from .tokenizer import fit_palette, tokenize
from .training import (TrainConfig, Trainer, check_resume, classify, finetune, parse_save_every, start_run, train,
                       unigram_loss)

__all__ = [
    "analysis", "explain", "render",
    "DATASETS", "SPLITS", "Dataset", "DatasetStream", "Shards", "builtin_photos", "check_token_palette",
    "load_dataset", "open_dataset", "open_shards", "palette_ids", "shards_path",
    "Decoder", "pick_device", "resolve_precision",
    "CheckpointError", "ConfigError", "DatasetError", "IgptError", "ImageError", "LostPeersError", "RunError", "safe_name",
    "center_box", "center_square", "crop", "load_image", "painted_cells", "parse_pixel", "resize",
    "square_from_drag", "square_inside", "to_rgb",
    "bits_per_token", "likelihood_kind", "pixel_nll", "score", "surprise_map",
    "IGPT", "PRESETS", "ModelConfig", "preset", "Palette",
    "OPENAI_MODELS", "OPENAI_STEPS", "export_hf", "find_imported", "hub_offline", "import_hf", "import_once",
    "import_openai", "imported_label", "in_hub_cache",
    "PAPER_FOLDER", "ProbeTable", "cached_features", "fit_probe", "load_probe_results", "make_paper", "paper_plan",
    "probe_run", "spearman",
    "ModelCache", "Run", "list_runs", "load_checkpoint", "open_run", "parse_memory", "return_freed_memory", "runs_root", "save_checkpoint",
    "scan_runs",
    "complete", "complete_each", "complete_stream", "inpaint", "inpaint_stream", "unconditional",
    "fit_palette", "tokenize",
    "TrainConfig", "Trainer", "check_resume", "classify", "finetune", "parse_save_every", "start_run", "train",
    "unigram_loss",
]
