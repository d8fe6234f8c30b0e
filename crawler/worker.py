"""The crawl worker: a loop that leases items and wires the parts that work on them.

Per item the hot path is: host slot -> HTTP -> image process pool -> atomic write
(`crawler.pipeline`) -> result buffered in memory (`crawler.results`). Redis sees batches
only: XREADGROUP of many items, one RECORD script call per flush, lease renewals and fleet
permits per tick. Beside the reading loop run the flush, lease renewal, reclaim, report,
output probe and heartbeat loops, each retried as `core.connection.RedisRetry.every` retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core import status
from core.budget import BodyBudget
from core.config import Config
from core.connection import RedisRetry, connect
from core.fetch import Fetcher
from core.heartbeat import Heartbeat, sample_history
from core.keys import Keys
from core.logs import FailureLog, LogStats
from core.runtime import StopSignals, serving, watch_loop_lag
from core.session import client_session
from core.storage import output_storage
from core.tasks import cancel_and_wait
from crawler import gctimer, images
from crawler.entries import Item, encode_result
from crawler.limits import HostGate
from crawler.metrics import Metrics, WorkerStats, metrics_app
from crawler.output import PROBE_EVERY_S, Output
from crawler.pipeline import OutputUnwritable, Pipeline
from crawler.pool import image_pool
from crawler.queue import WorkQueue
from crawler.results import Results
from crawler.shards import ReportWriteError, Shards
from crawler.store import Store

log = logging.getLogger(__name__)


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
        self.held: dict[str, Item] = {}
        self.output = Output(self.store)  # no work is taken while it cannot be written
        self.stopping = asyncio.Event()  # stop taking work
        self.force_exit = asyncio.Event()  # second signal: stop now
        self.room = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Bodies being read or waiting for their image work (budget.BodyBudget).
        self.bodies = BodyBudget(cfg.worker.max_waiting_image_mb << 20)
        self.client: aioredis.Redis
        self.heartbeat: Heartbeat
        self.queue: WorkQueue
        self.gate: HostGate
        self.pipeline: Pipeline
        self.shards: Shards
        self.results: Results

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self, *, until_idle: bool = False) -> None:
        """Work until stopped (or, with until_idle, until the queue stays empty)."""
        async with contextlib.AsyncExitStack() as parts:
            await self._start(parts)
            background = [asyncio.create_task(c) for c in self._background()]
            try:
                await self._read_loop(until_idle)
                await self._drain()
            finally:
                self.stopping.set()
                await self._final_flush()
                if await cancel_and_wait(background):
                    log.error("background loops would not stop")
        self.stats.peak_waiting_bytes = self.bodies.peak
        log.info("worker %s stopped: %d processed", self.id, self.stats.processed)

    async def _start(self, parts: contextlib.AsyncExitStack) -> None:
        """Connect, start the parts, and have `parts` close them in reverse order."""
        cfg = self.cfg
        self.client = connect(cfg)
        parts.push_async_callback(self.client.aclose)
        self.heartbeat = Heartbeat(
            self.client, self.keys.worker(self.id), cfg.worker.heartbeat_interval_s, self._beat
        )
        parts.push_async_callback(self.heartbeat.remove)
        self.queue = WorkQueue(self.client, self.keys, cfg.queue)
        self.shards = Shards(self.client, self.keys, self.queue, self.store.storage)
        self.results = Results(
            cfg.worker, self.queue, self.shards, self.output,
            settled=self._settled, on_redis_call=self._redis_call,
        )  # fmt: skip
        pool = image_pool(cfg)
        parts.push_async_callback(pool.close)
        await pool.start()
        session = client_session(cfg.fetch, cfg.worker.max_connections)
        parts.push_async_callback(session.close)
        self.gate = HostGate(
            cfg.limits, self.client, self.keys, on_throttle=self.metrics.throttled.inc
        )
        parts.push_async_callback(self.gate.close)
        self.pipeline = Pipeline(
            cfg.fetch, gate=self.gate, bodies=self.bodies, pool=pool, store=self.store,
            fetcher=Fetcher(cfg.fetch, session, cfg.worker.max_connections, self.bodies),
            settings=self.settings, metrics=self.metrics,
        )  # fmt: skip
        parts.enter_context(gctimer.automatic_collection_off())
        await self._probe_output()
        await RedisRetry.from_config(self.cfg, "start").call(
            self.queue.ensure_group, stop=self.force_exit
        )
        self.metrics.redis_ok()
        if cfg.metrics.port:
            app = metrics_app(self.metrics, self._ready)
            await parts.enter_async_context(serving(app, cfg.metrics.host, cfg.metrics.port))
        log.info("worker %s started", self.id)

    def _background(self) -> list[Coroutine[Any, Any, Any]]:
        """The loops that run beside the reading loop until the worker stops."""
        q, hb = self.cfg.queue, self.cfg.worker.heartbeat_interval_s
        maintenance_s = min(q.reclaim_interval_s, q.lease_timeout_s / 3)
        return [
            self._loop(self.results.flush_once),
            self._loop(self._renew_once, maintenance_s),
            self._loop(self._maintain_once, maintenance_s),
            self._loop(self._report_once, maintenance_s),
            self._loop(self._probe_output, PROBE_EVERY_S),
            # a heartbeat retries within its own interval: a blip must not let it lapse
            self._loop(self._heartbeat, hb, max_backoff_s=hb),
            watch_loop_lag(self.metrics.loop_lag.observe),
            gctimer.collect_on_a_timer(),
            self._summary_loop(),
        ]

    def _ready(self) -> str:
        """Why this worker cannot work now ("" when it can): readiness and status say it."""
        if self.output.blocked:
            return f"output cannot be written: {self.output.blocked}"
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
        # a failed read is tried again after redis.reconnect_backoff_s, or at once on a stop
        retry = RedisRetry.from_config(self.cfg, "read", cap_s=self.cfg.redis.reconnect_backoff_s)
        while not self.stopping.is_set():
            if self.output.blocked:  # take no work the output could not keep
                await self.output.wait_writable(1.0)
                continue
            free = window - len(self.held)
            if free < min(self.cfg.queue.read_batch, window) // 4 + 1:
                self.room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room.wait(), 1.0)
                continue
            count = min(free, self.cfg.queue.read_batch)
            try:
                items = await retry.call(functools.partial(self._read, count), stop=self.stopping)
            except (RedisError, OSError):
                continue  # failed as the worker stops
            if items:
                idle_since = None
                await self._take(items)
            elif until_idle and not self.held:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.0 and await self._nothing_left():
                    return

    async def _read(self, count: int) -> list[Item]:
        if self.stopping.is_set():
            return []  # the stop came while Redis was away: take no more work
        items = await self.queue.read(self.id, count, 500)
        self._redis_call()
        return items

    async def _nothing_left(self) -> bool:
        info = await self.client.xinfo_groups(self.keys.queue)
        pending = sum(int(g["pending"]) for g in info)
        return pending == 0 and await self.queue.depth() == 0

    async def _take(self, items: list[Item]) -> None:
        admitted = self.gate.admit(items, _host)
        taken = admitted.taken
        for item, _ in taken:
            self.held[item.id] = item
        on_disk = await self.store.stored_before([(i.shard, i.name) for i, _ in taken])
        for (item, host), stored in zip(taken, on_disk, strict=True):
            task = asyncio.create_task(self._process(item, host, stored))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for host, held_back in admitted.deferred.items():
            await self.queue.defer(held_back, self.gate.deferral_s(host))
            self.stats.deferred += len(held_back)
            self.metrics.deferred.inc(len(held_back))

    # ---- one item --------------------------------------------------------------------
    async def _process(self, item: Item, host: str, on_disk: bool) -> None:
        try:
            rec = await self.pipeline.handle(item, host, on_disk)
            result = encode_result(item.id, item.shard, item.name, rec)
        except asyncio.CancelledError:
            raise
        except OutputUnwritable as exc:
            # Nothing is wrong with the item: it goes back to the queue, for a worker whose
            # output takes it (this one once its output is writable again).
            self.output.block(str(exc))
            self.results.hand_back(item)
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
            self.heartbeat.tally(self.keys.hosts_failed, host)
            if st in status.GONE_STATUSES:  # the part of the failures that is 404/410
                self.heartbeat.tally(self.keys.hosts_gone, host)
        self.results.add(result)

    # ---- background ------------------------------------------------------------------
    async def _final_flush(self) -> None:
        await self.results.final_flush(self._final_flush_s(), self.force_exit)

    def _settled(self, item_ids: Iterable[str]) -> None:
        """Redis has taken these items (recorded or handed back): room for more."""
        for item_id in item_ids:
            self.held.pop(item_id, None)
        self.room.set()

    async def _probe_output(self) -> None:
        if await self.output.probe():
            self.room.set()

    async def _renew_once(self) -> None:
        """Reset the lease clock of every held item."""
        ids = list(self.held)
        if ids:
            await self.queue.renew(self.id, ids)

    async def _maintain_once(self) -> None:
        """Reclaim of expired leases (and dead letters), deferred items, temporary files."""
        if not self.stopping.is_set():
            free = self.cfg.worker.window - len(self.held)
            if free > 0 and not self.output.blocked:
                claimed, buried = await self.queue.reclaim(self.id, min(free, 500))
                self.stats.reclaimed += len(claimed)
                self.stats.dead_lettered += buried
                self.metrics.reclaimed.inc(len(claimed))
                self.metrics.dead_lettered.inc(buried)
                if claimed:
                    await self._take(claimed)
            await self.queue.promote()
        self.gate.prune()
        await self.output.sweep_when_due()

    async def _report_once(self) -> None:
        """Reports of complete shards (a report that cannot be written blocks the output)."""
        if self.output.blocked:
            return
        try:
            await self.shards.finalize_all()
        except ReportWriteError as exc:
            self.output.block(str(exc))

    async def _summary_loop(self) -> None:
        """The periodic one-line INFO summary (see core.logs)."""
        while True:
            await asyncio.sleep(self.cfg.worker.log_interval_s)
            log.info(
                "worker %s: %s", self.id, self.log_stats.line(self.stats.by_status, len(self.held))
            )

    def _beat(self) -> dict[str, str | int | float]:
        paused = self._ready() if self.output.blocked else ""
        return self.stats.beat(held=len(self.held), stopping=self.stopping.is_set(), paused=paused)

    async def _heartbeat(self) -> None:
        await self.heartbeat.beat()
        self.metrics.redis_ok()
        self.metrics.held.set(len(self.held))
        self.metrics.tick()
        await sample_history(self.client, self.keys, self.id, self.queue.depth)

    def _redis_call(self) -> None:
        self.stats.redis_calls += 1
        self.metrics.redis_calls.inc()
        self.metrics.redis_ok()


def _host(item: Item) -> str:
    return item.target.host or ""


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
