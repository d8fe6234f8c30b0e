"""The crawl worker: lease items, fetch politely, process images off the loop, record results.

Per item the hot path is: host slot -> HTTP -> image process pool -> atomic write -> result
buffered in memory. Redis sees batches only: XREADGROUP of many items, one RECORD script call
per flush, lease renewals and fleet permits per tick. Results stay in memory until Redis has
taken them, so a Redis restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from yarl import URL

from core import status
from core.budget import BodyBudget
from core.config import Config
from core.connection import RedisRetry, connect
from core.fetch import OTHER_HOST, Fetcher, FetchResult
from core.keys import Keys
from core.logs import FailureLog, LogStats
from core.runtime import StopSignals, watch_loop_lag
from core.session import client_session
from core.storage import output_storage
from core.tasks import cancel_and_wait
from crawler import images
from crawler.limits import HostGate
from crawler.metrics import Metrics, metrics_app, start_server
from crawler.pool import ImageJobTimeout, ImagePool
from crawler.queue import Item, Result, WorkQueue, encode_result
from crawler.retries import Retries
from crawler.shards import ReportWriteError, Shards
from crawler.store import (
    OUTPUT_UNWRITABLE,
    Store,
    output_problem,
    sweep_temporary,
    verify_bytes,
    verify_stored,
)

log = logging.getLogger(__name__)
_OUTPUT_PROBE_S = 5.0  # while the output cannot be written: seconds between probes
_GC_YOUNG_S = 5.0  # see _tune_gc: seconds between collections of the young generations
_GC_FULL_EVERY = 12  # young collections per full one (a minute)


class OutputUnwritable(Exception):
    """The output refused a file for a reason of its own (full, read-only, not permitted)."""


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.time)
    processed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    redis_calls: int = 0
    # Most bytes of response bodies held at once: arriving, or waiting for (or in) image work.
    peak_waiting_bytes: int = 0

    def count(self, st: str, nbytes: int) -> None:
        self.processed += 1
        self.by_status[st] = self.by_status.get(st, 0) + 1
        self.bytes += nbytes


def available_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container started with --cpus=2 on a 64-core host gets 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def pinned_cpus(processes: int, allowed: set[int], quota_cpus: int) -> list[int]:
    """CPUs to pin image processes to, round robin: the allowed ones, when the processes cover
    them all and no CPU quota narrower than the mask applies; else none (no pinning)."""
    if processes < len(allowed) or quota_cpus < len(allowed):
        return []
    return sorted(allowed)


def make_pool(cfg: Config) -> ImagePool:
    usable = available_cpus()
    size = cfg.worker.image_processes or usable
    cpus: list[int] = []
    if cfg.worker.pin_image_processes and hasattr(os, "sched_getaffinity"):
        cpus = pinned_cpus(size, os.sched_getaffinity(0), usable)
    # The fork server imports Pillow and libmagic once; every image process forked from it
    # starts with them loaded instead of importing them itself.
    return ImagePool(
        size,
        initializer=images.init_worker,
        initargs=images.init_args(cfg),
        preload=["crawler.store"],
        cpus=cpus,
        job_timeout_s=cfg.images.job_timeout_s,
    )


class Worker:
    def __init__(self, cfg: Config, worker_id: str | None = None) -> None:
        self.cfg = cfg
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.keys = Keys(cfg.redis.namespace)
        self.stats = WorkerStats()
        self.store = Store(output_storage(cfg))
        self.settings = images.settings_from(cfg)
        self.metrics = Metrics()
        self.failure_log = FailureLog(log, cfg.worker.log_interval_s)
        self.log_stats = LogStats()
        self.failed_hosts: dict[str, int] = {}
        self.gone_hosts: dict[str, int] = {}  # the part of failed_hosts that is 404/410
        self.held: dict[str, Item] = {}
        self.results: list[Result] = []
        self.to_hand_back: list[Item] = []  # fetched, but the output refused them
        # Why the output cannot be written ("" when it can): no work is taken meanwhile.
        self.output_blocked = ""
        self._output_ok = asyncio.Event()
        self._output_ok.set()
        self.stopping = asyncio.Event()  # stop taking work
        self.force_exit = asyncio.Event()  # second signal: stop now
        self.room = asyncio.Event()
        self.flushed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Bodies being read or waiting for their image work (budget.BodyBudget).
        self.bodies = BodyBudget(cfg.worker.max_waiting_image_mb << 20)
        self._last_sweep = -math.inf  # sweep on the first pass: monotonic time starts at boot
        self._output_probed = False
        self._pool: ImagePool
        self.client: aioredis.Redis
        self.queue: WorkQueue
        self.gate: HostGate
        self.fetcher: Fetcher
        self.shards: Shards

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self, *, until_idle: bool = False) -> None:
        """Work until stopped (or, with until_idle, until the queue stays empty)."""
        self.client = connect(self.cfg)
        self.queue = WorkQueue(self.client, self.keys, self.cfg.queue)
        self.gate = HostGate(
            self.cfg.limits, self.client, self.keys, on_throttle=self.metrics.throttled.inc
        )
        self.shards = Shards(self.client, self.keys, self.queue, self.store.storage)
        self._pool = make_pool(self.cfg)
        await self._pool.start()
        session = client_session(self.cfg.fetch, self.cfg.worker.max_connections)
        self.fetcher = Fetcher(
            self.cfg.fetch, session, self.cfg.worker.max_connections, self.bodies
        )
        _tune_gc()
        await self._probe_output()
        await RedisRetry.from_config(self.cfg, "start").call(
            self.queue.ensure_group, stop=self.force_exit
        )
        self.metrics.redis_ok()
        metrics_runner = None
        if self.cfg.metrics.port:
            app = metrics_app(self.metrics, self._ready)
            metrics_runner = await start_server(app, self.cfg.metrics.host, self.cfg.metrics.port)
        log.info("worker %s started", self.id)
        q, hb = self.cfg.queue, self.cfg.worker.heartbeat_interval_s
        maintenance_s = min(q.reclaim_interval_s, q.lease_timeout_s / 3)
        background = [
            self._loop(self._flush_once),
            self._loop(self._renew_once, maintenance_s),
            self._loop(self._maintain_once, maintenance_s),
            self._loop(self._report_once, maintenance_s),
            self._loop(self._probe_output, _OUTPUT_PROBE_S),
            # a heartbeat retries within its own interval: a blip must not let it lapse
            self._loop(self._heartbeat, hb, max_backoff_s=hb),
            watch_loop_lag(self.metrics.loop_lag.observe),
            self._gc_loop(),
            self._summary_loop(),
        ]
        bg = [asyncio.create_task(c) for c in background]
        try:
            await self._read_loop(until_idle)
            await self._drain()
        finally:
            self.stopping.set()
            await self._final_flush()
            if await cancel_and_wait(bg):
                log.error("background loops would not stop")
            await self.gate.close()
            await session.close()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await self._pool.close()
            with contextlib.suppress(RedisError, OSError):
                await self.client.delete(self.keys.worker(self.id))
            await self.client.aclose()
            _untune_gc()
            log.info("worker %s stopped: %d processed", self.id, self.stats.processed)

    def _ready(self) -> str:
        """Why this worker cannot work now ("" when it can): readiness and status say it."""
        if self.output_blocked:
            return f"output cannot be written: {self.output_blocked}"
        age = time.time() - self.metrics.last_redis_ok_at
        if age >= 3 * self.cfg.worker.heartbeat_interval_s + 10:
            return "Redis has not answered recently"
        return ""

    def stop_deadline_s(self) -> float:
        """The longest a graceful stop may take: grace, final flush, closing, and a margin."""
        return self.cfg.worker.grace_period_s + self._final_flush_s() + 10.0

    def _final_flush_s(self) -> float:
        return max(5.0, self.cfg.worker.grace_period_s)

    def request_stop(self) -> None:
        if self.stopping.is_set():
            log.warning("second signal: stopping now")
            self.force_exit.set()
        else:
            log.info(
                "stopping: finishing in-flight work (grace %gs)", self.cfg.worker.grace_period_s
            )
            self.stopping.set()
        self.room.set()

    async def _drain(self) -> None:
        """Give in-flight items the grace period, then hand the rest back to the queue."""
        deadline = time.monotonic() + self.cfg.worker.grace_period_s
        while self._tasks and time.monotonic() < deadline and not self.force_exit.is_set():
            self.room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.wait(), 0.2)
        leftover = list(self.held.values())
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if leftover:
            await self._final_flush()
            unrecorded = [i for i in leftover if i.id in self.held]
            with contextlib.suppress(RedisError, OSError):
                await self.queue.hand_back(unrecorded)
                log.info("handed back %d items", len(unrecorded))

    def _loop(
        self,
        iteration: Callable[[], Coroutine[Any, Any, None]],
        interval_s: float = 0.0,
        *,
        max_backoff_s: float = 30.0,
    ) -> Coroutine[Any, Any, NoReturn]:
        """One iteration of a background loop every `interval_s` until cancelled (see
        core.tasks), retried as `RedisRetry.every` retries."""
        what = iteration.__name__.strip("_")
        retry = RedisRetry.from_config(self.cfg, what, cap_s=max_backoff_s)
        return retry.every(iteration, interval_s)

    # ---- reading ---------------------------------------------------------------------
    async def _read_loop(self, until_idle: bool) -> None:
        window = self.cfg.worker.window
        idle_since: float | None = None
        while not self.stopping.is_set():
            if self.output_blocked:  # take no work the output could not keep
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._output_ok.wait(), 1.0)
                continue
            free = window - len(self.held)
            if free < min(self.cfg.queue.read_batch, window) // 4 + 1:
                self.room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room.wait(), 1.0)
                continue
            try:
                items = await self.queue.read(self.id, min(free, self.cfg.queue.read_batch), 500)
                self._redis_call()
            except (RedisError, OSError) as exc:
                log.warning("read: Redis unavailable (%s)", exc)
                await asyncio.sleep(self.cfg.redis.reconnect_backoff_s)
                continue
            if items:
                idle_since = None
                await self._take(items)
            elif until_idle and not self.held:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.0 and await self._nothing_left():
                    return

    async def _nothing_left(self) -> bool:
        info = await self.client.xinfo_groups(self.keys.queue)
        pending = sum(int(g["pending"]) for g in info)
        return pending == 0 and await self.queue.depth() == 0

    async def _take(self, items: list[Item]) -> None:
        backlog = self.cfg.limits.host_backlog
        deferred: dict[str, list[Item]] = {}
        taken: list[tuple[Item, str]] = []
        batch: dict[str, int] = {}  # items of each host taken from this batch (not yet waiting)
        for item in items:
            host = URL(item.url).host or ""
            if self.gate.backlog(host) + batch.get(host, 0) >= backlog:
                deferred.setdefault(host, []).append(item)
                continue
            batch[host] = batch.get(host, 0) + 1
            self.held[item.id] = item
            taken.append((item, host))
        # Which of these a previous run already stored: one thread hop per batch, none once
        # every shard of the batch is known to have started with no directory.
        wanted = [(i.shard, i.name) for i, _ in taken]
        if self.store.all_new(shard for shard, _ in wanted):
            on_disk = [False] * len(wanted)
        else:
            on_disk = await asyncio.to_thread(self.store.on_disk, wanted)
        for (item, host), stored in zip(taken, on_disk, strict=True):
            task = asyncio.create_task(self._process(item, host, stored))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for host, held_back in deferred.items():
            await self.queue.defer(held_back, self.gate.deferral_s(host))
            self.stats.deferred += len(held_back)
            self.metrics.deferred.inc(len(held_back))

    # ---- one item --------------------------------------------------------------------
    async def _process(self, item: Item, host: str, on_disk: bool) -> None:
        try:
            rec = await self._handle(item, host, on_disk)
            result = encode_result(item.id, item.shard, item.name, rec)
        except asyncio.CancelledError:
            raise
        except OutputUnwritable as exc:
            # Nothing is wrong with the item: it goes back to the queue, for a worker whose
            # output takes it (this one once its output is writable again).
            self._block_output(str(exc))
            self.to_hand_back.append(item)
            self.flushed.set()
            return
        except Exception as exc:
            # Not recorded: the item stays leased and is redelivered; after max_deliveries
            # it becomes a dead letter carrying this reason.
            log.exception("item %s/%s failed", item.shard, item.name)
            reason = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(RedisError, OSError):
                await self.queue.note_error(item.id, reason)
            self.held.pop(item.id, None)
            self.room.set()
            return
        st = rec.status
        self.stats.count(st, rec.bytes)
        self.metrics.image(st, rec.bytes, rec.source_bytes)
        if st != status.OK:
            self.failure_log.failure(host, st, rec.error)
        if st not in (status.OK, status.BAD_URL, status.BAD_NAME) and host:
            self.failed_hosts[host] = self.failed_hosts.get(host, 0) + 1
            if st in status.GONE_STATUSES:
                self.gone_hosts[host] = self.gone_hosts.get(host, 0) + 1
        self.results.append(result)
        if len(self.results) >= self.cfg.worker.flush_batch:
            self.flushed.set()

    async def _handle(self, item: Item, host: str, on_disk: bool) -> status.Record:
        if on_disk:
            existing = await self._existing(item)
            if existing is not None:
                return existing
        retries = Retries(self.cfg.fetch)
        while True:
            res, answered_by = await self._fetch_politely(item.url, host)
            if res.retry_after is not None:
                self.metrics.retry_after.inc()
                limit = self.cfg.fetch.retry_after_max_s
                self.gate.penalize(answered_by, min(res.retry_after, limit))
            delay = retries.after(res)
            if delay is None:
                break
            self.metrics.retries.inc()
            await asyncio.sleep(delay)
        attempts = retries.attempts
        if not res.ok:
            return status.make_record(
                item.name,
                item.url,
                res.status,
                http_code=res.http_code,
                error=res.error,
                attempts=attempts,
            )
        return await self._store_image(item, res.body, res.http_code, attempts)

    async def _fetch_politely(self, url: str, host: str) -> tuple[FetchResult, str]:
        """Fetch within `host`'s limits; a redirect to another host waits for that host's
        limits before it is followed. Returns the result and the host that gave it."""
        m = self.metrics
        waiting = time.monotonic()
        async with self.gate.slot(host):
            await self.bodies.room()  # while the image pool has its fill of bodies
            started = time.monotonic()
            m.host_wait_seconds.observe(started - waiting)
            res = await self.fetcher.fetch(url)
            m.fetch_seconds.observe(time.monotonic() - started)
        while res.status == OTHER_HOST:
            host = URL(res.final_url).host or ""
            waiting = time.monotonic()
            async with self.gate.slot(host):
                started = time.monotonic()
                m.host_wait_seconds.observe(started - waiting)
                res = await self.fetcher.fetch(res.final_url, res.hops)
                m.fetch_seconds.observe(time.monotonic() - started)
        return res, host

    async def _store_image(
        self, item: Item, body: bytes, http_code: int, attempts: int
    ) -> status.Record:
        final = self.store.target(item.shard, item.name)
        started = time.monotonic()
        try:
            img = await self._pool.run(self.store.image_job, self.settings, final, data=body)
        except ImageJobTimeout as exc:
            return status.make_record(
                item.name, item.url, status.IMAGE_TIMEOUT, error=str(exc), http_code=http_code,
                attempts=attempts, source_bytes=len(body),
            )  # fmt: skip
        finally:
            self.metrics.image_seconds.observe(time.monotonic() - started)
            self.bodies.give_back(len(body))  # taken while it arrived (Fetcher)
            self.stats.peak_waiting_bytes = self.bodies.peak
        img = await self.store.finish(item.shard, item.name, img)
        if img.status == OUTPUT_UNWRITABLE:
            raise OutputUnwritable(img.error)
        common = {
            "http_code": http_code,
            "attempts": attempts,
            "source_mimetype": img.mimetype,
            "source_bytes": len(body),
            "orig_width": img.orig_width,
            "orig_height": img.orig_height,
        }
        if img.status != status.OK:
            return status.make_record(item.name, item.url, img.status, error=img.error, **common)
        return status.make_record(
            item.name, item.url, status.OK,
            mimetype=img.stored_mimetype, bytes=img.stored_bytes, width=img.width,
            height=img.height, sha256=img.sha256, path=self.store.relative(item.shard, item.name),
            **common,
        )  # fmt: skip

    async def _existing(self, item: Item) -> status.Record | None:
        """A complete file from an earlier run: record it without fetching again."""
        try:
            if self.store.remote:
                data = await self.store.stored_bytes(item.shard, item.name)
                img = None if data is None else (
                    await self._pool.run(verify_bytes, self.settings, data=data)
                )  # fmt: skip
            else:
                final = self.store.target(item.shard, item.name)
                img = await self._pool.run(verify_stored, final, self.settings)
        except ImageJobTimeout:
            return None  # fetched again, and then recorded as what it is
        if img is None:
            return None  # gone, or not a valid image after all: fetch again
        return status.make_record(
            item.name, item.url, status.OK,
            mimetype=img.stored_mimetype, bytes=img.stored_bytes, width=img.width,
            height=img.height, orig_width=img.orig_width, orig_height=img.orig_height,
            sha256=img.sha256, path=self.store.relative(item.shard, item.name),
            error="already on disk", source_mimetype=img.mimetype, source_bytes=img.stored_bytes,
        )  # fmt: skip

    # ---- background ------------------------------------------------------------------
    async def _flush_once(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flushed.wait(), self.cfg.worker.flush_interval_s)
        self.flushed.clear()
        await self._flush()

    async def _flush(self) -> None:
        if self.to_hand_back:
            back = list(self.to_hand_back)
            await self.queue.hand_back(back)
            del self.to_hand_back[: len(back)]
            for item in back:
                self.held.pop(item.id, None)
            log.warning("handed back %d items: the output cannot be written", len(back))
            self.room.set()
        while self.results:
            batch = self.results[: self.cfg.worker.flush_batch]
            completed = await self.queue.record(batch)  # raises while Redis is away
            self._redis_call()
            del self.results[: len(batch)]
            for item_id, *_ in batch:
                self.held.pop(item_id, None)
            self.room.set()
            for shard in completed:
                self._spawn(self._finalize(shard))

    async def _final_flush(self) -> None:
        deadline = time.monotonic() + self._final_flush_s()
        while self.results and time.monotonic() < deadline:
            try:
                await self._flush()
            except (RedisError, OSError) as exc:
                if self.force_exit.is_set():
                    break
                log.warning("final flush: Redis unavailable (%s)", exc)
                await asyncio.sleep(0.5)
        if self.results:
            log.error("%d results not recorded (Redis unreachable); items will be redelivered",
                      len(self.results))  # fmt: skip

    async def _finalize(self, shard: str) -> None:
        try:
            await self.shards.finalize(shard)
        except ReportWriteError as exc:
            self._block_output(str(exc))  # the shard stays complete: written once it can be

    def _block_output(self, reason: str) -> None:
        if not self.output_blocked:
            log.error("output cannot be written (%s): taking no work until it can", reason)
        self.output_blocked = reason
        self._output_ok.clear()

    async def _probe_output(self) -> None:
        """While the output is blocked (and once at start): is it writable again?"""
        if not self.output_blocked and self._output_probed:
            return
        self._output_probed = True
        problem = await asyncio.to_thread(output_problem, self.store.storage)
        if problem:
            self._block_output(problem)
        elif self.output_blocked:
            log.warning("output can be written again: taking work")
            self.output_blocked = ""
            self._output_ok.set()
            self.room.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_task_error)

    async def _renew_once(self) -> None:
        """Reset the lease clock of every held item."""
        ids = list(self.held)
        if ids:
            await self.queue.renew(self.id, ids)

    async def _maintain_once(self) -> None:
        """Reclaim of expired leases (and dead letters), deferred items, temporary files."""
        if not self.stopping.is_set():
            free = self.cfg.worker.window - len(self.held)
            if free > 0 and not self.output_blocked:
                claimed, buried = await self.queue.reclaim(self.id, min(free, 500))
                self.stats.reclaimed += len(claimed)
                self.stats.dead_lettered += buried
                self.metrics.reclaimed.inc(len(claimed))
                self.metrics.dead_lettered.inc(buried)
                if claimed:
                    await self._take(claimed)
            await self.queue.promote()
        self.gate.prune()
        if time.monotonic() - self._last_sweep > 600:
            self._last_sweep = time.monotonic()
            await asyncio.to_thread(self._sweep)

    async def _report_once(self) -> None:
        """Reports of complete shards (a report that cannot be written blocks the output)."""
        if self.output_blocked:
            return
        try:
            await self.shards.finalize_all()
        except ReportWriteError as exc:
            self._block_output(str(exc))

    def _sweep(self) -> None:
        if self.store.remote:
            return  # (an object is one PUT: no temporary files)
        out = Path(self.store.output)
        if out.is_dir():
            for shard_dir in out.iterdir():
                if (
                    shard_dir.is_dir()
                    and not shard_dir.is_symlink()
                    and shard_dir.name[:1] not in "_."
                ):
                    sweep_temporary(shard_dir)
            # temporary reports and summaries of writers that were killed or failed
            # (`.tmp-*` and `.<name>.<pid>.tmp` files)
            sweep_temporary(out / status.STATUS_DIR)
            sweep_temporary(out / status.STATUS_DIR, pattern=".*.tmp")

    async def _summary_loop(self) -> None:
        """The periodic one-line INFO summary (see core.logs)."""
        while True:
            await asyncio.sleep(self.cfg.worker.log_interval_s)
            log.info(
                "worker %s: %s", self.id, self.log_stats.line(self.stats.by_status, len(self.held))
            )

    async def _gc_loop(self) -> None:
        """Collect cyclic garbage on a timer (automatic collection is off: see _tune_gc)."""
        for tick in itertools.count(1):
            await asyncio.sleep(_GC_YOUNG_S)
            gc.collect(2 if tick % _GC_FULL_EVERY == 0 else 1)

    async def _heartbeat(self) -> None:
        key = self.keys.worker(self.id)
        elapsed = max(1e-6, time.time() - self.stats.started)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self.stats.started,
                "seen": time.time(),
                "processed": self.stats.processed,
                "held": len(self.held),
                "rate": round(self.stats.processed / elapsed, 2),
                "stopping": int(self.stopping.is_set()),
                "paused": self._ready() if self.output_blocked else "",
            },
        )
        pipe.expire(key, int(self.cfg.worker.heartbeat_interval_s * 3) + 1)
        failed, self.failed_hosts = self.failed_hosts, {}
        gone, self.gone_hosts = self.gone_hosts, {}
        for host, n in failed.items():
            pipe.zincrby(self.keys.hosts_failed, n, host)
        for host, n in gone.items():
            pipe.zincrby(self.keys.hosts_gone, n, host)
        if failed:
            pipe.zremrangebyrank(self.keys.hosts_failed, 0, -10_001)
        if gone:
            pipe.zremrangebyrank(self.keys.hosts_gone, 0, -10_001)
        try:
            await pipe.execute()
        except (RedisError, OSError):
            for host, n in failed.items():  # keep them for the next beat
                self.failed_hosts[host] = self.failed_hosts.get(host, 0) + n
            for host, n in gone.items():
                self.gone_hosts[host] = self.gone_hosts.get(host, 0) + n
            raise
        self.metrics.redis_ok()
        self.metrics.held.set(len(self.held))
        self.metrics.tick()
        await self._sample_history()

    async def _sample_history(self) -> None:
        """One worker in the fleet appends a (time, done, queued) sample every 10 s."""
        if not await self.client.set(self.keys.history_turn, self.id, nx=True, px=9500):
            return
        counts = await self.client.hgetall(self.keys.counts)
        done = sum(int(v) for k, v in counts.items() if k != b"bytes")
        depth = await self.queue.depth()
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(self.keys.history, f"{time.time():.1f} {done} {depth}")
        pipe.ltrim(self.keys.history, 0, 8639)  # a day of 10 s samples
        await pipe.execute()

    def _redis_call(self) -> None:
        self.stats.redis_calls += 1
        self.metrics.redis_calls.inc()
        self.metrics.redis_ok()


_gc_users = 0  # workers running in this process
_gc_was_enabled = True  # whether automatic collection was on before the first one started


def _tune_gc() -> None:
    """Garbage collection on a timer, not on allocation counts: what start-up allocated
    (modules, config, sessions) is frozen out of every later collection, automatic collection
    is off while a worker runs, and `Worker._gc_loop` collects the young generations every
    five seconds and everything every minute.

    Almost nothing a crawl allocates is cyclic garbage (174 objects found in 10,000 images),
    but every item's tasks, futures and buffers count towards the automatic thresholds: with
    the youngest generation at 7000 objects, collections take ~9 % of the worker's CPU (0.38 s
    of CPU per 10,000 images; on the timer: 0.11 s; see docs/performance.md).
    The timer also bounds how long cyclic garbage lives: five seconds in the young
    generations."""
    global _gc_users, _gc_was_enabled
    _gc_users += 1
    if _gc_users == 1:
        _gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()


def _untune_gc() -> None:
    """When the last worker of the process stops (tests and embedders run workers in longer-
    lived processes), the collector is as it was."""
    global _gc_users
    _gc_users -= 1
    if _gc_users == 0:
        gc.unfreeze()
        if _gc_was_enabled:
            gc.enable()


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("background task failed: %s", "".join(traceback.format_exception(exc)[-3:]))


async def run_worker(
    cfg: Config, *, until_idle: bool = False, handle_signals: bool = True
) -> Worker:
    """Run a worker until it is stopped (or, with until_idle, idle). With `handle_signals`,
    SIGTERM/SIGINT stop it gracefully (`Worker.request_stop`), a second one stops it at once,
    and a stop that overruns `Worker.stop_deadline_s` ends the process (`runtime.exit_after`)."""
    worker = Worker(cfg)
    if not handle_signals:
        await worker.run(until_idle=until_idle)
        return worker
    with StopSignals(
        on_stop=worker.request_stop,
        on_force=worker.request_stop,
        stop_deadline_s=worker.stop_deadline_s(),
    ):
        await worker.run(until_idle=until_idle)
    return worker
