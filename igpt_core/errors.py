"""Errors a user can act on.

Every failure caused by input (a file, a name, a flag) is raised as an `IgptError` whose message says
what was wrong and what to do. The CLI prints that message alone; the apps show it in the page.
Anything else escaping is a bug in igpt.
"""


class IgptError(Exception):
    """Base class: the message is meant for the user, complete and without a traceback."""


class ImageError(IgptError):
    """An image file or array that cannot be used."""


class DatasetError(IgptError):
    """An unknown dataset name, or dataset files that are missing or malformed."""


class CheckpointError(IgptError):
    """A checkpoint that is missing, truncated, corrupted, foreign, or does not fit the model."""


class RunError(IgptError):
    """A run that does not exist, or whose folder is incomplete."""


class ConfigError(IgptError):
    """An unknown preset, a bad override, or a resume whose config differs from the run's."""


class LostPeersError(IgptError):
    """A process of a torchrun job lost contact with the others (one died or went silent); its
    resumable state is saved. The message says how to continue."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): enough to say what
    went wrong in one line, without a wrapped library's traceback-sized text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
