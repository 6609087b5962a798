"""Writing files so that a crash never leaves half of one. Standard library only.

Every write goes to a temporary file (or folder) beside its target and is renamed into place: on
the same file system a rename is atomic, so readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def safe_name(text: str, sep: str = "-") -> str:
    """A name (a dataset such as "hf:owner/x?label=y" or "folder:/a/b") as a file- or run-name part:
    every run of other characters than letters, digits, ".", "_" and "-" becomes `sep`."""
    return re.sub(r"[^A-Za-z0-9._-]+", sep, str(text)).strip(sep + ".")


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), flush it to disk, then rename tmp_path onto path.

    tmp_path is a fresh file in path's folder (so the rename stays on one file system); if write
    raises, it is removed and path is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, value) -> None:
    """value as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace path with one JSON object per line (atomically)."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append one JSON object per line. A crash can cut only the last line, which readers skip."""
    lines = [json.dumps(row) + "\n" for row in rows]
    if not lines:
        return
    with open(path, "a") as f:
        f.writelines(lines)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist); a damaged line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


@contextmanager
def building_folder(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary directory beside `target`; on success rename it into place.

        with building_folder(runs / "my-run") as tmp:
            (tmp / "run.json").write_text(...)

    If the block raises, the temporary folder is removed and target is untouched. If target exists
    when the block ends, it is an error unless replace=True: then the old folder is moved aside,
    the new one renamed in, and the old one removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} appeared while it was being built")
            old = tmp.with_name(tmp.name + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
