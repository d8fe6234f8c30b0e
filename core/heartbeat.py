"""Heartbeats of the long-running workers (crawl and assignment), their container health
check, and the fleet's history.

A worker's heartbeat is a Redis hash with a TTL of `MISSED_BEATS` intervals, rewritten every
interval: who the worker is (host, pid), when it last beat (`seen`), and what the worker adds.
`status` lists them, and `check_heartbeat` answers the container health checks from them.
Counts that ride along with a beat (`Heartbeat.tally`) reach Redis with it and are kept for the
next one if it fails.

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

from core.config import Config
from core.connection import connected
from core.connection import text as _s
from core.keys import Keys

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
    if not await client.set(keys.history_turn, owner, nx=True, px=lock_ms):
        return
    counts: Any = await client.hgetall(keys.counts)
    done = sum(int(v) for k, v in counts.items() if k != b"bytes")
    queued = await depth()
    pipe = client.pipeline(transaction=False)
    pipe.lpush(keys.history, f"{time.time():.1f} {done} {queued}")
    pipe.ltrim(keys.history, 0, HISTORY_SAMPLES - 1)
    await pipe.execute()


async def check_heartbeat(
    cfg: Config, pattern: str, *, paused_ok: bool = False
) -> tuple[bool, str]:
    """The container health checks: is a heartbeat key matching `pattern` from this host
    (hostname) younger than three heartbeat intervals, and not paused (unless `paused_ok`:
    a paused worker runs and beats, it only takes no work)? Returns the answer and, when it
    is no, the reason."""
    max_age_s = MISSED_BEATS * cfg.worker.heartbeat_interval_s
    try:
        async with connected(cfg) as client:
            return await _fresh_heartbeat(
                client, pattern, socket.gethostname(), max_age_s, paused_ok
            )
    except Exception as exc:
        return False, f"check failed: {exc}"


async def _fresh_heartbeat(
    client: aioredis.Redis, pattern: str, host: str, max_age_s: float, paused_ok: bool
) -> tuple[bool, str]:
    stale = ""
    async for key in client.scan_iter(match=pattern, count=500):
        beat: Any = await client.hmget(key, "host", "seen", "paused")
        if beat[0] is not None and _s(beat[0]) == host:
            if time.time() - float(beat[1] or 0) > max_age_s:
                stale = f"heartbeat of {_s(key)} is stale"
            elif beat[2] and not paused_ok:
                stale = f"{_s(key)} is paused: {_s(beat[2])}"
            else:
                return True, ""
    return False, stale or f"no live heartbeat from {host}"
