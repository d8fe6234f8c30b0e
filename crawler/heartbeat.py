"""Heartbeats of the long-running workers (crawl and assignment) and the fleet's history.

A worker's heartbeat is a Redis hash with a TTL of `MISSED_BEATS` intervals, rewritten every
interval: who the worker is (host, pid), when it last beat (`seen`), and what the worker adds.
`status` lists them, and the container health checks read them. Counts that ride along with a
beat (`Heartbeat.tally`) reach Redis with it and are kept for the next one if it fails.

One crawl worker at a time appends a `time done queued` sample to the history list every 10 s
(`sample_history`): `status` and the status page derive the rate and ETA from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from crawler.keys import Keys

log = logging.getLogger(__name__)
MISSED_BEATS = 3  # a heartbeat older than this many intervals is stale (and its key expires)
TALLY_KEEP = 10_000  # members a tallied sorted set keeps (the highest counts)
HISTORY_EVERY_S = 10.0
HISTORY_SAMPLES = 8640  # a day of samples

Fields = Mapping[str, str | int | float]


class Heartbeat:
    """The heartbeat hash at `key`, with the fields `fields()` returns at each beat."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        interval_s: float,
        fields: Callable[[], Fields],
    ) -> None:
        self.client = client
        self.key = key
        self.interval_s = interval_s
        self.fields = fields
        # sorted set -> member -> increment, sent with the next beat
        self._tallies: dict[str, dict[str, int]] = {}

    def tally(self, zset: str, member: str) -> None:
        """Add one to `member` of the sorted set `zset` with the next beat."""
        counts = self._tallies.setdefault(zset, {})
        counts[member] = counts.get(member, 0) + 1

    async def beat(self) -> None:
        """Write the heartbeat and the tallies in one transaction (raises while Redis is away;
        the tallies are then sent with the next beat)."""
        pipe = self.client.pipeline(transaction=True)
        fields: dict[Any, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
        fields["seen"] = time.time()
        fields.update(self.fields())
        pipe.hset(self.key, mapping=fields)
        pipe.expire(self.key, int(self.interval_s * MISSED_BEATS) + 1)
        sent, self._tallies = self._tallies, {}
        for zset, counts in sent.items():
            for member, n in counts.items():
                pipe.zincrby(zset, n, member)
            pipe.zremrangebyrank(zset, 0, -TALLY_KEEP - 1)
        try:
            await pipe.execute()
        except (RedisError, OSError):
            for zset, counts in sent.items():  # keep them for the next beat
                for member, n in counts.items():
                    kept = self._tallies.setdefault(zset, {})
                    kept[member] = kept.get(member, 0) + n
            raise

    async def run(self, what: str) -> NoReturn:
        """Beat every interval until cancelled; a failed beat is logged, and the next one is
        due an interval later."""
        while True:
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.warning("%s: heartbeat failed (%s)", what, exc)
            await asyncio.sleep(self.interval_s)

    async def remove(self) -> None:
        """Delete the heartbeat (a stopping worker); nothing happens while Redis is away."""
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(self.key)


async def sample_history(
    client: aioredis.Redis, keys: Keys, owner: str, depth: Callable[[], Awaitable[int]]
) -> None:
    """Append a `time done queued` sample to the history, unless a worker of the fleet did
    within the last HISTORY_EVERY_S seconds. `depth`: the number of items queued."""
    lock_ms = int(HISTORY_EVERY_S * 1000) - 500
    if not await client.set(keys.history + ":lock", owner, nx=True, px=lock_ms):
        return
    counts: Any = await client.hgetall(keys.counts)
    done = sum(int(v) for k, v in counts.items() if k != b"bytes")
    queued = await depth()
    pipe = client.pipeline(transaction=False)
    pipe.lpush(keys.history, f"{time.time():.1f} {done} {queued}")
    pipe.ltrim(keys.history, 0, HISTORY_SAMPLES - 1)
    await pipe.execute()
