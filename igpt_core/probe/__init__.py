"""Linear probes: how linearly separable are the classes in each layer's features, at each checkpoint?

    features.py   each layer's probe feature for every image, and the feature cache
    fit.py        the logistic-regression probe, several fits at once in worker processes
    table.py      the stored results of one run on one dataset (ProbeTable), read back
    run.py        probe_run: every requested (checkpoint, layer), with references, into the table
"""

from .features import extract_features
from .fit import DEFAULT_CS, fit_probe, fit_probes, fit_workers, warm_up_workers
from .run import RAW_PIXELS_MAX_TRAIN, load_probe_data, probe_run
from .table import ProbeTable, load_probe_results, results_path, spearman

__all__ = [
    "DEFAULT_CS", "RAW_PIXELS_MAX_TRAIN", "ProbeTable", "extract_features", "fit_probe", "fit_probes", "fit_workers",
    "load_probe_data", "load_probe_results", "probe_run", "results_path", "spearman", "warm_up_workers",
]
