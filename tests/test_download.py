"""The one downloader (igpt_core.download) against a local HTTP server: the cases that the dataset
(test_data.py) and checkpoint (test_openai_import.py) downloads do not reach."""

from __future__ import annotations

import hashlib

import pytest

from igpt_core.download import byte_bar, download
from igpt_core.errors import CheckpointError

BLOB = bytes(range(256)) * 40  # 10 KB whose halves differ


def test_a_complete_part_is_named_without_fetching_it_again(tmp_path, serve_files):
    server = serve_files({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB)  # a crash after the last byte, before the rename
    path = download(f"{server.url}/f.bin", tmp_path / "f.bin", md5=hashlib.md5(BLOB).hexdigest())
    assert path.read_bytes() == BLOB and not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("/f.bin", f"bytes={len(BLOB)}-")]  # answered 416: nothing left to send


def test_a_part_longer_than_the_file_is_removed(tmp_path, serve_files):
    server = serve_files({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB + b"more")  # not this file's beginning
    with pytest.raises(CheckpointError, match=r"f\.bin\.part did not match .* and was removed; run the same command"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", error=CheckpointError)  # raised as the caller's class
    assert list(tmp_path.iterdir()) == []
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin").read_bytes() == BLOB


def test_a_server_without_ranges_restarts_from_scratch(tmp_path, serve_files):
    server = serve_files({"/f.bin": BLOB})
    server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(BLOB[:100])
    with byte_bar(True, "f.bin") as bar:
        download(f"{server.url}/f.bin", tmp_path / "f.bin", bar=bar)
        assert (bar.n, bar.total) == (len(BLOB), len(BLOB))  # the whole file counted once
    assert (tmp_path / "f.bin").read_bytes() == BLOB and not (tmp_path / "f.bin.part").exists()
    assert server.requests == [("/f.bin", "bytes=100-")]


def test_an_existing_file_is_kept_and_nothing_is_fetched(tmp_path, serve_files):
    server = serve_files({"/f.bin": BLOB})
    (tmp_path / "f.bin").write_bytes(b"mine")
    assert download(f"{server.url}/f.bin", tmp_path / "f.bin").read_bytes() == b"mine"
    assert server.requests == []


def test_an_unreachable_server_is_one_line_with_the_callers_advice(tmp_path, serve_files):
    server = serve_files({})
    url = server.url
    server.shutdown()
    server.server_close()  # nothing listens on that port now
    with pytest.raises(CheckpointError) as err:
        download(f"{url}/f.bin", tmp_path / "f.bin", advice="Try a mirror", error=CheckpointError)
    message = str(err.value)
    assert message.startswith(f"the download of {url}/f.bin failed (") and message.endswith(
        "; check the network connection. Try a mirror") and "\n" not in message
    assert list(tmp_path.iterdir()) == []
