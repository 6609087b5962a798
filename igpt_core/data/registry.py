"""The dataset sources igpt knows, registered with a decorator: a name (or a prefix) and a description.

    @register("cifar10", "CIFAR-10, 32×32 colour, ...")
    def load_cifar(request): ...

A loader receives a `Request` and returns (images, labels or None, class names or None), where
images is a uint8 (N, H, H, 3) array or an `ImageRows` read on demand. A source registered with a
`prefix` ("folder:", "hf:", "shards:") takes what follows the prefix as its argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError


@dataclass(frozen=True)
class Request:
    """What a loader is asked for; each loader uses the fields it needs."""

    key: str  # the source's key in DATASETS ("cifar10", "folder:PATH", ...)
    split: str
    seed: int
    data_dir: Path
    resolution: int | None
    download: bool
    argument: str | None = None  # for prefixed sources: what follows the prefix ("folder:" -> the path)


@dataclass(frozen=True)
class Source:
    key: str  # the name users type, or the pattern for prefixed sources ("hf:NAME")
    description: str
    load: Callable[[Request], tuple]
    prefix: str | None = None  # "hf:" for "hf:NAME"; None for a plain name
    example: str | None = None  # shown when the prefix comes without an argument


SOURCES: dict[str, Source] = {}
# name -> description, for listings (`igpt datasets`); filled by `register`, in registration order.
DATASETS: dict[str, str] = {}


def register(key: str, description: str, *, prefix: str | None = None, example: str | None = None):
    """Decorator: make a loader the source called `key` (or every name starting with `prefix`)."""

    def add(load: Callable[[Request], tuple]) -> Callable[[Request], tuple]:
        if key in SOURCES:
            raise ValueError(f"two dataset sources are called {key!r}")
        SOURCES[key] = Source(key, description, load, prefix, example)
        DATASETS[key] = description
        return load

    return add


def find_source(name: str) -> tuple[Source, str | None]:
    """The source a dataset name refers to, and its argument (what follows a prefix, else None)."""
    stripped = str(name).strip()
    for source in SOURCES.values():
        if source.prefix and stripped.lower().startswith(source.prefix):
            argument = stripped[len(source.prefix) :]
            if not argument:
                raise DatasetError(f"{source.prefix} needs {source.example}")
            return source, argument
    # Be lenient about case and "_" vs "-" (fashion_mnist): there is no ambiguity to protect.
    key = stripped.lower().replace("_", "-")
    if key not in SOURCES or SOURCES[key].prefix:
        raise DatasetError(f"unknown dataset {name!r} — known: {', '.join(DATASETS)}")
    return SOURCES[key], None
