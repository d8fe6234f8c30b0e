"""Shard lifecycle: complete -> report written -> taken out of Redis -> announced.

Finalizing is idempotent and crash-safe: a shard stays in ``shards:complete`` until its report
is written and its Redis state deleted in one transaction, so whoever comes next (any worker,
or ``run``) finishes what a killed process started. Re-opening a reported shard (the ``retry``
command) loads its report back into Redis and re-queues the chosen images.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis

from core import status
from core.connection import text as _s
from core.keys import Keys
from core.locks import kept
from core.shardfiles import check_shard_id
from core.status import Record
from core.storage import Storage, StorageError
from crawler.queue import WorkQueue
from crawler.store import UNWRITABLE_ERRNOS, sweep_temporary

log = logging.getLogger(__name__)


class Shards:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, queue: WorkQueue, storage: Storage
    ) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue
        self.storage = storage

    async def complete(self) -> list[str]:
        return sorted(_s(s) for s in await self.client.smembers(self.keys.shards_complete))

    async def open(self) -> list[str]:
        return sorted(_s(s) for s in await self.client.smembers(self.keys.shards_open))

    async def finalize_all(self) -> list[str]:
        done = []
        for shard in await self.complete():
            if await self.finalize(shard):
                done.append(shard)
        return done

    async def finalize(self, shard: str) -> bool:
        """Write the shard's report and drop its Redis state. False if someone else is on it,
        or it is not complete after all.

        Raises ReportWriteError when the report cannot be written (full disk, read-only
        file system): the shard stays complete in Redis and is written on a later try."""
        if check_shard_id(shard):  # not a name this crawl could have made: never a path
            log.error("dropping unusable shard id %r from the complete set", shard)
            await self.client.srem(self.keys.shards_complete, shard)
            return False
        # The lock lapses one lease after its holder dies (as the holder's items do), so a
        # finalizer killed mid-report delays the shard by one lease, not longer.
        ttl_s = self.queue.cfg.lease_timeout_s
        lock = self.client.lock(
            self.keys.shard_finalize_lock(shard), timeout=ttl_s, blocking=False, thread_local=False
        )
        if not await lock.acquire():
            return False
        async with kept(lock, ttl_s):
            return await self._finalize_held(shard)

    async def _finalize_held(self, shard: str) -> bool:
        meta_key, records_key = self.keys.shard_meta(shard), self.keys.shard_records(shard)
        meta = {_s(k): _s(v) for k, v in (await self.client.hgetall(meta_key)).items()}
        if (
            "total" not in meta
            or _int(meta.get("pending")) > 0
            or ("pending" not in meta and _int(meta.get("done")) < _int(meta["total"]))
        ):  # (a shard enqueued without placeholders completes by count)
            await self.client.srem(self.keys.shards_complete, shard)
            return False
        raw = [v async for _k, v in self.client.hscan_iter(records_key, count=2000)]
        records, unreadable = _readable(raw)
        if unreadable:
            log.error("shard %s: %d unreadable records left out of its report",
                      shard, unreadable)  # fmt: skip
        summary = self._summary(shard, meta, records)
        report = await self._write_report(shard, [r for r, _ in records], summary)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(records_key, meta_key)
        pipe.srem(self.keys.shards_open, shard)
        pipe.srem(self.keys.shards_complete, shard)
        pipe.sadd(self.keys.shards_reported, shard)
        pipe.xadd(
            self.keys.shards_done,
            {
                "shard": shard,
                "source": meta.get("source", ""),
                "report": self.storage.url(report),
                "output": self.storage.location,
            },
        )
        await pipe.execute()
        log.info("shard %s complete: %d records -> %s", shard, len(records),
                 self.storage.url(report))  # fmt: skip
        return True

    async def _write_report(self, shard: str, records: list[bytes], summary: dict[str, Any]) -> str:
        """Write the shard's report (gzip of thousands of records: off the event loop); its
        key. ReportWriteError when the output cannot be written."""
        try:
            report = await asyncio.to_thread(
                status.write_report, self.storage, shard, records, summary
            )
            if not self.storage.remote:
                # Every image has its record: nobody writes here any more, so leftovers
                # of killed writers can go now.
                shard_dir = Path(self.storage.location) / shard
                await asyncio.to_thread(sweep_temporary, shard_dir, 0)
        except StorageError as exc:
            raise ReportWriteError(f"report of shard {shard}: {exc}") from exc
        except OSError as exc:
            if exc.errno in UNWRITABLE_ERRNOS:
                raise ReportWriteError(f"report of shard {shard}: {exc}") from exc
            raise
        return report

    @staticmethod
    def _summary(
        shard: str, meta: dict[str, str], records: list[tuple[bytes, Record]]
    ) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for _raw, rec in records:
            st = rec.status
            by_status[st] = by_status.get(st, 0) + 1
        ints = (
            "lines", "bad_lines", "bad_image_info", "duplicate_names", "flagged_duplicates",
            "skipped_duplicates", "images", "total",
        )  # fmt: skip
        return {
            "shard": shard,
            "source": meta.get("source", ""),
            **{k: _int(meta.get(k)) for k in ints},
            # why reading the shard ended before its end; empty when it was read whole
            "unreadable": meta.get("unreadable", ""),
            "records": len(records),
            "by_status": dict(sorted(by_status.items())),
            "finished": time.time(),
        }

    # ---- retry -----------------------------------------------------------------------
    async def requeue_open(self, shard: str, statuses: set[status.Status]) -> int:
        """Re-queue the images of an in-flight shard whose records have the given statuses."""
        names = []
        async for name, raw in self.client.hscan_iter(self.keys.shard_records(shard)):
            rec = _record(raw)
            if rec is not None and rec.status in statuses:
                names.append(_s(name))
        moved = 0
        for start in range(0, len(names), 500):
            moved += int(
                await self.queue.scripts.requeue(
                    keys=[
                        self.keys.shard_records(shard),
                        self.keys.shard_meta(shard),
                        self.keys.queue,
                        self.keys.counts,
                        self.keys.shards_complete,
                    ],
                    args=[shard, *names[start : start + 500]],
                )
            )
        return moved

    async def reopen(self, shard: str, statuses: set[status.Status]) -> int:
        """Re-queue images of a reported shard; the shard is reported again when done."""
        problem = check_shard_id(shard)
        if problem:
            log.error("not re-queueing shard %r: %s", shard, problem)
            return 0
        meta_key = self.keys.shard_meta(shard)
        if await self.client.exists(meta_key):
            return await self.requeue_open(shard, statuses)  # reopened before, or in flight
        report = status.report_key(shard)
        # decompressing and parsing thousands of records: off the event loop
        data = await self.storage.get(report)
        records = await asyncio.to_thread(lambda: list(status.report_records(data)))
        retry = [r for r in records if r.status in statuses]
        if not retry:
            return 0
        keep = [r for r in records if r.status not in statuses]
        try:
            summary = orjson.loads(await self.storage.get(status.summary_key(shard)))
        except FileNotFoundError:
            summary = {}
        pipe = self.client.pipeline(transaction=True)
        meta: dict[Any, Any] = {
            k: summary.get(k, 0) for k in ("lines", "bad_lines", "bad_image_info", "images")
        }
        meta.update(source=summary.get("source", ""), total=len(records), done=len(keep))
        pipe.hset(meta_key, mapping=meta)
        for chunk in _chunks(keep, 1000):
            pipe.hset(
                self.keys.shard_records(shard),
                mapping={r.image_name: status.encode(r) for r in chunk},
            )
        pipe.sadd(self.keys.shards_open, shard)
        await self.queue.add_to(pipe, shard, [(r.image_name, r.raw_url) for r in retry])
        for rec in retry:
            pipe.hincrby(self.keys.counts, rec.status, -1)
        await pipe.execute()
        await self.storage.rename(report, f"{report}.superseded")
        return len(retry)


class ReportWriteError(Exception):
    """A shard's report could not be written (the output's file system refused it)."""


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _record(raw: bytes) -> Record | None:
    """A record from Redis, or None for a placeholder or anything that is not a record."""
    if not raw:
        return None
    try:
        return status.decode(raw)
    except msgspec.DecodeError:
        return None


def _readable(raw: list[bytes]) -> tuple[list[tuple[bytes, Record]], int]:
    """(raw record, decoded) of every usable record, and how many others there were
    (placeholders excepted)."""
    out = []
    for r in raw:
        rec = _record(r)
        if rec is not None:
            out.append((r, rec))
    return out, sum(1 for r in raw if r) - len(out)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
