"""Progress bars for long work (training, fine-tuning, feature extraction, probe fits)."""

from __future__ import annotations


def progress_bar(enabled: bool, **options):
    """A tqdm bar (a widget in notebooks, text in a terminal), or None when progress is off.

    options go to tqdm (total, desc, unit, initial, leave, ...); the bar follows the terminal width.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm  # imported here: only long work needs it

    return tqdm(dynamic_ncols=True, **options)
