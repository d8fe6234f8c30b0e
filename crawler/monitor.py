"""A snapshot of the crawl from Redis: queue, leases, statuses, rate, ETA, shards, workers.

Used by the ``status`` command, the progress bar of ``run`` and the status page.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from crawler.config import Config
from crawler.connection import connect
from crawler.keys import CRAWL_GROUP, Keys
from crawler.queue import text as _s


@dataclass
class ShardProgress:
    shard: str
    images: int
    total: int | None  # None while still being enqueued
    done: int


@dataclass
class Snapshot:
    time: float
    queued: int  # waiting for a worker
    leased: int  # held by workers
    deferred: int  # held back for busy hosts
    done: int
    by_status: dict[str, int]
    bytes: int
    dead_letters: int
    ingest_errors: dict[str, int]
    rate: float  # images/s over the last minute or so
    eta_s: float | None
    shards_open: list[ShardProgress] = field(default_factory=list)
    shards_complete_pending: int = 0
    workers: list[dict[str, str]] = field(default_factory=list)
    history: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.queued + self.leased + self.deferred

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["remaining"] = self.remaining
        return out


async def snapshot(client: aioredis.Redis, keys: Keys, *, history: int = 360) -> Snapshot:
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.queue)
    pipe.zcard(keys.deferred)
    pipe.hgetall(keys.counts)
    pipe.xlen(keys.dead)
    pipe.hgetall(keys.ingest_errors)
    pipe.smembers(keys.shards_open)
    pipe.scard(keys.shards_complete)
    pipe.lrange(keys.history, 0, history - 1)
    (
        length,
        deferred,
        counts,
        dead,
        ingest_errors,
        open_shards,
        complete,
        hist,
    ) = await pipe.execute()
    in_flight = await leased(client, keys)
    by_status = {_s(k): int(v) for k, v in counts.items() if _s(k) != "bytes" and int(v)}
    done = sum(by_status.values())
    samples = _parse_history(hist)
    rate = _rate(samples)
    queued = max(0, int(length) - in_flight)
    remaining = queued + in_flight + int(deferred)
    snap = Snapshot(
        time=time.time(),
        queued=queued,
        leased=in_flight,
        deferred=int(deferred),
        done=done,
        by_status=dict(sorted(by_status.items(), key=lambda kv: -kv[1])),
        bytes=int(counts.get(b"bytes", 0)),
        dead_letters=int(dead),
        ingest_errors={_s(k): int(v) for k, v in ingest_errors.items()},
        rate=rate,
        eta_s=(remaining / rate) if rate > 0 else None,
        shards_complete_pending=int(complete),
        history=samples,
    )
    snap.shards_open = await _shards(client, keys, sorted(_s(s) for s in open_shards))
    snap.workers = await _workers(client, keys)
    return snap


async def leased(client: aioredis.Redis, keys: Keys) -> int:
    """Items delivered to a crawl worker and not yet recorded."""
    try:
        groups = await client.xinfo_groups(keys.queue)
    except ResponseError:  # no stream yet
        return 0
    return sum(int(g["pending"]) for g in groups if _s(g["name"]) == CRAWL_GROUP)


def _parse_history(raw: list[Any]) -> list[tuple[float, int, int]]:
    out = []
    for entry in raw:
        try:
            t, d, q = _s(entry).split()
            out.append((float(t), int(d), int(q)))
        except ValueError:
            continue
    return out[::-1]  # oldest first


def _rate(samples: list[tuple[float, int, int]]) -> float:
    """Images/s between the newest sample and one about a minute older."""
    if len(samples) < 2:
        return 0.0
    t1, d1, _ = samples[-1]
    older = [s for s in samples if t1 - s[0] >= 55] or samples[:1]
    t0, d0, _ = older[-1]
    return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


async def _shards(client: aioredis.Redis, keys: Keys, shards: list[str]) -> list[ShardProgress]:
    pipe = client.pipeline(transaction=False)
    for shard in shards:
        pipe.hmget(keys.shard_meta(shard), "images", "total", "done")
    out = []
    for shard, (images, total, done) in zip(shards, await pipe.execute(), strict=True):
        out.append(
            ShardProgress(
                shard,
                int(images or 0),
                int(total) if total is not None else None,
                int(done or 0),
            )
        )
    return out


async def _workers(client: aioredis.Redis, keys: Keys) -> list[dict[str, str]]:
    names = [k async for k in client.scan_iter(match=keys.worker_pattern, count=500)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    out = []
    for name, fields in zip(names, await pipe.execute(), strict=True):
        info = {_s(k): _s(v) for k, v in fields.items()}
        info["id"] = _s(name).rsplit(":", 1)[-1]
        out.append(info)
    return sorted(out, key=lambda w: w["id"])


async def check_heartbeat(cfg: Config, pattern: str) -> tuple[bool, str]:
    """The container health checks: is a heartbeat key matching `pattern` from this host
    (hostname) younger than three heartbeat intervals? Returns the answer and, when it is
    no, the reason."""
    client = connect(cfg)
    try:
        return await _fresh_heartbeat(
            client, pattern, socket.gethostname(), 3 * cfg.worker.heartbeat_interval_s
        )
    except Exception as exc:
        return False, f"check failed: {exc}"
    finally:
        await client.aclose()


async def _fresh_heartbeat(
    client: aioredis.Redis, pattern: str, host: str, max_age_s: float
) -> tuple[bool, str]:
    stale = ""
    async for key in client.scan_iter(match=pattern, count=500):
        beat: Any = await client.hmget(key, "host", "seen", "paused")
        if beat[0] is not None and _s(beat[0]) == host:
            if time.time() - float(beat[1] or 0) > max_age_s:
                stale = f"heartbeat of {_s(key)} is stale"
            elif beat[2]:
                stale = f"{_s(key)} is paused: {_s(beat[2])}"
            else:
                return True, ""
    return False, stale or f"no live heartbeat from {host}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def render_text(snap: Snapshot) -> str:
    lines = [
        f"queue: {snap.queued} waiting, {snap.leased} leased, {snap.deferred} deferred",
        f"done: {snap.done} images, {snap.bytes / 1e6:.1f} MB stored",
        f"rate: {snap.rate:.1f} images/s   ETA: {format_duration(snap.eta_s)}",
        f"dead letters: {snap.dead_letters}",
    ]
    if snap.by_status:
        lines.append("by status:")
        lines += [f"  {k:<20} {v}" for k, v in snap.by_status.items()]
    if snap.ingest_errors:
        lines.append("ingest errors:")
        lines += [f"  {k:<20} {v}" for k, v in sorted(snap.ingest_errors.items())]
    if snap.shards_open:
        lines.append(f"shards in flight: {len(snap.shards_open)}")
        for sh in snap.shards_open[:50]:
            total = "enqueueing" if sh.total is None else str(sh.total)
            lines.append(f"  {sh.shard:<40} {sh.done}/{total}")
    lines.append(f"workers: {len(snap.workers)}")
    for w in snap.workers:
        lines.append(
            f"  {w['id']:<40} processed={w.get('processed', '?')} held={w.get('held', '?')}"
            + (f" PAUSED: {w['paused']}" if w.get("paused") else "")
        )
    return "\n".join(lines)
