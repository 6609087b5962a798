"""Dataset files on disk: checking they are there, downloading them, extracting archives safely.

Nothing here touches the network unless a loader was asked to with `download=True`. Every file is
written to a temporary name and renamed into place, so a failed download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetError
from ..files import atomic_write
from ..progress import progress_bar
from .registry import Request


def ensure_files(folder: Path, names, title: str, source: str, request: Request, fetch: Callable[[], None], *,
                 present: Callable[[str], bool] | None = None, suffix: str = "") -> None:
    """Check that every file of a dataset is present; fetch them first if download was asked for.

    `present(name)` says whether a file is there (default: folder/name is a file); `suffix` is
    shown after missing names (IDX files may also be gzipped: "[.gz]").
    """
    present = present or (lambda name: (folder / name).is_file())

    def missing():
        return [n for n in names if not present(n)]

    if missing() and request.download:
        fetch()
    if missing():
        raise DatasetError(
            f"{title} files are missing: {', '.join(f'{folder / n}{suffix}' for n in missing())}. "
            f"Place the official files in {folder} (from {source}), or pass download=True "
            "(CLI --download) on a machine with network access."
        )


def download(url: str, dest: Path, by_hand: str, *, md5: str | None = None, progress: bool = False) -> None:
    """Fetch url to dest, verified by md5 when one is published, written to a temp file then renamed:
    never half-written. `progress` shows a bar sized by the server's Content-Length."""

    def fetch(tmp: str) -> None:
        digest = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5: integrity only
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                size = _content_length(response)
                bar = progress_bar(progress, total=size, desc=dest.name, unit="B", unit_scale=True, leave=False)
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSError
            raise DatasetError(f"the download of {url} failed ({err}). {by_hand}") from None
        if md5 is not None and digest.hexdigest() != md5:
            raise DatasetError(
                f"the download of {url} is corrupted (md5 {digest.hexdigest()}, expected {md5}). {by_hand}"
            )

    atomic_write(dest, fetch)


def _content_length(response) -> int | None:
    headers = getattr(response, "headers", None)
    length = headers.get("Content-Length") if headers is not None else None
    return int(length) if length and length.isdigit() else None


def download_archive(url: str, md5: str, data_dir: Path, folder: str, names, by_hand: str) -> None:
    """Fetch a .tar.gz (unless a verified copy is there) and extract folder/<names> from it."""
    archive = data_dir / url.rsplit("/", 1)[1]
    if not (archive.is_file() and file_md5(archive) == md5):
        download(url, archive, by_hand, md5=md5)
    extract_tar(archive, data_dir, folder, names)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def extract_tar(archive: Path, data_dir: Path, folder: str, names) -> None:
    """Extract `folder/<names>` from a tar archive into data_dir, safely and atomically per file.

    Members are checked before anything is written: only plain files and folders that stay inside
    the target, so a crafted archive cannot write elsewhere (../, absolute paths, links).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    target = (tmp / member.name).resolve()
                    if not (member.isfile() or member.isdir()) or not target.is_relative_to(tmp.resolve()):
                        raise DatasetError(
                            f"{archive} contains {member.name!r}, which is not a plain file inside the "
                            "archive's folder: refusing to extract it; delete the archive"
                        )
                # The "data" filter re-checks the same on Pythons that have it (3.10.12+, 3.11.4+).
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **safe)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DatasetError(f"{archive} could not be extracted ({err}): delete it and try again") from None
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            source = tmp / folder / name
            if not source.is_file():
                raise DatasetError(f"{archive} does not contain {folder}/{name}: delete it and try again")
            os.replace(source, data_dir / folder / name)
