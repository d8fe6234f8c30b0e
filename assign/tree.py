"""The output tree: where the corpus lives, a local directory or a bucket prefix.

``paths.output`` is a directory or ``s3://bucket/prefix`` (S3 or an S3-compatible server; the
endpoint, region and credentials come the usual way, from ``AWS_*`` variables). Everything the
assignment worker, the dataset index, the dataset API and export read or write under it goes
through a ``Tree``, by name relative to the output (``_shards/<shard>.jsonl``), so each of them
has one code path for both.

A file appears whole or not at all under its name: locally a temporary file renamed over it,
in a bucket a single PUT (a multipart upload for a large file, which becomes visible only when
completed). ``Stat.tag`` changes when the content does: the modification time locally, the
ETag in a bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import obstore
import obstore.exceptions

from assign.shardio import discard_leftovers, fsync_directory, temp_path, write_atomically

S3_SCHEME = "s3://"

# What obstore raises for a request that failed (a missing object is also FileNotFoundError).
StorageError = obstore.exceptions.BaseError


@dataclass(frozen=True)
class Stat:
    size: int
    tag: str


class Changed(Exception):
    """A file is not the size its reader expected: it was replaced meanwhile."""


class Tree(Protocol):
    location: str  # the output as configured, for messages

    def url(self, name: str) -> str:
        """Where a file is, for a person or a record: a path or an s3:// URL."""

    def path(self, name: str) -> Path | None:
        """The file on local disk (None in a bucket)."""

    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError if there is none."""

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        """The whole file and its ``Stat.tag``, in one read."""

    def read_range(self, name: str, start: int, length: int, size: int | None = None) -> bytes:
        """``length`` bytes from ``start``; Changed if the file is not ``size`` bytes long."""

    def stat(self, name: str) -> Stat | None: ...

    def list(self, directory: str) -> dict[str, Stat]:
        """The files directly in ``directory`` (names without it), hidden ones left out."""

    def write(self, name: str, data: bytes, *, durable: bool = True) -> None: ...

    def staging(self, name: str) -> Path:
        """A local file to build ``name`` in, then hand to ``publish``."""

    def publish(self, name: str, built: Path) -> None:
        """Make the finished local file ``built`` the file ``name`` (it is consumed)."""

    def fetch(self, name: str) -> contextlib.AbstractContextManager[Path]:
        """The file as a local file while the context lasts: itself on local disk, else a
        downloaded copy (removed afterwards)."""

    def discard(self, name: str) -> int:
        """Remove what killed builders of ``name`` left locally; returns how many."""

    def delete(self, name: str) -> None:
        """Remove a file; one that is not there is fine."""


def is_bucket(output: str) -> bool:
    return output.startswith(S3_SCHEME)


def open_file(location: str) -> tuple[Tree, str]:
    """The tree of a file's directory, and its name there (a path or an s3:// URL)."""
    if is_bucket(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        return BucketTree(parent), name
    path = Path(location)
    return LocalTree(path.parent), path.name


def open_tree(output: str, scratch: Path | None = None) -> Tree:
    """The tree of ``output``; ``scratch`` (a bucket's only): where files are built locally
    before they are uploaded (default: the system's temporary directory)."""
    if is_bucket(output):
        return BucketTree(output, scratch)
    return LocalTree(Path(output))


class LocalTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        with open(self.root / name, "rb") as fh:
            return fh.read(), str(os.fstat(fh.fileno()).st_mtime_ns)

    def read_range(self, name: str, start: int, length: int, size: int | None = None) -> bytes:
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            if size is not None and os.fstat(fd).st_size != size:
                raise Changed(name)
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def stat(self, name: str) -> Stat | None:
        try:
            st = (self.root / name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Stat(st.st_size, str(st.st_mtime_ns))

    def list(self, directory: str) -> dict[str, Stat]:
        out: dict[str, Stat] = {}
        try:
            entries = list(os.scandir(self.root / directory))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for entry in entries:
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file():
                    st = entry.stat()
                    out[entry.name] = Stat(st.st_size, str(st.st_mtime_ns))
        return out

    def write(self, name: str, data: bytes, *, durable: bool = True) -> None:
        write_atomically(self.root / name, data, durable=durable)

    def staging(self, name: str) -> Path:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return temp_path(target)

    def publish(self, name: str, built: Path) -> None:
        target = self.root / name
        with open(built, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(built, target)
        fsync_directory(target.parent)

    @contextlib.contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        yield self.root / name

    def discard(self, name: str) -> int:
        return discard_leftovers(self.root / name)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class BucketTree:
    """A prefix of a bucket, through obstore (one client, thread-safe, with its own retries
    of 5xx and throttling answers)."""

    def __init__(self, url: str, scratch: Path | None = None) -> None:
        from obstore.store import S3Store

        self.location = url.rstrip("/")
        self.store: Any = S3Store.from_url(self.location)
        # one scratch directory per bucket prefix: builders of other outputs are left alone
        place = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.scratch = (scratch or Path(tempfile.gettempdir())) / f"mmc4-{place}"

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def path(self, name: str) -> None:
        return None

    def read(self, name: str) -> bytes:
        return bytes(obstore.get(self.store, name).bytes())

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        got = obstore.get(self.store, name)
        return bytes(got.bytes()), str(got.meta["e_tag"])

    def read_range(self, name: str, start: int, length: int, size: int | None = None) -> bytes:
        got = obstore.get(self.store, name, options={"range": (start, start + length)})
        if size is not None and got.meta["size"] != size:
            raise Changed(name)
        return bytes(got.bytes())

    def stat(self, name: str) -> Stat | None:
        try:
            meta = obstore.head(self.store, name)
        except FileNotFoundError:
            return None
        return Stat(int(meta["size"]), str(meta["e_tag"]))

    def list(self, directory: str) -> dict[str, Stat]:
        prefix = directory.strip("/") + "/" if directory.strip("/") else ""
        out: dict[str, Stat] = {}
        for batch in obstore.list(self.store, prefix or None):
            for meta in batch:
                name = meta["path"][len(prefix) :]
                if name and "/" not in name and not name.startswith("."):
                    out[name] = Stat(int(meta["size"]), str(meta["e_tag"]))
        return out

    def write(self, name: str, data: bytes, *, durable: bool = True) -> None:
        obstore.put(self.store, name, data)

    def _scratch_name(self, name: str) -> Path:
        """Where ``name`` is built: named after it, as ``temp_path`` names local ones."""
        return self.scratch / name.replace("/", "__")

    def staging(self, name: str) -> Path:
        self.scratch.mkdir(parents=True, exist_ok=True)
        return temp_path(self._scratch_name(name))

    @contextlib.contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        copy = self.staging(name)
        try:
            with open(copy, "wb") as out:
                for chunk in obstore.get(self.store, name).stream(min_chunk_size=1 << 20):
                    out.write(chunk)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def discard(self, name: str) -> int:
        return discard_leftovers(self._scratch_name(name))

    def publish(self, name: str, built: Path) -> None:
        try:
            obstore.put(self.store, name, built)
        finally:
            built.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self.store, name)
