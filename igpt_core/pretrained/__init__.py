"""OpenAI's released Image GPT weights, made into igpt runs.

Two sources hold the same models in different formats:

- `hf`: the Hugging Face port (`openai/imagegpt-small|medium|large`, the final weights only), and
  export of our runs to that format;
- `openai`: OpenAI's own TensorFlow training checkpoints of iGPT-S/M/L at 131k, 262k, 524k and 1M
  steps (the checkpoints behind the paper's Figure 3), read by `tf_bundle` without TensorFlow.
"""

from .hf import (
    OPENAI_MODELS,
    config_from_hf,
    export_hf,
    find_imported,
    hub_offline,
    import_hf,
    import_once,
    in_hub_cache,
    state_dict_from_hf,
    state_dict_to_hf,
)
from .labels import imported_label
from .openai import OPENAI_STEPS, import_openai

__all__ = [
    "OPENAI_MODELS", "config_from_hf", "export_hf", "find_imported", "hub_offline", "import_hf", "import_once",
    "in_hub_cache", "state_dict_from_hf", "state_dict_to_hf", "imported_label", "OPENAI_STEPS", "import_openai",
]
