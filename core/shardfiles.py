"""Shard files, one module for the crawl's ingest and the assignment worker: the suffixes a
shard file has, shard ids and image names (which become directory, file and Redis key names),
streaming a shard's lines whatever its compression, and downloading a remote shard through
the crawl's guarded HTTP client (core.fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import re
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiofiles

from core.config import Config

# A shard is JSON Lines, plain, gzipped or zipped (one member); the longest suffix first.
SHARD_SUFFIXES = (".jsonl.gz", ".jsonl.zip", ".jsonl")
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
MAX_NAME_BYTES = 255
# Shard ids become directory and report file names (`<shard>.summary.json`, temporary
# names with a suffix): well under the 255-byte name limit of common file systems.
MAX_SHARD_ID_BYTES = 200

READ_CHUNK = 1 << 20


class ShardMissing(Exception):
    """A shard source does not exist (404/410, or no such file)."""


class ShardUnreadable(Exception):
    """A shard cannot be read (to its end). ``kind`` names the error as counted."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.sealed = False  # what was read before it is enqueued and the shard sealed


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _url_path(url: str) -> str:
    try:
        return urlsplit(url).path
    except ValueError:  # unparseable (a broken IPv6 host...): its download says so
        return url.split("#", 1)[0].split("?", 1)[0]


def shard_id(location: str) -> str:
    """The file name of a path or URL without its shard suffix. For a URL the name comes from
    the path alone (query and fragment removed first)."""
    path = _url_path(location) if is_remote(location) else location
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_shard_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(SHARD_SUFFIXES)


def output_name(source: str) -> str:
    """``docs_shard_0_v2.jsonl.zip`` -> ``docs_shard_0_v2.jsonl``: the rewritten shard's name."""
    return f"{shard_id(source)}.jsonl"


def check_shard_id(shard: str) -> str | None:
    """Why a shard id is unusable as a directory name and a Redis key, or None."""
    if not shard or shard.startswith((".", "_")):
        return f"shard id {shard!r} must not be empty or start with '.' or '_'"
    if "/" in shard or "\\" in shard or _NAME_CONTROL.search(shard):
        return f"shard id {shard!r} contains a path separator or control character"
    try:
        size = len(shard.encode("utf-8"))
    except UnicodeEncodeError:
        return f"shard id {shard!r} is not valid UTF-8"
    if size > MAX_SHARD_ID_BYTES:
        return f"shard id is longer than {MAX_SHARD_ID_BYTES} bytes"
    return None


# Searched in C: a generator over every character of every name and URL was a third of
# ingest's CPU (cProfile).
_NAME_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_image_name(name: Any) -> str | None:
    """Why an image_name cannot be a plain file name under the shard directory, or None."""
    if not isinstance(name, str):
        return f"image_name is not a string: {name!r}"
    if not name:
        return "image_name is empty"
    if "/" in name or "\\" in name:
        return f"image_name {name!r} contains a path separator"
    if name.startswith("."):
        return f"image_name {name!r} starts with '.'"
    if _NAME_CONTROL.search(name):
        return f"image_name {name!r} contains a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return "image_name is longer than 255 bytes"
    return None


@contextlib.asynccontextmanager
async def local_copy(location: str, cfg: Config) -> AsyncIterator[Path]:
    """The shard at `location` as a local file: itself, or a temporary download of a remote
    shard."""
    if not is_remote(location):
        path = Path(location)
        if not path.is_file():
            raise ShardMissing(f"{location}: no such file")
        yield path
        return
    tmp_dir = Path(cfg.paths.data_dir) / "downloads"
    url_path = _url_path(location)
    suffix = next((s for s in SHARD_SUFFIXES if url_path.endswith(s)), ".jsonl")
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
    except OSError as exc:
        raise ShardUnreadable(
            "unreadable_shard", f"no temporary copy in {tmp_dir} (paths.data_dir): {exc}"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        await download(location, tmp, cfg)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


async def download(url: str, dest: Path, cfg: Config) -> None:
    """Download a shard to `dest` through the crawl's guarded HTTP client (the same address
    checks as image fetches, on every redirect hop), within ingest.download_timeout_s and
    ingest.max_download_bytes.

    Raises ShardMissing (404, 410) or ShardUnreadable (any other failure).
    """
    # aiohttp is imported only for shards named by URL: `run` and `ingest` on local shards
    # start without it (~0.1-0.2 s of CPU).
    import aiohttp

    from core import fetch, session

    cap = cfg.ingest.max_download_bytes
    try:
        async with (
            asyncio.timeout(cfg.ingest.download_timeout_s),
            session.client_session(cfg.fetch, 4) as http,
            fetch.Fetcher(cfg.fetch, http, 4).stream(url) as resp,
        ):
            if resp.status in (404, 410):
                raise ShardMissing(f"{url}: HTTP {resp.status}")
            if resp.status != 200:
                raise ShardUnreadable("unreadable_shard", f"{url}: HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > cap:
                raise ShardUnreadable(
                    "download_too_large", f"{url}: Content-Length {resp.content_length} > {cap}"
                )
            size = 0
            async with aiofiles.open(dest, "wb") as fh:  # 100s of MB: keep the loop free
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    size += len(chunk)
                    if size > cap:
                        raise ShardUnreadable("download_too_large", f"{url}: more than {cap} bytes")
                    await fh.write(chunk)
    except TimeoutError:
        raise ShardUnreadable(
            "unreadable_shard", f"{url}: not downloaded within {cfg.ingest.download_timeout_s} s"
        ) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # BlockedAddress is an OSError
        raise ShardUnreadable("unreadable_shard", f"{url}: {exc}") from exc


def download_blocking(url: str, dest: Path, cfg: Config) -> None:
    """`download` for a caller in a thread of its own (the assignment rewrite)."""
    asyncio.run(download(url, dest, cfg))


@contextlib.contextmanager
def open_lines(path: Path) -> Iterator[io.BufferedIOBase]:
    """A binary stream of the shard's jsonl text: gzip or zip when its name or its first bytes
    say so, else plain. Decoding errors are the decompressors' (OSError, EOFError,
    zlib.error, zipfile.BadZipFile...); a zip without members is a ValueError."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if path.name.endswith(".gz") or magic.startswith(_GZIP_MAGIC):
        with gzip.GzipFile(path, "rb") as gz:
            yield gz
    elif path.name.endswith(".zip") or magic == _ZIP_MAGIC:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise ValueError(f"{path}: zip archive has no members")
            # MMC4's zipped shards hold one jsonl; like the reference, read the first member.
            with archive.open(members[0]) as member:
                # a zip member's own readline(limit) steps 512 bytes at a time in Python; a
                # buffer's is C. Small, so that damage loses little of what precedes it.
                yield io.BufferedReader(cast(io.RawIOBase, member), buffer_size=1 << 16)
    else:
        with open(path, "rb", buffering=READ_CHUNK) as plain:
            yield cast(io.BufferedReader, plain)
