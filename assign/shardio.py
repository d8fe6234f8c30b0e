"""Crash-safe output files.

Output goes to a temporary file in the destination directory, is fsynced, then renamed over the
destination and the directory fsynced: after a kill -9 at any moment the destination holds the
old file or the new one, whole. Temporary files are named ``.<name>.<pid>.<random>.tmp`` so that
a later run can recognise and discard what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

WRITE_BUFFER = 1 << 20


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
