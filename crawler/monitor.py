"""A snapshot of the crawl from Redis: queue, leases, statuses, rate, ETA, shards, workers.

Used by the ``status`` command, the progress bar of ``run`` and the status page.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from core.connection import text as _s
from core.keys import CRAWL_GROUP, Keys


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
    eta_s: float | None  # to the end of the whole crawl (`total`), at `rate`
    shards_open: list[ShardProgress] = field(default_factory=list)
    shards_complete_pending: int = 0
    workers: list[dict[str, Any]] = field(default_factory=list)
    history: list[tuple[float, int, int]] = field(default_factory=list)
    shards_total: int = 0  # every shard given to ingest (`run`, `enqueue`)
    shards_done: int = 0  # of those, reported
    # Images of the whole crawl: enqueued ones plus, for shards not (fully) read yet, the
    # average images per shard read so far. None while no shard has been read to its end.
    total: int | None = None
    total_is_estimate: bool = False
    finished: bool = False  # every shard given is reported; nothing queued, leased, deferred
    failing_hosts_permanent: list[dict[str, Any]] = field(default_factory=list)  # 404, 410
    failing_hosts_transient: list[dict[str, Any]] = field(default_factory=list)  # the rest

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
    pipe.scard(keys.plan_shards)
    pipe.scard(keys.shards_reported)
    pipe.sintercard(2, [keys.shards_reported, keys.shards_open])
    pipe.zrevrange(keys.hosts_failed, 0, 49, withscores=True)
    pipe.zrevrange(keys.hosts_gone, 0, 49, withscores=True)
    (length, deferred, counts, dead, ingest_errors, open_shards, complete, hist, planned,
     reported, reopened, failed_hosts, gone_hosts) = await pipe.execute()  # fmt: skip
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
        eta_s=None,
        shards_complete_pending=int(complete),
        history=samples,
        shards_total=int(planned),
        shards_done=int(reported) - int(reopened),
    )
    snap.shards_open = await _shards(client, keys, sorted(_s(s) for s in open_shards))
    snap.workers = await _workers(client, keys)
    _progress(snap, remaining)
    snap.failing_hosts_permanent, snap.failing_hosts_transient = _failing_hosts(
        failed_hosts, gone_hosts
    )
    return snap


def _progress(snap: Snapshot, remaining: int) -> None:
    """The crawl's total, ETA and whether it is finished, from the rest of `snap`."""
    snap.total, snap.total_is_estimate = estimate_total(snap)
    if snap.total is not None and snap.rate > 0:
        snap.eta_s = max(0, snap.total - snap.done) / snap.rate
    snap.finished = (
        remaining == 0
        and not snap.shards_open
        and not snap.shards_complete_pending
        and snap.shards_done >= snap.shards_total
        and (snap.shards_total > 0 or snap.done > 0)
    )
    if snap.finished:
        snap.eta_s = 0.0


def estimate_total(snap: Snapshot) -> tuple[int | None, bool]:
    """Images of the whole crawl, and whether that is an estimate: what is enqueued (done,
    queued, leased, deferred) plus, for each shard given but not read to its end, the average
    images of the shards read to their end. None while no shard has been read to its end."""
    known = snap.done + snap.remaining
    unsealed = [s for s in snap.shards_open if s.total is None]
    sealed = [s.total for s in snap.shards_open if s.total is not None]
    not_started = max(0, snap.shards_total - snap.shards_done - len(snap.shards_open))
    if not unsealed and not not_started:
        return known, False
    read_whole = snap.shards_done + len(sealed)
    if not read_whole:
        return None, True
    images_reported = max(0, snap.done - sum(s.done for s in snap.shards_open))
    average = (images_reported + sum(sealed)) / read_whole
    rest = sum(max(0.0, average - s.images) for s in unsealed) + not_started * average
    return known + round(rest), True


def _failing_hosts(
    failed: list[tuple[Any, float]], gone: list[tuple[Any, float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hosts by failed images, split into permanent (404/410) and transient failures."""
    gone_by_host = {_s(h): int(n) for h, n in gone}
    permanent = [{"host": h, "failed": n} for h, n in gone_by_host.items()][:20]
    rest = {_s(h): int(n) - gone_by_host.get(_s(h), 0) for h, n in failed}
    ranked = sorted(((n, h) for h, n in rest.items() if n > 0), reverse=True)
    transient = [{"host": h, "failed": n} for n, h in ranked[:20]]
    return permanent, transient


def _number(text: str) -> Any:
    """A heartbeat field as a number when it is one."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


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


async def _workers(client: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    names = [k async for k in client.scan_iter(match=keys.worker_pattern, count=500)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    out = []
    for name, fields in zip(names, await pipe.execute(), strict=True):
        info: dict[str, Any] = {_s(k): _number(_s(v)) for k, v in fields.items()}
        info["id"] = _s(name).rsplit(":", 1)[-1]
        out.append(info)
    return sorted(out, key=lambda w: w["id"])


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def progress_text(snap: Snapshot) -> str:
    """``done of total (percent)``, the total marked ``~`` (estimate) or ``?`` (unknown)."""
    if snap.finished:
        return f"{snap.done} of {snap.done} images (100%): finished"
    if snap.total is None:
        return f"{snap.done} of ? images (total unknown until a shard is read to its end)"
    mark = "~" if snap.total_is_estimate else ""
    pct = 100.0 * snap.done / snap.total if snap.total else 0.0
    note = " (estimate: shards not read yet count as the average so far)"
    return f"{snap.done} of {mark}{snap.total} images ({pct:.0f}%)" + (
        note if snap.total_is_estimate else ""
    )


def render_text(snap: Snapshot) -> str:
    eta = format_duration(snap.eta_s)
    if snap.total_is_estimate and snap.eta_s is not None:
        eta = "~" + eta
    lines = [
        f"progress: {progress_text(snap)}",
        f"shards: {snap.shards_done} of {snap.shards_total} reported, "
        f"{len(snap.shards_open)} in flight",
        f"queue: {snap.queued} waiting, {snap.leased} leased, {snap.deferred} deferred",
        f"done: {snap.done} images, {snap.bytes / 1e6:.1f} MB stored",
        f"rate: {snap.rate:.1f} images/s   ETA: {eta}",
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
    for label, hosts in (
        ("failing hosts, permanent (404/410)", snap.failing_hosts_permanent),
        ("failing hosts, transient", snap.failing_hosts_transient),
    ):
        if hosts:
            lines.append(f"{label}:")
            lines += [f"  {h['host']:<40} {h['failed']}" for h in hosts[:10]]
    lines.append(f"workers: {len(snap.workers)}")
    for w in snap.workers:
        lines.append(
            f"  {w['id']:<40} processed={w.get('processed', '?')} held={w.get('held', '?')}"
            + (f" PAUSED: {w['paused']}" if w.get("paused") else "")
        )
    return "\n".join(lines)
