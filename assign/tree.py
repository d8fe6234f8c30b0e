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
from typing import Protocol

import obstore

from core.config import StorageConfig
from core.safefs import discard_leftovers, fsync_directory, temp_path, write_file
from core.storage import S3Storage, is_remote


@dataclass(frozen=True)
class Stat:
    size: int
    tag: str


class Changed(Exception):
    """A file is not the size its reader expected: it was replaced meanwhile."""


class Tree(Protocol):
    location: str  # the output as configured, for messages
    settings: StorageConfig  # a bucket's client settings (files it names are opened alike)

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


def open_file(location: str, settings: StorageConfig | None = None) -> tuple[Tree, str]:
    """The tree of a file's directory, and its name there (a path or an s3:// URL)."""
    if is_remote(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        return BucketTree(parent, settings), name
    path = Path(location)
    return LocalTree(path.parent), path.name


def open_tree(output: str, settings: StorageConfig | None = None) -> Tree:
    """The tree of ``output``, a directory or s3://bucket/prefix (``settings``: the bucket's
    client; files are built locally, in the system's temporary directory, then uploaded)."""
    if is_remote(output):
        return BucketTree(output, settings)
    return LocalTree(Path(output))


class LocalTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self.settings = StorageConfig()

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
        write_file(self.root / name, data, durable=durable)

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
    """A prefix of a bucket: the client, its retries and its one-line errors are those of
    ``core.storage.S3Storage``; this adds what the corpus's larger files need (ranges,
    sizes and tags, uploads from and downloads to a local file)."""

    def __init__(self, url: str, settings: StorageConfig | None = None) -> None:
        self.settings = settings or StorageConfig()
        self.storage = S3Storage(url, self.settings)
        self.store = self.storage.store
        self.location = self.storage.location
        # one scratch directory per bucket prefix: builders of other outputs are left alone
        place = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.scratch = Path(tempfile.gettempdir()) / f"mmc4-{place}"

    @contextlib.contextmanager
    def _request(self, name: str) -> Iterator[None]:
        """obstore's failures as core.storage's: FileNotFoundError or a one-line
        StorageError naming the object."""
        try:
            yield
        except Exception as exc:
            raise self.storage.failure(exc, name) from None

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def path(self, name: str) -> None:
        return None

    def read(self, name: str) -> bytes:
        with self._request(name):
            return obstore.get(self.store, name).bytes().to_bytes()

    def read_tagged(self, name: str) -> tuple[bytes, str]:
        with self._request(name):
            got = obstore.get(self.store, name)
            return got.bytes().to_bytes(), str(got.meta["e_tag"])

    def read_range(self, name: str, start: int, length: int, size: int | None = None) -> bytes:
        with self._request(name):
            got = obstore.get(self.store, name, options={"range": (start, start + length)})
            if size is not None and got.meta["size"] != size:
                raise Changed(name)
            return got.bytes().to_bytes()

    def stat(self, name: str) -> Stat | None:
        try:
            with self._request(name):
                meta = obstore.head(self.store, name)
        except FileNotFoundError:
            return None
        return Stat(int(meta["size"]), str(meta["e_tag"]))

    def list(self, directory: str) -> dict[str, Stat]:
        prefix = directory.strip("/") + "/" if directory.strip("/") else ""
        out: dict[str, Stat] = {}
        with self._request(directory):
            for batch in obstore.list(self.store, prefix or None, chunk_size=1000):
                for meta in batch:
                    name = meta["path"][len(prefix) :]
                    if name and "/" not in name and not name.startswith("."):
                        out[name] = Stat(int(meta["size"]), str(meta["e_tag"]))
        return out

    def write(self, name: str, data: bytes, *, durable: bool = True) -> None:
        with self._request(name):
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
            with self._request(name), open(copy, "wb") as out:
                for chunk in obstore.get(self.store, name).stream(min_chunk_size=1 << 20):
                    out.write(chunk)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def discard(self, name: str) -> int:
        return discard_leftovers(self._scratch_name(name))

    def publish(self, name: str, built: Path) -> None:
        """One PUT, or a multipart upload for a large file: either way the object appears
        only when whole (an abandoned multipart upload is never visible; a bucket lifecycle
        rule removes its parts)."""
        try:
            with self._request(name):
                obstore.put(self.store, name, built)
        finally:
            built.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        try:
            with self._request(name):
                obstore.delete(self.store, name)
        except FileNotFoundError:
            pass
