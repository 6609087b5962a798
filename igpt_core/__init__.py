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
from .data import Shards, open_shards
from .tokenizer import tokenize
from .training import TrainConfig, start_run, train

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
