"""Images: OUTPUT/<shard>/<image_name>, each whole or not at all, on disk or in a bucket.

On disk (`core.storage.LocalStorage`), bytes go to a hidden temporary file in the shard's
directory, renamed over the final name once complete; leftover temporary files of a killed
worker start with '.' and are removed by :func:`sweep_temporary`. The image work and the write
happen in the same pool process (:func:`shrink_and_store`): image bytes cross between
processes once (the response body, to the pool) and only the record's fields come back.

In a bucket (`core.storage.S3Storage`), the pool process shrinks (:func:`shrink_for_upload`)
and hands the bytes back; the worker's event loop uploads them in one PUT (`Store.finish`), at
most ``storage.max_inflight`` at once, so no image process waits on the network and no half
object ever has the final name.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from core import safefs
from core.status import OK, STATUS_DIR, WRITE_ERROR, Status
from core.storage import Storage
from crawler import images
from crawler.images import ImageResult, ImageSettings

log = logging.getLogger(__name__)
TMP_PREFIX = safefs.TMP_PREFIX
# Not a terminal status: the image was fine but the output refused it (see UNWRITABLE_ERRNOS).
OUTPUT_UNWRITABLE = Status("output_unwritable")
# Errors that say the output as a whole cannot take files now, whatever the image.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
# Shards whose stored names a bucket-backed Store keeps from its one listing of each.
LISTED_SHARDS = 64


class Store:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.output = storage.location
        self.remote = storage.remote
        # Shards that had nothing stored when this Store first looked: every image in them
        # was written since, by this crawl, so none is "stored by an earlier run".
        self._new_shards: set[str] = set()
        # (bucket) the names each shard had when first listed, most recent last
        self._listed: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()

    def relative(self, shard: str, name: str) -> str:
        return f"{shard}/{name}"

    def target(self, shard: str, name: str) -> Target:
        return (self.output, shard, name)

    @property
    def image_job(self) -> Callable[[bytes, ImageSettings, Target], ImageResult]:
        """The pool job for a downloaded image: shrink and write (disk), or shrink and hand
        the bytes back for `finish` to upload (bucket)."""
        return shrink_for_upload if self.remote else shrink_and_store

    def all_new(self, shards: Iterable[str]) -> bool:
        """Whether every one of these shards is known to have had nothing stored when first
        looked at: then `on_disk` is all False without asking the storage."""
        return all(shard in self._new_shards for shard in shards)

    async def stored_before(self, items: list[tuple[str, str]]) -> list[bool]:
        """`on_disk` of a batch, from the event loop: one thread hop per batch, none once every
        shard of the batch is known to have had nothing stored (`all_new`)."""
        if self.all_new(shard for shard, _ in items):
            return [False] * len(items)
        return await asyncio.to_thread(self.on_disk, items)

    def on_disk(self, items: Iterable[tuple[str, str]]) -> list[bool]:
        """For each (shard, name): was it stored before this crawl started? (Blocking: call
        it in a thread, once for a whole batch of items.) A bucket is listed once per shard
        (no request per image); the names are kept for the last LISTED_SHARDS shards."""
        if self.remote:
            return [name in self._names_before(shard) for shard, name in items]
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

    def _names_before(self, shard: str) -> frozenset[str]:
        if shard in self._new_shards:
            return frozenset()
        names = self._listed.get(shard)
        if names is None:
            try:
                names = frozenset(self.storage.names_sync(shard))
            except OSError as exc:
                # Unknown this time (asked again for the next batch): the images are fetched
                # and stored again, under the same names, or handed back if the bucket
                # refuses the upload too.
                log.warning("cannot list %s: %s", self.storage.url(shard), exc)
                return frozenset()
            if not names:
                self._new_shards.add(shard)
                return names
            self._listed[shard] = names
            while len(self._listed) > LISTED_SHARDS:
                self._listed.popitem(last=False)
        self._listed.move_to_end(shard)
        return names

    async def finish(self, shard: str, name: str, img: ImageResult) -> ImageResult:
        """The result of `image_job` once stored: a bucket's upload happens here (a failed
        one, after its retries, is OUTPUT_UNWRITABLE: the item goes back to the queue and
        the worker pauses until the output takes a probe again)."""
        if not self.remote or img.status != OK or img.data is None:
            return img
        try:
            await self.storage.put(f"{shard}/{name}", img.data)
        except OSError as exc:
            return dataclasses.replace(img, status=OUTPUT_UNWRITABLE, error=str(exc), data=None)
        return dataclasses.replace(img, data=None)

    async def stored_bytes(self, shard: str, name: str) -> bytes | None:
        """(bucket) The bytes an earlier run stored, or None when there are none or they
        cannot be read now (then the image is fetched and stored again)."""
        try:
            return await self.storage.get(f"{shard}/{name}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", self.storage.url(f"{shard}/{name}"), exc)
            return None


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


def _shrink(data: bytes, settings: ImageSettings, target: Target) -> tuple[ImageResult, bytes]:
    """The checked and shrunk image, and the bytes to store (b"" unless status ok)."""
    problem = check_target(target[1], target[2])
    if problem:
        return ImageResult(WRITE_ERROR, "", f"refused: {problem}"), b""
    img = images.process_image(data, settings)
    if img.status != OK:
        return img, b""
    return img, data if img.keep_original else (img.data or b"")


def shrink_and_store(data: bytes, settings: ImageSettings, target: Target) -> ImageResult:
    """Pool job: check and shrink a downloaded image, then write what is kept to `target`.

    The result carries no image bytes (`stored_bytes` says how many were written); a failed
    write, or a target outside the output (`check_target`), is status WRITE_ERROR with
    the reason.
    """
    img, out = _shrink(data, settings, target)
    if img.status != OK:
        return img
    try:
        safefs.write(*target, out)  # (checked above)
    except OSError as exc:
        # A full or read-only output is the machine's problem, not the image's: no record
        # (the worker pauses and hands the item back); anything else is this image's.
        st = OUTPUT_UNWRITABLE if exc.errno in UNWRITABLE_ERRNOS else WRITE_ERROR
        return dataclasses.replace(img, status=st, error=str(exc), data=None)
    return dataclasses.replace(img, data=None, stored_bytes=len(out))


def shrink_for_upload(data: bytes, settings: ImageSettings, target: Target) -> ImageResult:
    """Pool job: check and shrink a downloaded image; `data` of the result is what to
    upload (`Store.finish`)."""
    img, out = _shrink(data, settings, target)
    if img.status != OK:
        return img
    return dataclasses.replace(img, data=out, stored_bytes=len(out))


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
    return verify_bytes(data, settings)


def verify_bytes(data: bytes, settings: ImageSettings) -> ImageResult | None:
    """Pool job: the result for the bytes of an image an earlier run stored, or None when
    they are not a valid image."""
    img = images.process_image(data, settings)
    if img.status != OK:
        return None
    if img.keep_original:
        return dataclasses.replace(img, data=None, stored_bytes=len(data))
    # Valid, but this pipeline would store it differently (say, 16-bit): describe the file.
    return dataclasses.replace(
        img, data=None, stored_bytes=len(data), stored_mimetype=img.mimetype,
        sha256=hashlib.sha256(data).hexdigest(), keep_original=True,
    )  # fmt: skip


def output_problem(storage: Storage) -> str:
    """Why files cannot be written to the output now ("" when they can): a probe is written
    (durably) and removed in its report directory. (Blocking: call it in a thread.)"""
    return storage.problem_sync(STATUS_DIR)


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
