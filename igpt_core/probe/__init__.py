"""Linear probes: how linearly separable are the classes in each layer's features, at each checkpoint?

    features.py   each layer's probe feature for every image, in fp32 or bf16
    cache.py      the feature cache, and reading it back for analysis (cached_features)
    fit.py        the logistic-regression probe, several fits at once in worker processes
    table.py      the stored results of one run on one dataset (ProbeTable), read back
    run.py        probe_run: every requested (checkpoint, layer), with references, into the table
    paper.py      the paper's two probe figures (Figure 3) for several runs: a view over probe_run
"""

from .cache import cached_features
from .features import extract_features, feature_precision
from .fit import DEFAULT_CS, confusion_matrix, fit_probe, fit_probes, fit_workers, warm_up_workers
from .paper import PAPER_FOLDER, PaperPlan, make_paper, paper_plan
from .run import RAW_PIXELS_MAX_TRAIN, load_probe_data, probe_run
from .table import ProbeTable, load_probe_results, results_path, spearman

__all__ = [
    "DEFAULT_CS", "PAPER_FOLDER", "PaperPlan", "RAW_PIXELS_MAX_TRAIN", "ProbeTable", "cached_features", "confusion_matrix", "extract_features",
    "feature_precision", "fit_probe", "fit_probes", "fit_workers", "load_probe_data", "load_probe_results",
    "make_paper", "paper_plan", "probe_run", "results_path", "spearman", "warm_up_workers",
]
