"""Files under a root directory that names from outside (Redis, shards) cannot lead out of.

Every file the crawl writes is ``<root>/<directory>/<name>``: an image under its shard's
directory, a report under ``_status``. Both parts are single path components (`check_part`:
no separator, no NUL, not ``.``/``..``, no leading ``.``, at most 255 bytes), the directory is
opened relative to the root without following a symbolic link (``O_NOFOLLOW``), and files are
created in it by descriptor (``openat``): a temporary name opened ``O_CREAT | O_EXCL |
O_NOFOLLOW``, then renamed over the final name (a rename replaces a link, never follows it).
The root itself is the operator's and may be a link.

Opened directories are kept per process (a few dozen at most; one removed since is opened
anew), so an image costs one file creation and one rename, as a plain path-based write does.

`write_file` writes a path the operator names (the assignment worker's rewritten shards,
reports and index files) the same way, its temporary file named after the destination
(``.<name>.<pid>.<random>.tmp``, `temp_path`) so that a later run can discard what a killed
one left (`discard_leftovers`). Durable writes fsync the file before the rename and the
directory after it: after a kill -9 or a power loss the name holds the old file or the new
one, whole.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import secrets
import uuid
from pathlib import Path

MAX_PART_BYTES = 255
TMP_PREFIX = ".tmp-"  # temporary files: `.tmp-<pid>-<random>-<n>`, swept when left over
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_KEEP_DIRS = 32
WRITE_BUFFER = 1 << 20  # buffered writes of big files (rewritten shards, exports)


class UnsafePath(OSError):
    """A directory or file name that is not one plain component under the root, or a
    symbolic link where a directory must be."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


def check_part(part: str) -> str | None:
    """Why `part` cannot be one directory or file name under a root, or None."""
    if not part or part in (".", ".."):
        return f"{part!r} is not a name"
    if "/" in part or "\\" in part or "\0" in part:
        return f"{part!r} contains a path separator or NUL"
    if part.startswith("."):
        return f"{part!r} starts with '.'"
    if len(part.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES:
        return f"{part[:40]!r}... is longer than {MAX_PART_BYTES} bytes"
    return None


_dirs: collections.OrderedDict[tuple[int, str, str], int] = collections.OrderedDict()
_tmp_names = itertools.count()
_tag: tuple[int, str] | None = None


def process_tag() -> str:
    """The pid and a random part, fixed per process (a forked child gets its own)."""
    global _tag
    if _tag is None or _tag[0] != os.getpid():
        _tag = (os.getpid(), uuid.uuid4().hex[:8])
        _dirs.clear()  # descriptors of the parent are not this process's to cache
    return f"{_tag[0]}-{_tag[1]}"


def open_dir(root: str, directory: str, *, create: bool = True) -> int:
    """A descriptor of ``root/directory`` (created if missing and `create`), never through a
    link. Cached: do not close it."""
    process_tag()
    key = (os.getpid(), root, directory)
    fd = _dirs.get(key)
    if fd is not None:
        if os.fstat(fd).st_nlink > 0:  # (0: removed since; open it again, anew)
            _dirs.move_to_end(key)
            return fd
        del _dirs[key]
        os.close(fd)
    problem = check_part(directory)
    if problem:
        raise UnsafePath(f"directory {problem}")
    if create:
        os.makedirs(root, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o755, dir_fd=root_fd)
        try:
            fd = os.open(directory, _DIR_FLAGS, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(f"{root}/{directory} is not a plain directory") from exc
            raise
    finally:
        os.close(root_fd)
    _dirs[key] = fd
    while len(_dirs) > _KEEP_DIRS:
        _key, old = _dirs.popitem(last=False)
        os.close(old)
    return fd


def write(root: str, directory: str, name: str, data: bytes, *, durable: bool = False) -> None:
    """Write `data` as ``root/directory/name``: a temporary file, then a rename (never a
    partial file under `name`). `durable`: fsync before the rename. Raises UnsafePath for a
    name that is not one plain component, and the OSError of a failed write."""
    problem = check_part(name)
    if problem:
        raise UnsafePath(f"file name {problem}")
    dir_fd = open_dir(root, directory)
    _replace(dir_fd, f"{TMP_PREFIX}{process_tag()}-{next(_tmp_names)}", name, data, durable)
    if durable:
        os.fsync(dir_fd)


def write_file(destination: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` as `destination` (a path the operator names; its directory is created):
    a temporary file beside it (`temp_path`), then a rename."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(destination.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace(dir_fd, temp_path(destination).name, destination.name, data, durable)
        if durable:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _replace(dir_fd: int, tmp: str, name: str, data: bytes, durable: bool) -> None:
    """`data` into a new file `tmp` (never an existing file or a link), then renamed over
    `name`, both in the directory `dir_fd`; no `tmp` is left behind by a failure."""
    try:
        fd = os.open(tmp, TMP_FLAGS, 0o644, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (signals, odd file systems)
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def temp_path(destination: Path) -> Path:
    """A new temporary name beside `destination`, named after it (see `discard_leftovers`)."""
    token = secrets.token_hex(4)
    return destination.with_name(f".{destination.name}.{os.getpid()}.{token}.tmp")


def discard_leftovers(destination: Path) -> int:
    """Remove the temporary files (`temp_path`) a killed run left for `destination`; returns
    how many."""
    removed = 0
    for leftover in destination.parent.glob(f".{destination.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(root: str, directory: str, name: str) -> bytes:
    """The bytes of ``root/directory/name``, refusing links (UnsafePath for bad names)."""
    problem = check_part(name)
    if problem:
        raise UnsafePath(f"file name {problem}")
    fd = os.open(name, _READ_FLAGS, dir_fd=open_dir(root, directory, create=False))
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
