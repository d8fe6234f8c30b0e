"""The assignment worker: rewrites each shard the crawler announces as done.

The crawler XADDs ``{shard, source, report, output}`` to ``Keys(ns).shards_done``. Workers share
the consumer group ``ASSIGN_GROUP``; an entry is acknowledged only after its output has been
renamed into place, so a worker killed mid-shard leaves the entry pending, and any worker takes
it over (XAUTOCLAIM) once it has been idle for ``queue.lease_timeout_s``. While a shard is being
rewritten its entry's idle time is reset regularly, so a slow shard is not taken over. An entry
that fails ``queue.max_deliveries`` times is acknowledged and left as ``<shard>.error.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from assign.index import index_shard
from assign.solve import Solver
from assign.task import AssignSettings, BadTask, ShardTask, process, record_failure, report_of
from assign.tree import open_tree
from core.config import Config
from core.connection import RedisRetry, connected
from core.heartbeat import Heartbeat
from core.keys import ASSIGN_GROUP, Keys
from core.shardfiles import download_blocking
from core.storage import is_remote
from core.tasks import cancel_and_wait

log = logging.getLogger("assign.worker")

# How long one XREADGROUP waits for a new entry before the stop flag is checked again.
READ_BLOCK_MS = 1000

Entry = tuple[bytes, dict[bytes, bytes]]


def settings_from(cfg: Config) -> AssignSettings:
    solver: Solver
    if cfg.assign.solver == "lapjv":
        solver = "lapjv"
    elif cfg.assign.solver == "scipy":
        solver = "scipy"
    else:
        raise ValueError(f"assign.solver must be lapjv or scipy, got {cfg.assign.solver!r}")
    return AssignSettings(
        solver=solver,
        downloaded_only=cfg.assign.downloaded_only,
        keep_empty_documents=cfg.assign.keep_empty_documents,
        output=cfg.assign.output,
        storage=cfg.storage,
        download=functools.partial(download_blocking, cfg=cfg),
    )


async def run_assign_worker(
    cfg: Config, *, stop: asyncio.Event | None = None, once: bool = False
) -> None:
    """Rewrite announced shards until ``stop`` is set (``once``: until none is waiting)."""
    if not cfg.redis.url:
        raise ValueError("redis.url is empty: the assign worker needs the crawl's Redis")
    async with connected(cfg) as client:  # the crawler's client settings: timeouts, retries
        worker = AssignWorker(cfg, client)
        await worker.run(stop if stop is not None else asyncio.Event(), once=once)


class AssignWorker:
    def __init__(self, cfg: Config, client: aioredis.Redis, consumer: str | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.stream = Keys(cfg.redis.namespace).shards_done
        self.settings = settings_from(cfg)
        self.lease_ms = max(1, int(cfg.queue.lease_timeout_s * 1000))
        self.consumer = consumer or _consumer_name()
        self.keys = Keys(cfg.redis.namespace)
        self.current_shard = ""

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        """Take and rewrite shards until `stop`; while Redis is unavailable (at start or
        later), wait and reconnect as `RedisRetry` does."""
        beats = asyncio.create_task(self._heartbeat_loop())
        retry = RedisRetry.from_config(self.cfg, "assign")
        try:
            await retry.call(self.ensure_group, stop=stop)
            while not stop.is_set():
                took = await retry.call(lambda: self.step(block=not once), stop=stop)
                if once and not took:
                    return
        except (RedisError, OSError):
            if not stop.is_set():
                raise
        finally:
            await cancel_and_wait([beats])
            with contextlib.suppress(RedisError, OSError):
                await self.client.delete(self.keys.assign_worker(self.consumer))

    async def step(self, *, block: bool) -> bool:
        """Take one entry and rewrite its shard; False when none was waiting."""
        entry = await self.next_entry(block=block)
        if entry is None:
            return False
        await self.handle(entry)
        return True

    async def _heartbeat_loop(self) -> None:
        """A heartbeat key with a TTL, also while a shard is being rewritten (in a thread):
        `mmc4-assign worker --check` reads it."""
        key = self.keys.assign_worker(self.consumer)
        interval = self.cfg.worker.heartbeat_interval_s
        await Heartbeat(self.client, key, interval, self._beat).run("assign")

    def _beat(self) -> dict[str, str | int | float]:
        return {"shard": self.current_shard}

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, ASSIGN_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def next_entry(self, *, block: bool) -> Entry | None:
        """An entry abandoned by a dead worker first, else a new one."""
        stale = await self._claim_stale()
        if stale is not None:
            return stale
        reply: Any = await self.client.xreadgroup(
            ASSIGN_GROUP,
            self.consumer,
            {self.stream: ">"},
            count=1,
            block=READ_BLOCK_MS if block else None,
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return bytes(entry_id), dict(fields)
        return None

    async def _claim_stale(self) -> Entry | None:
        reply: Any = await self.client.xautoclaim(
            self.stream, ASSIGN_GROUP, self.consumer, self.lease_ms, start_id="0-0", count=1
        )
        for entry_id, fields in reply[1]:
            if fields is not None:  # None: the entry was deleted from the stream meanwhile
                return bytes(entry_id), dict(fields)
        return None

    async def handle(self, entry: Entry) -> None:
        entry_id, fields = entry
        try:
            task = ShardTask.from_fields(fields, default_output=self.cfg.paths.output)
            _check_paths(task, self.cfg.paths.output)
        except (BadTask, UnicodeDecodeError) as exc:
            log.error("assign: dropping stream entry %r: %s", entry_id, exc)
            await self.ack(entry_id)
            return
        renewer = asyncio.create_task(self._keep_lease(entry_id))
        self.current_shard = task.shard
        try:
            report = await asyncio.to_thread(process, task, self.settings)
            output = open_tree(task.output, self.cfg.storage)
            await asyncio.to_thread(index_shard, output, task.shard, report.output)
        except Exception as exc:
            await self._failed(entry_id, task, exc)
            return
        finally:
            renewer.cancel()
            self.current_shard = ""
        await self.ack(entry_id)
        log.info("assign: shard %s -> %s %s", task.shard, report.output, _summary(report))

    async def ack(self, entry_id: bytes) -> None:
        await self.client.xack(self.stream, ASSIGN_GROUP, entry_id)

    async def _keep_lease(self, entry_id: bytes) -> None:
        """Reset the entry's idle time so that nobody reclaims a shard still being written."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.client.xclaim(
                    self.stream, ASSIGN_GROUP, self.consumer, 0, [entry_id], justid=True
                )
            except (RedisError, OSError) as exc:  # renewed at the next tick, if Redis is back
                log.warning("assign: lease of %r not renewed (%s)", entry_id, exc)

    async def _failed(self, entry_id: bytes, task: ShardTask, exc: Exception) -> None:
        deliveries = await self._deliveries(entry_id)
        log.error("assign: shard %s failed (delivery %d): %s", task.shard, deliveries, exc)
        if deliveries < self.cfg.queue.max_deliveries and not isinstance(exc, BadTask):
            return  # left pending: retried after the lease timeout
        path = await asyncio.to_thread(
            record_failure, task, self.settings, f"{type(exc).__name__}: {exc}"
        )
        log.error("assign: giving up on shard %s, see %s", task.shard, path)
        await self.ack(entry_id)

    async def _deliveries(self, entry_id: bytes) -> int:
        pending = await self.client.xpending_range(
            self.stream, ASSIGN_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 1


def _check_paths(task: ShardTask, output: str) -> None:
    """Raise BadTask unless the entry's paths are the ones the crawl writes under this
    worker's output: the output itself, and its ``_status/<shard>.jsonl.gz`` report (an
    entry is read from Redis, not trusted to name where to read and write)."""
    if not _same(task.output, output):
        raise BadTask(f"shard {task.shard}: output {task.output!r} is not {output!r}")
    expected = f"{output.rstrip('/')}/{report_of(task)}"
    if task.report and not _same(task.report, expected):
        raise BadTask(f"shard {task.shard}: report {task.report!r} is not {expected!r}")


def _same(one: str, other: str) -> bool:
    """The same place: equal URLs for a bucket, the same real path on disk."""
    if is_remote(one) or is_remote(other):
        return one.rstrip("/") == other.rstrip("/")
    return os.path.realpath(one) == os.path.realpath(other)


def _consumer_name() -> str:
    return f"assign-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _summary(report: Any) -> str:
    if report.skipped:
        return "(already complete)"
    return (
        f"docs={report.docs} rewritten={report.rewritten} dropped_docs={report.dropped_docs} "
        f"dropped_images={report.dropped_images} errors={report.errors}"
    )
