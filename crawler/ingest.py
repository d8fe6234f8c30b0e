"""Shards -> work items in the Redis queue, streamed, validated, bounded, with backpressure
and resume.

Each ``image_info`` entry of each document becomes an item ``(shard, image_name, raw_url)``.
Ingest of a shard resumes at the line after the last enqueued batch (``ingest_line`` in the
shard's meta hash, written in the same transaction as the batch), skips shards already
reported, and seals a shard (sets its image total) once all of it is enqueued.

A shard that cannot be read to its end (truncated or corrupt compressed data, more than
``ingest.max_shard_bytes`` once decompressed) ends where reading stopped: what was read is
enqueued and the shard is sealed with ``unreadable`` in its meta (and so in its report's
summary), so that its images are crawled and the shard completes. A shard of which nothing
could be read leaves nothing behind and is tried again by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock

from core import status
from core.config import Config
from core.connection import RedisRetry
from core.guard import AddressPolicy
from core.keys import Keys
from core.locks import kept
from core.shardfiles import ShardMissing, ShardUnreadable, check_shard_id, local_copy
from core.storage import output_storage
from crawler.documents import Entry, parse_line, read_lines
from crawler.entries import Result, encode_result
from crawler.queue import WorkQueue
from crawler.sources import ShardSource

log = logging.getLogger(__name__)
T = TypeVar("T")

# The ingest lock of a shard expires this long after its holder last renewed it (a third of
# this, while it holds the shard: downloading, reading, waiting for room), so a killed
# ingest holds a shard up for at most this.
LOCK_TTL_S = 60


class Stopped(Exception):
    """A stop was requested (a signal): ingest ends at its last enqueued batch."""


@dataclass
class IngestStats:
    shards: int = 0
    shards_skipped: int = 0
    shards_missing: int = 0
    shards_known_gaps: int = 0
    shards_unreadable: int = 0
    lines: int = 0
    bad_lines: int = 0
    items: int = 0
    bad_entries: int = 0
    duplicate_names: int = 0
    flagged_duplicates: int = 0  # documents flagged could_have_url_duplicate
    skipped_duplicates: int = 0  # of those, left out (corpus.skip_url_duplicates)
    unreadable: list[str] = field(default_factory=list)  # "<shard>: why", one per shard
    stopped: bool = False  # a stop was requested before every shard was handled


class Ingest:
    """Feeds shards into the queue; one instance per ingest process.

    ``redis_wait_s`` > 0 bounds how long a Redis outage is ridden out (then
    ``connection.RedisUnavailable`` is raised); 0 waits for Redis however long it takes.
    """

    def __init__(self, cfg: Config, client: aioredis.Redis, *, redis_wait_s: float = 0.0) -> None:
        self.cfg = cfg
        self.client = client
        self.keys = Keys(cfg.redis.namespace)
        self.queue = WorkQueue(client, self.keys, cfg.queue)
        self.stats = IngestStats()
        self.storage = output_storage(cfg)
        self.redis_wait_s = redis_wait_s
        self.stop = asyncio.Event()

    async def run(self, sources: list[ShardSource], stop: asyncio.Event | None = None) -> None:
        """Ingest each source in turn. Setting `stop` ends at the last enqueued batch."""
        if stop is not None:
            self.stop = stop
        try:
            await self._plan(sources)
            for source in sources:
                if self.stop.is_set():
                    raise Stopped
                await self.ingest_shard(source)
        except Stopped:
            self.stats.stopped = True
            log.warning("ingest stopped; a rerun resumes after the last enqueued batch")

    async def _redis(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        retry = RedisRetry.from_config(self.cfg, what, give_up_after_s=self.redis_wait_s)
        return await retry.call(fn)

    async def _plan(self, sources: list[ShardSource]) -> None:
        """Name every shard of the crawl in Redis (progress and ETA cover them all)."""
        names = [s.shard for s in sources if not check_shard_id(s.shard)]
        for start in range(0, len(names), 5000):
            chunk = names[start : start + 5000]

            async def add(chunk: list[str] = chunk) -> None:
                await self.client.sadd(self.keys.plan_shards, *chunk)

            await self._redis(add, "plan")

    async def ingest_shard(self, source: ShardSource) -> None:
        if await self._skip(source):
            return
        meta_key = self.keys.shard_meta(source.shard)
        meta = await self._redis(lambda: self.client.hgetall(meta_key), "ingest")
        if b"total" in meta:
            self.stats.shards_skipped += 1
            return
        lock = self.client.lock(
            self.keys.shard_ingest_lock(source.shard),
            timeout=LOCK_TTL_S,
            blocking=False,
            thread_local=False,  # renewed and released by other tasks of this process
        )
        token = uuid.uuid4().hex.encode()
        if not await self._redis(lambda: self._acquire(lock, token), "ingest lock"):
            log.warning("shard %s is being ingested by another process", source.shard)
            self.stats.shards_skipped += 1
            return
        async with kept(lock, LOCK_TTL_S):
            try:
                start_line = int(meta.get(b"ingest_line", b"0"))
                async with local_copy(source.location, self.cfg) as path:
                    await self._ingest_file(source, path, start_line)
                self.stats.shards += 1
            except ShardMissing as exc:
                await self._missing(source, exc)
            except ShardUnreadable as exc:
                log.error("shard %s unreadable (%s): %s", source.shard, exc.kind, exc)
                self.stats.shards_unreadable += 1
                self.stats.unreadable.append(f"{source.shard}: {exc}")
                await self._count_error(exc.kind)
                if not exc.sealed:  # a sealed shard completes with the images read before
                    await self._unplan(source.shard)

    async def _skip(self, source: ShardSource) -> bool:
        """True for a shard not to ingest: a bad id (counted) or one already reported."""
        problem = check_shard_id(source.shard)
        if problem:
            log.error("skipping %s: %s", source.location, problem)
            self.stats.shards_unreadable += 1
            self.stats.unreadable.append(f"{source.location}: {problem}")
            await self._count_error("bad_shard_id")
            return True
        if await asyncio.to_thread(status.shard_is_reported, self.storage, source.shard):
            log.info("shard %s already complete (report exists)", source.shard)
            self.stats.shards_skipped += 1

            async def reported() -> None:
                await self.client.sadd(self.keys.shards_reported, source.shard)

            await self._redis(reported, "plan")
            return True
        return False

    async def _acquire(self, lock: Lock, token: bytes) -> bool:
        """Take the shard's ingest lock; a retry after a lost reply finds it ours."""
        if await lock.acquire(token=token):
            return True
        if await self.client.get(lock.name) == token:  # ours: the reply was lost
            lock.local.token = token
            return True
        return False

    async def _missing(self, source: ShardSource, exc: ShardMissing) -> None:
        if source.known_gap:
            log.info("shard %s is a known gap of the corpus, skipped", source.shard)
            self.stats.shards_known_gaps += 1
        else:
            log.warning("shard missing, skipped: %s", exc)
            self.stats.shards_missing += 1
            await self._count_error("missing_shard")
        await self._unplan(source.shard)

    async def _unplan(self, shard: str) -> None:
        """A shard that yields no images leaves the crawl's plan (progress, ETA)."""
        key = self.keys.plan_shards
        await self._redis(lambda: self.client.srem(key, shard), "plan")

    async def _count_error(self, kind: str, n: int = 1) -> None:
        key = self.keys.ingest_errors
        await self._redis(lambda: self.client.hincrby(key, kind, n), "ingest errors")

    async def _ingest_file(self, source: ShardSource, path: Path, start_line: int) -> None:
        seen: set[str] = set()
        batch = Batch(source.shard)
        line_no = 0
        policy = AddressPolicy.of(self.cfg.fetch)
        skip_flagged = self.cfg.corpus.skip_url_duplicates
        ing = self.cfg.ingest
        lines = read_lines(path, ing.max_line_bytes, ing.max_shard_bytes)
        unreadable: ShardUnreadable | None = None
        try:
            for line_no, line in enumerate(lines, start=1):
                fresh = line_no > start_line
                batch.lines += fresh
                if line is None:  # longer than max_line_bytes
                    if fresh:
                        batch.count_bad_line(line_no, "line_too_long", "line is too long")
                    continue
                parsed = parse_line(line, policy)
                if fresh:
                    if parsed.error:
                        batch.count_bad_line(line_no, "bad_line", parsed.error)
                    batch.skipped_entries += parsed.skipped_entries
                    batch.flagged += parsed.url_duplicate
                if parsed.url_duplicate and skip_flagged:
                    batch.skipped_flagged += fresh
                    continue
                for entry in parsed.entries:
                    if entry.name in seen:
                        if fresh:
                            batch.duplicates += 1
                        continue
                    seen.add(entry.name)
                    if fresh:
                        batch.add(entry)
                if fresh and batch.size >= ing.batch_size:
                    await self._flush(batch, source, line_no)
                    batch = Batch(source.shard)
                if line_no % 5000 == 0:
                    await asyncio.sleep(0)  # stay responsive while skipping a resumed prefix
        except ShardUnreadable as exc:
            if line_no == 0:
                raise  # nothing read: nothing to end; the next run tries again
            unreadable = exc
            batch.unreadable = f"{exc.kind}: {exc}"
            log.error("shard %s ends at line %d: %s", source.shard, line_no, exc)
        finally:
            lines.close()  # a stop (or a Redis error) leaves the file closed, not to the GC
        await self._flush(batch, source, line_no)
        total = len(seen)
        await self._redis(lambda: self.queue.seal(source.shard, total), "seal")
        log.info("shard %s enqueued: %d images", source.shard, total)
        if unreadable is not None:
            unreadable.sealed = True
            raise unreadable

    async def _flush(self, batch: Batch, source: ShardSource, line_no: int) -> None:
        await self._wait_for_room()
        if self.stop.is_set():
            raise Stopped  # before the transaction: the resume point stays at the last batch
        for err in batch.errors[:20]:
            log.warning("%s %s", source.shard, err)
        meta = self.keys.shard_meta(source.shard)

        tried = False

        async def apply() -> None:
            # Rides out a Redis restart without applying the batch twice: the transaction
            # moves ingest_line to line_no, so after a lost reply meta tells.
            nonlocal tried
            if tried:
                applied = await self.client.hget(meta, "ingest_line")
                if applied is not None and int(applied) >= line_no > 0 and not batch.unreadable:
                    return
            tried = True
            pipe = await self._batch_pipeline(batch, source, line_no)
            await pipe.execute()

        await self._redis(apply, "ingest")
        self.stats.lines += batch.lines
        self.stats.bad_lines += batch.bad_lines
        self.stats.items += len(batch.items)
        self.stats.bad_entries += len(batch.problems) + batch.skipped_entries
        self.stats.duplicate_names += batch.duplicates
        self.stats.flagged_duplicates += batch.flagged
        self.stats.skipped_duplicates += batch.skipped_flagged

    async def _batch_pipeline(self, batch: Batch, source: ShardSource, line_no: int) -> Any:
        """One transaction: the batch's items, its ingest-time records, counters, resume point."""
        pipe = self.client.pipeline(transaction=True)
        meta = self.keys.shard_meta(source.shard)
        fields: dict[Any, Any] = {"source": source.location, "ingest_line": line_no}
        if batch.unreadable:
            fields["unreadable"] = batch.unreadable
        pipe.hset(meta, mapping=fields)
        for field_name, value in batch.counters().items():
            if value:
                pipe.hincrby(meta, field_name, value)
        pipe.sadd(self.keys.shards_open, source.shard)
        await self.queue.add_to(pipe, source.shard, [(e.name, e.url) for e in batch.items])
        if batch.problems:
            await self.queue.record_to(pipe, batch.problems)
        errors = {**batch.error_kinds, "bad_image_info": batch.skipped_entries}
        for kind, n in errors.items():
            if n:
                pipe.hincrby(self.keys.ingest_errors, kind, n)
        return pipe

    async def _wait_for_room(self) -> None:
        """Backpressure: wait while the queue holds ingest.max_queue_depth items or more; a
        stop request ends the wait at once."""
        limit = self.cfg.ingest.max_queue_depth
        waiting = False
        while True:
            depth = await self._redis(self.queue.depth, "ingest: queue depth")
            if depth < limit:
                return
            if not waiting:
                log.info("queue full (%d items): waiting for room", depth)
                waiting = True
            await self._pause(self.cfg.ingest.backpressure_poll_s)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or raise Stopped as soon as a stop is requested."""
        if not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.stop.wait()
        if self.stop.is_set():
            raise Stopped


class Batch:
    """Items and ingest-time records of consecutive lines, enqueued in one transaction."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.items: list[Entry] = []
        self.problems: list[Result] = []
        self.errors: list[str] = []
        self.error_kinds: dict[str, int] = {}
        self.lines = 0
        self.bad_lines = 0
        self.skipped_entries = 0
        self.duplicates = 0
        self.flagged = 0
        self.skipped_flagged = 0
        self.unreadable = ""  # set on the shard's last batch when reading ended early

    @property
    def size(self) -> int:
        return len(self.items) + len(self.problems)

    def add(self, entry: Entry) -> None:
        if not entry.problem_status:
            self.items.append(entry)
            return
        kind = entry.problem_status  # bad_url, bad_name, blocked_address: counted as kinds
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        rec = status.make_record(entry.name, entry.url, kind, error=entry.problem)
        self.problems.append(encode_result("", self.shard, entry.name, rec))

    def count_bad_line(self, line_no: int, kind: str, why: str) -> None:
        self.bad_lines += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.errors.append(f"line {line_no}: {why}")

    def counters(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "bad_lines": self.bad_lines,
            "bad_image_info": self.skipped_entries,
            "duplicate_names": self.duplicates,
            "flagged_duplicates": self.flagged,
            "skipped_duplicates": self.skipped_flagged,
            "images": len(self.items) + len(self.problems),
        }
