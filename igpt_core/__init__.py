"""igpt_core: Image GPT ("Generative Pretraining from Pixels", Chen et al., ICML 2020) in PyTorch."""

from .data import DATASETS, Dataset, DatasetStream, load_dataset, open_dataset
from .decoder import Decoder
from .errors import CheckpointError, ConfigError, DatasetError, IgptError, ImageError, RunError
from .images import load_image, resize, to_rgb
from .likelihood import pixel_nll, score, surprise_map
from .model import IGPT, PRESETS, ModelConfig, preset
from .palette import Palette
from .runs import Run, list_runs, load_checkpoint, open_run, save_checkpoint
from .sample import complete, complete_stream, inpaint, inpaint_stream, unconditional
from .shards import Shards, open_shards
from .tokenizer import tokenize
from .train import TrainConfig, start_run, train

__all__ = [
    "DATASETS", "Dataset", "DatasetStream", "load_dataset", "open_dataset",
    "CheckpointError", "ConfigError", "DatasetError", "IgptError", "ImageError", "RunError",
    "load_image", "resize", "to_rgb",
    "pixel_nll", "score", "surprise_map",
    "Decoder", "IGPT", "PRESETS", "ModelConfig", "preset",
    "Palette",
    "Run", "list_runs", "load_checkpoint", "open_run", "save_checkpoint",
    "Shards", "open_shards", "tokenize",
    "complete", "complete_stream", "inpaint", "inpaint_stream", "unconditional",
    "TrainConfig", "start_run", "train",
]

# TODO(lead): temporary (branch course), so the notebooks can import these from the top-level package;
# replace with the exports from their new homes (training/, probe/, pretrained/) at merge.
from .finetune import classify, finetune  # noqa: E402
from .hf import export_hf, import_hf  # noqa: E402
from .images import center_square  # noqa: E402
from .probe import fit_probe, load_probe_results, probe_run, spearman  # noqa: E402
from .train import unigram_loss  # noqa: E402
