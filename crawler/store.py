"""Image files: OUTPUT/<shard>/<image_name>, written atomically (temporary name, rename).

A reader never sees a truncated image under its final name: bytes go to a hidden temporary
file in the same directory, which is renamed over the final name once complete. Leftover
temporary files of a killed worker start with '.' and are removed by :func:`sweep_temporary`.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import aiofiles
import aiofiles.os

TMP_PREFIX = ".tmp-"


class Store:
    def __init__(self, output: Path) -> None:
        self.output = output
        self._made: set[str] = set()

    def relative(self, shard: str, name: str) -> str:
        return f"{shard}/{name}"

    def path(self, shard: str, name: str) -> Path:
        return self.output / shard / name

    async def exists(self, shard: str, name: str) -> bool:
        return await aiofiles.os.path.isfile(self.path(shard, name))

    async def read(self, shard: str, name: str) -> bytes:
        async with aiofiles.open(self.path(shard, name), "rb") as fh:
            return await fh.read()

    async def write(self, shard: str, name: str, data: bytes) -> str:
        """Write atomically; returns the path relative to the output directory."""
        directory = self.output / shard
        if shard not in self._made:
            await aiofiles.os.makedirs(directory, exist_ok=True)
            self._made.add(shard)
        final = directory / name
        tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            async with aiofiles.open(tmp, "wb") as fh:
                await fh.write(data)
            await aiofiles.os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.relative(shard, name)


def sweep_temporary(directory: Path, older_than_s: float = 600.0) -> int:
    """Remove temporary files left by killed writers; returns how many.

    Only files older than older_than_s go: a live writer's file is seconds old.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    limit = time.time() - older_than_s
    for path in directory.glob(f"{TMP_PREFIX}*"):
        try:
            if path.stat().st_mtime > limit:
                continue
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
