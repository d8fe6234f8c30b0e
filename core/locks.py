"""Locks held while work runs: redis-py's `Lock` with a short TTL that its holder renews.

A holder that is killed stops renewing, so its lock lapses within one TTL and the next process
takes the work over; a live holder keeps it however long the work takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio.lock import Lock
from redis.exceptions import RedisError

from core.tasks import cancel_and_wait

log = logging.getLogger(__name__)


async def _renew(lock: Lock, ttl_s: float) -> None:
    while True:
        await asyncio.sleep(ttl_s / 3)
        try:
            await lock.extend(ttl_s, replace_ttl=True)
        except (RedisError, OSError) as exc:  # LockNotOwnedError is a RedisError
            log.warning("lock %r not renewed: %s", lock.name, exc)


@contextlib.asynccontextmanager
async def kept(lock: Lock, ttl_s: float, *, release_s: float = 2.0) -> AsyncIterator[None]:
    """Hold the acquired `lock` for the body: renewed to `ttl_s` every third of it, released
    after the body (waiting at most `release_s` on Redis: a stopping process goes on; an
    unreleased lock lapses by itself)."""
    renewer = asyncio.create_task(_renew(lock, ttl_s))
    try:
        yield
    finally:
        await cancel_and_wait([renewer])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(release_s):
                await lock.release()
