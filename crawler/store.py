"""Image files: OUTPUT/<shard>/<image_name>, written atomically (temporary name, rename).

A reader never sees a truncated image under its final name: bytes go to a hidden temporary
file in the same directory, which is renamed over the final name once complete. Leftover
temporary files of a killed worker start with '.' and are removed by :func:`sweep_temporary`.

The image work and the write happen in the same pool process (:func:`shrink_and_store`,
:func:`verify_stored`): image bytes cross between processes once (the response body, to the
pool) and only the record's fields come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from core import safefs
from core.status import OK, STATUS_DIR, WRITE_ERROR
from crawler import images
from crawler.images import ImageResult, ImageSettings

TMP_PREFIX = safefs.TMP_PREFIX
# Not a terminal status: the image was fine but the output refused it (see UNWRITABLE_ERRNOS).
OUTPUT_UNWRITABLE = "output_unwritable"
# Errors that say the output as a whole cannot take files now, whatever the image.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
PROBE_BYTES = 64 << 10


class Store:
    def __init__(self, output: Path) -> None:
        self.output = output
        # Shards whose directory did not exist when this Store first looked: every file in
        # them was written since, by this crawl, so none is "on disk from an earlier run".
        self._new_shards: set[str] = set()

    def relative(self, shard: str, name: str) -> str:
        return f"{shard}/{name}"

    def all_new(self, shards: Iterable[str]) -> bool:
        """Whether every one of these shards is known to have had no directory when first
        looked at: then `on_disk` is all False without touching the file system."""
        return all(shard in self._new_shards for shard in shards)

    def on_disk(self, items: Iterable[tuple[str, str]]) -> list[bool]:
        """For each (shard, name): is a file there from before this crawl started? (Blocking:
        call it in a thread, once for a whole batch of items.)"""
        out: list[bool] = []
        dirs: dict[str, str | None] = {}  # shard -> its directory, None when it has none
        for shard, name in items:
            if shard not in dirs:
                shard_dir = f"{self.output}/{shard}"
                found = shard not in self._new_shards and os.path.isdir(shard_dir)
                if not found:
                    self._new_shards.add(shard)
                dirs[shard] = shard_dir if found else None
            where = dirs[shard]
            out.append(where is not None and os.path.isfile(f"{where}/{name}"))
        return out


Target = tuple[str, str, str]  # (output directory, shard, image name): what a pool job writes


def check_target(shard: str, name: str) -> str | None:
    """Why an image cannot be stored as OUTPUT/<shard>/<name>, or None: each part is one
    plain name (`safefs.check_part`), and shard ids starting with '_' are the crawl's own
    directories (`_status` and the like), never an image's."""
    problem = safefs.check_part(shard)
    if problem:
        return f"shard {problem}"
    if shard.startswith("_"):
        return f"shard {shard!r} starts with '_' (reserved for the crawl's own directories)"
    problem = safefs.check_part(name)
    return f"image name {problem}" if problem else None


def shrink_and_store(data: bytes, settings: ImageSettings, target: Target) -> ImageResult:
    """Pool job: check and shrink a downloaded image, then write what is kept to `target`.

    The result carries no image bytes (`stored_bytes` says how many were written); a failed
    write, or a target outside the output (`check_target`), is status "write_error" with
    the reason.
    """
    problem = check_target(target[1], target[2])
    if problem:
        return ImageResult(WRITE_ERROR, "", f"refused: {problem}")
    img = images.process_image(data, settings)
    if img.status != OK:
        return img
    out = data if img.keep_original else (img.data or b"")
    try:
        safefs.write(*target, out)  # (checked above)
    except OSError as exc:
        # A full or read-only output is the machine's problem, not the image's: no record
        # (the worker pauses and hands the item back); anything else is this image's.
        st = OUTPUT_UNWRITABLE if exc.errno in UNWRITABLE_ERRNOS else WRITE_ERROR
        return dataclasses.replace(img, status=st, error=str(exc), data=None)
    return dataclasses.replace(img, data=None, stored_bytes=len(out))


def verify_stored(target: Target, settings: ImageSettings) -> ImageResult | None:
    """Pool job: the result for a file an earlier run stored, or None when it is missing, not
    a valid image, or reached through a link (then it is fetched again)."""
    root, shard, name = target
    if check_target(shard, name):
        return None
    try:
        data = safefs.read(root, shard, name)
    except OSError:
        return None
    img = images.process_image(data, settings)
    if img.status != OK:
        return None
    if img.keep_original:
        return dataclasses.replace(img, stored_bytes=len(data))
    # Valid, but this pipeline would store it differently (say, 16-bit): describe the file.
    return dataclasses.replace(
        img, data=None, stored_bytes=len(data), stored_mimetype=img.mimetype,
        sha256=hashlib.sha256(data).hexdigest(), keep_original=True,
    )  # fmt: skip


def output_problem(output: Path) -> str:
    """Why files cannot be written under `output` now ("" when they can): a probe file of
    PROBE_BYTES is written, synced and removed in the output and in its report directory.
    (Blocking: call it in a thread.)"""
    for directory in (output, output / STATUS_DIR):
        probe = directory / f"{TMP_PREFIX}probe-{safefs.process_tag()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, safefs.TMP_FLAGS, 0o644)
            try:
                view = memoryview(bytes(PROBE_BYTES))
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return f"{directory}: {exc.strerror or exc}"
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return ""


def sweep_temporary(
    directory: Path, older_than_s: float = 600.0, pattern: str = f"{TMP_PREFIX}*"
) -> int:
    """Remove temporary files (named by `pattern`) left by killed or failed writers; returns
    how many.

    Only files older than older_than_s go: a live writer's file is seconds old.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    limit = time.time() - older_than_s
    for path in directory.glob(pattern):
        try:
            if path.stat().st_mtime > limit:
                continue
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
