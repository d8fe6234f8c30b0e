"""The container health check of a worker's heartbeat (crawl and assignment workers alike)."""

from __future__ import annotations

import socket
import time
from typing import Any

import redis.asyncio as aioredis

from core.config import Config
from core.connection import connected
from core.connection import text as _s


async def check_heartbeat(
    cfg: Config, pattern: str, *, paused_ok: bool = False
) -> tuple[bool, str]:
    """The container health checks: is a heartbeat key matching `pattern` from this host
    (hostname) younger than three heartbeat intervals, and not paused (unless `paused_ok`:
    a paused worker runs and beats, it only takes no work)? Returns the answer and, when it
    is no, the reason."""
    max_age_s = 3 * cfg.worker.heartbeat_interval_s
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
