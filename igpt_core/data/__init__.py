"""Named image datasets as uint8 RGB arrays, split into train / val / test the same way every time.

`load_dataset(name, split)` is the one entry point (`open_dataset` to read batch by batch). Sources
(see `DATASETS`), one module each, registered with `registry.register`:

- built in, no files needed (bundled.py): scikit-learn's `digits` (labelled), `digits-moved`, and
  `photos`, unlabelled crops of the photos that scikit-learn and scikit-image ship;
- real datasets in their standard on-disk formats under a data folder: CIFAR-10/100 (cifar.py, the
  official python pickle batches), MNIST / Fashion-MNIST (idx.py, IDX files, raw or gzipped), STL-10
  (stl10.py, binary files read through np.memmap), downsampled ImageNet 32² / 64² (imagenet.py, the
  official .npz batches);
- `folder:PATH` (folder.py), any folder of images, where sub-folders are class labels;
- `hf:NAME` (hf.py), any image-classification dataset of the Hugging Face `datasets` library;
- `shards:DIR` (shards.py), palette ids written by `igpt tokenize`;
- `openai:cifar10`, `openai:imagenet` (openai.py), OpenAI's datasets released as palette ids: their
  `Dataset` carries `token_ids` and the `palette` they refer to.

Nothing here touches the network unless `download=True` is passed (download.py).
"""

# The source modules register themselves on import; this order is the order `DATASETS` lists them in.
from . import bundled, cifar, idx, stl10, imagenet, hf, shards, folder, openai  # noqa: F401  isort: skip
from .bundled import builtin_photos
from .core import Dataset, DatasetStream, ImageRows, LazyImages, default_data_dir, load_dataset, open_dataset
from .openai import check_token_palette, openai_folder, openai_palette_centers, palette_ids
from .registry import DATASETS, register
from .shards import FORMAT, VERSION, Shards, ShardSplit, open_shards, palette_fingerprint, shards_path
from .splits import SPLITS

__all__ = [
    "DATASETS", "FORMAT", "SPLITS", "VERSION", "Dataset", "DatasetStream", "ImageRows", "LazyImages", "ShardSplit",
    "Shards", "builtin_photos", "check_token_palette", "default_data_dir", "load_dataset", "open_dataset",
    "open_shards", "openai_folder", "openai_palette_centers", "palette_fingerprint", "palette_ids", "register", "shards_path",
]
