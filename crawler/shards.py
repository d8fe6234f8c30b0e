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
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from crawler import status
from crawler.keys import Keys
from crawler.queue import WorkQueue
from crawler.queue import text as _s
from crawler.store import sweep_temporary

log = logging.getLogger(__name__)


class Shards:
    def __init__(self, client: aioredis.Redis, keys: Keys, queue: WorkQueue, output: Path) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue
        self.output = output

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
        """Write the shard's report and drop its Redis state. False if someone else is on it."""
        lock = self.keys.shard_meta(shard) + ":finalize-lock"
        token = uuid.uuid4().hex
        if not await self.client.set(lock, token, nx=True, ex=300):
            return False
        try:
            meta_key, records_key = self.keys.shard_meta(shard), self.keys.shard_records(shard)
            meta = {_s(k): _s(v) for k, v in (await self.client.hgetall(meta_key)).items()}
            if "total" not in meta or int(meta.get("done", 0)) < int(meta["total"]):
                await self.client.srem(self.keys.shards_complete, shard)
                return False
            records = [v async for _k, v in self.client.hscan_iter(records_key, count=2000)]
            summary = self._summary(shard, meta, records)
            # gzip of thousands of records: off the event loop
            paths = await asyncio.to_thread(
                status.write_report, self.output, shard, records, summary
            )
            # Every image has its record: nobody writes here any more, so leftovers of
            # killed writers can go now.
            sweep_temporary(self.output / shard, older_than_s=0)
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(records_key, meta_key)
            pipe.srem(self.keys.shards_open, shard)
            pipe.srem(self.keys.shards_complete, shard)
            pipe.xadd(
                self.keys.shards_done,
                {
                    "shard": shard,
                    "source": meta.get("source", ""),
                    "report": str(paths.report),
                    "output": str(self.output),
                },
            )
            await pipe.execute()
            log.info("shard %s complete: %d records -> %s", shard, len(records), paths.report)
            return True
        finally:
            if await self.client.get(lock) == token.encode():
                await self.client.delete(lock)

    @staticmethod
    def _summary(shard: str, meta: dict[str, str], records: list[bytes]) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for rec in records:
            st = orjson.loads(rec)["status"]
            by_status[st] = by_status.get(st, 0) + 1
        ints = (
            "lines", "bad_lines", "bad_image_info", "duplicate_names", "flagged_duplicates",
            "skipped_duplicates", "images", "total",
        )  # fmt: skip
        return {
            "shard": shard,
            "source": meta.get("source", ""),
            **{k: int(meta.get(k, 0)) for k in ints},
            # why reading the shard ended before its end; empty when it was read whole
            "unreadable": meta.get("unreadable", ""),
            "records": len(records),
            "by_status": dict(sorted(by_status.items())),
            "finished": time.time(),
        }

    # ---- retry -----------------------------------------------------------------------
    async def requeue_open(self, shard: str, statuses: set[str]) -> int:
        """Re-queue the images of an in-flight shard whose records have the given statuses."""
        names = [
            _s(name)
            async for name, rec in self.client.hscan_iter(self.keys.shard_records(shard))
            if orjson.loads(rec)["status"] in statuses
        ]
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

    async def reopen(self, shard: str, statuses: set[str]) -> int:
        """Re-queue images of a reported shard; the shard is reported again when done."""
        paths = status.ReportPaths(self.output, shard)
        meta_key = self.keys.shard_meta(shard)
        if await self.client.exists(meta_key):
            return await self.requeue_open(shard, statuses)  # reopened before, or in flight
        records = list(status.read_report(paths.report))
        retry = [r for r in records if r["status"] in statuses]
        if not retry:
            return 0
        keep = [r for r in records if r["status"] not in statuses]
        summary = orjson.loads(paths.summary.read_bytes()) if paths.summary.is_file() else {}
        pipe = self.client.pipeline(transaction=True)
        meta: dict[Any, Any] = {
            k: summary.get(k, 0) for k in ("lines", "bad_lines", "bad_image_info", "images")
        }
        meta.update(source=summary.get("source", ""), total=len(records), done=len(keep))
        pipe.hset(meta_key, mapping=meta)
        for chunk in _chunks(keep, 1000):
            pipe.hset(
                self.keys.shard_records(shard),
                mapping={r["image_name"]: status.encode(r) for r in chunk},
            )
        pipe.sadd(self.keys.shards_open, shard)
        await self.queue.add_to(pipe, shard, [(r["image_name"], r["raw_url"]) for r in retry])
        for rec in retry:
            pipe.hincrby(self.keys.counts, rec["status"], -1)
        await pipe.execute()
        paths.report.rename(paths.report.with_suffix(".gz.superseded"))
        return len(retry)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
