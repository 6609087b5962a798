"""Dataset files on disk: checking they are there, downloading archives, extracting them safely.

Nothing here touches the network unless a loader was asked to with `download=True`. Downloads go
through igpt_core.download (resumable, md5-checked, renamed into place only when complete), so a
failed one leaves no file under its real name.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..download import byte_bar, download, file_md5
from ..errors import DatasetError
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


def download_archive(url: str, md5: str, data_dir: Path, folder: str, names, by_hand: str) -> None:
    """Fetch a .tar.gz (unless a verified copy is there) and extract folder/<names> from it."""
    archive = data_dir / url.rsplit("/", 1)[1]
    if archive.is_file() and file_md5(archive) != md5:
        archive.unlink()  # not the published archive (another version, or damaged): fetch it again
    with byte_bar(True, f"downloading {archive.name}") as bar:
        download(url, archive, md5=md5, bar=bar, advice=by_hand, error=DatasetError)
    extract_tar(archive, data_dir, folder, names)


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
