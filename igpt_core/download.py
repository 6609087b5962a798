"""Downloading files over HTTP(S) so that an interruption costs nothing: standard library only.

The one downloader of igpt (datasets, OpenAI's checkpoints and palette). Bytes gather in `NAME.part`
beside the target; the file gets its real name only once it holds the length the server announced
and, when a checksum is published, the right MD5. Running the same download again continues a
`.part` file with an HTTP Range request, from where it stopped. So a file under its real name is
always complete: never a half-written one.

Every failure is one line that says what to do, raised as the caller's error class (`DatasetError`
for datasets, `CheckpointError` for checkpoints): the CLI prints either and exits 2.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import IgptError, first_line
from .progress import progress_bar

CHUNK = 1 << 20  # bytes per read: large enough for speed, small enough for a smooth progress bar
TIMEOUT_S = 60  # per connection attempt and per read; a stalled server ends in an error, not a hang
RESUME = "run the same command again to resume it"


def part_path(path: Path) -> Path:
    """Where the bytes of `path` gather while it downloads."""
    return path.with_name(path.name + ".part")


def file_md5(path: str | Path) -> str:
    """The MD5 of a file's bytes, as hex: what dataset sites publish (an integrity check, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def byte_bar(enabled: bool, desc: str) -> Iterator:
    """A progress bar counting the bytes of one or more downloads (None when progress is off), closed
    at the end of the block so that an error prints on a line of its own."""
    bar = progress_bar(enabled, desc=desc, unit="B", unit_scale=True, total=0)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def download(url: str, path: str | Path, *, md5: str | None = None, bar=None, advice: str = "",
             error: type[IgptError] = IgptError) -> Path:
    """Fetch url into path (kept as it is if already there), resuming a `.part` left by an interrupted run.

    md5: the published checksum, checked over the whole file once it is complete; a mismatch removes
    the bytes and says so. bar: a tqdm progress bar counting bytes (its total grows as each file's
    length becomes known), or None. advice: a sentence added to every error (where else to get the
    file). error: the IgptError subclass raised.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(path)
    start = part.stat().st_size if part.is_file() else 0
    with open_url(url, start, advice, error) as response:
        if status(response) == 416:  # nothing after `start`: the .part is complete, or longer than the file
            total = total_length(response, 0)
            if total != start:
                part.unlink()
                raise error(join(f"{part} did not match {url} and was removed; run the same command again", advice))
        else:
            if status(response) != 206:  # the server sent the whole file: start over
                start = 0
            total = total_length(response, start)
            if bar is not None:
                bar.total = (bar.total or 0) + (total or 0) - start
                bar.refresh()
            copy_body(response, part, start, url, total, bar, advice, error)
    size = part.stat().st_size
    if total is not None and size != total:
        raise error(join(f"the download of {url} stopped after {size} of {total} bytes; {RESUME}", advice))
    if md5 is not None and (found := file_md5(part)) != md5:
        part.unlink()
        raise error(join(f"the download of {url} is corrupted (md5 {found}, expected {md5}) and was removed; run the "
                         "same command again to download it afresh", advice))
    os.replace(part, path)
    return path


def open_url(url: str, start: int, advice: str, error: type[IgptError]):
    """The server's response for url from byte `start` on; errors as one readable line."""
    # A plain URL when nothing is resumed; a Request only to carry the Range header.
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"}) if start else url
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # handled by the caller: the .part may already be the whole file
            return err
        raise error(join(f"the download of {url} failed (HTTP {err.code} {err.reason})", advice)) from None
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSError
        reason = first_line(getattr(err, "reason", err)) if isinstance(err, urllib.error.URLError) else first_line(err)
        raise error(join(f"the download of {url} failed ({reason}); check the network connection", advice)) from None


def status(response) -> int:
    """The HTTP status of a response; 200 for one without (a file: URL), which holds the whole file."""
    return getattr(response, "status", None) or 200


def total_length(response, start: int) -> int | None:
    """The whole file's length in bytes, from Content-Range (a resumed download) or Content-Length."""
    headers = getattr(response, "headers", None) or {}
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", headers.get("Content-Range", "").strip())
    if match:
        return int(match.group(1))
    length = headers.get("Content-Length", "")
    if not length.isdigit():
        return None
    return int(length) + (start if status(response) == 206 else 0)


def copy_body(response, part: Path, start: int, url: str, total: int | None, bar, advice: str,
              error: type[IgptError]) -> None:
    """Write the response body to `part` (appending after `start` bytes, or from scratch), flushed to disk."""
    with open(part, "r+b" if start else "wb") as f:
        f.seek(start)
        f.truncate()
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as err:
            f.flush()
            raise error(join(f"the download of {url} stopped after {f.tell()} of {total or '?'} bytes "
                             f"({first_line(err)}); {RESUME}", advice)) from None
        f.flush()
        os.fsync(f.fileno())  # the bytes reach the disk before the real name points at them


def join(message: str, advice: str) -> str:
    """An error message and the caller's advice, as one line."""
    return f"{message}. {advice}" if advice else message
