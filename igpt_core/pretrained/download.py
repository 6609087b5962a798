"""Downloading large files over HTTP(S) so that an interruption costs nothing: standard library only.

Bytes go to `NAME.part` beside the target; the file gets its real name only once it holds exactly
the length the server announced. Running the same download again continues a `.part` file with an
HTTP Range request, from where it stopped.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CheckpointError, first_line

CHUNK = 1 << 20  # bytes per read: large enough for speed, small enough for a smooth progress bar
TIMEOUT_S = 60  # per connection attempt and per read; a stalled server ends in an error, not a hang


def part_path(path: Path) -> Path:
    """Where the bytes of `path` gather while it downloads."""
    return path.with_name(path.name + ".part")


def open_url(url: str, start: int):
    """The server's response for url from byte `start` on; errors as one readable line."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # nothing left after `start`: the .part file is longer than the file
            return err
        raise CheckpointError(f"could not download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise CheckpointError(f"could not reach {url} ({first_line(getattr(err, 'reason', err))}); check the "
                              "network connection, or set IGPT_OPENAI_URL to a mirror") from None


def total_length(response, start: int) -> int | None:
    """The whole file's length in bytes, from Content-Range (a resumed download) or Content-Length."""
    content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", content_range.strip())
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return int(length) + (start if response.status == 206 else 0) if length is not None else None


def download(url: str, path: str | Path, bar=None) -> Path:
    """Fetch url into path (kept if already complete), resuming a `.part` left by an interrupted run.

    bar: a tqdm progress bar counting bytes (its total grows as each file's length becomes known).
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(path)
    start = part.stat().st_size if part.is_file() else 0
    response = open_url(url, start)
    with response:
        if response.status == 416:
            total = total_length(response, 0)
            if total != start:  # a .part longer than the file: it is not this file's beginning
                part.unlink()
                raise CheckpointError(f"{part} did not match {url} and was removed; run the same command again")
        else:
            if response.status != 206:  # the server sent the whole file: start over
                start = 0
            total = total_length(response, start)
            if bar is not None:
                bar.total = (bar.total or 0) + (total or 0) - start
                bar.refresh()
            copy_body(response, part, start, url, total, bar)
    size = part.stat().st_size
    if total is not None and size != total:
        raise CheckpointError(f"the download of {url} stopped after {size} of {total} bytes; run the same command "
                              "again to resume it")
    os.replace(part, path)
    return path


def copy_body(response, part: Path, start: int, url: str, total: int | None, bar) -> None:
    """Write the response body to `part` (appending after `start` bytes, or from scratch)."""
    with open(part, "r+b" if start else "wb") as f:
        f.seek(start)
        f.truncate()
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            f.flush()
            raise CheckpointError(f"the download of {url} stopped after {f.tell()} of {total or '?'} bytes "
                                  f"({first_line(err)}); run the same command again to resume it") from None
