"""Shard files: streaming input (.jsonl, .jsonl.gz, .jsonl.zip) and crash-safe output.

Output goes to a temporary file in the destination directory, is fsynced, then renamed over the
destination and the directory fsynced: after a kill -9 at any moment the destination holds the
old file or the new one, whole. Temporary files are named ``.<name>.<pid>.<random>.tmp`` so that
a later run can recognise and discard what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import orjson

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zip")
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
WRITE_BUFFER = 1 << 20


def is_shard_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(SHARD_SUFFIXES)


def output_name(source: str) -> str:
    """``docs_shard_0_v2.jsonl.zip`` -> ``docs_shard_0_v2.jsonl``: the rewritten shard's name."""
    name = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".gz", ".zip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name.endswith(".jsonl") else f"{name}.jsonl"


@contextlib.contextmanager
def open_lines(path: Path) -> Iterator[io.BufferedIOBase]:
    """A binary stream of the shard's jsonl text, whatever its compression (sniffed)."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic.startswith(_GZIP_MAGIC):
        with gzip.GzipFile(path, "rb") as gz:
            yield gz
    elif magic == _ZIP_MAGIC:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise ValueError(f"{path}: empty zip archive")
            # MMC4's zipped shards hold one jsonl; like the reference, read the first member.
            with archive.open(members[0]) as member:
                yield cast(io.BufferedIOBase, member)  # a ZipExtFile
    else:
        with open(path, "rb", buffering=WRITE_BUFFER) as plain:
            yield cast(io.BufferedReader, plain)


def temp_path(destination: Path) -> Path:
    token = secrets.token_hex(4)
    return destination.with_name(f".{destination.name}.{os.getpid()}.{token}.tmp")


def discard_leftovers(destination: Path) -> int:
    """Remove temporary files a killed run left for ``destination``; returns how many."""
    removed = 0
    for leftover in destination.parent.glob(f".{destination.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_writer(destination: Path, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write ``destination`` all at once: temp file, fsync, rename, fsync the directory.
    Not ``durable``: no fsync (a kill -9 still leaves the old file or the new one; a power
    loss may leave either, or an empty or partial file: only for files checked when read)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(destination)
    try:
        with open(temp, "wb", buffering=WRITE_BUFFER) as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(temp, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    if durable:
        fsync_directory(destination.parent)


def write_atomically(destination: Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_writer(destination, durable=durable) as out:
        out.write(data)


def read_object(path: Path) -> dict[str, Any] | None:
    """The JSON object ``write_atomically`` left at ``path``; None if there is none."""
    try:
        data = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
