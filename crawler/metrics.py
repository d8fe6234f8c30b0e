"""What one worker process counts: its `WorkerStats` (its heartbeat and summary line) and its
Prometheus metrics, with the HTTP endpoints that serve them (through `core.runtime.serving`).

Names follow Prometheus conventions (``_total``, ``_seconds``, ``_bytes``); no ``_created``
series. A worker exports what it does; facts of the whole crawl (queue depth, leased, dead
letters, images by status) are served once, as ``mmc4_fleet_*``, by ``serve`` (one name per
fact). Hosts never appear as labels (unbounded cardinality): the status page lists the top
failing hosts instead.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.status import Status

disable_created_metrics()  # type: ignore[no-untyped-call]  # no _created series

FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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

    def count(self, st: Status, nbytes: int) -> None:
        self.processed += 1
        self.by_status[st] = self.by_status.get(st, 0) + 1
        self.bytes += nbytes

    def beat(self, *, held: int, stopping: bool, paused: str) -> dict[str, str | int | float]:
        """The worker's heartbeat fields (see core.heartbeat)."""
        elapsed = max(1e-6, time.time() - self.started)
        return {
            "started": self.started,
            "processed": self.processed,
            "held": held,
            "rate": round(self.processed / elapsed, 2),
            "stopping": int(stopping),
            "paused": paused,
        }


def _version() -> str:
    try:
        return metadata.version("mmc4-crawler")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.images = Counter(
            "mmc4_images_total", "Images given a terminal status, by status", ["status"], registry=r
        )
        self.fetched_bytes = Counter(
            "mmc4_fetched_bytes_total", "Bytes downloaded (decompressed bodies)", registry=r
        )
        self.stored_bytes = Counter("mmc4_stored_bytes_total", "Bytes written", registry=r)
        Info("mmc4_build", "Version of the crawler and its Python", registry=r).info(
            {"version": _version(), "python": platform.python_version()}
        )  # exported as mmc4_build_info{version=...,python=...} 1
        self._add_fetch_metrics(r)
        self._add_queue_metrics(r)
        self._add_worker_metrics(r)
        self.last_redis_ok_at = 0.0
        self._window: list[tuple[float, int]] = []
        self._done = 0

    def _add_fetch_metrics(self, r: CollectorRegistry) -> None:
        self.fetch_seconds = Histogram(
            "mmc4_fetch_duration_seconds",
            "Time of one HTTP request to a host, from sending it to the end of the body (the "
            "wait for the host's limits is mmc4_host_wait_seconds)",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.host_wait_seconds = Histogram(
            "mmc4_host_wait_seconds",
            "Time a request waited for its host's rate and concurrency limits (politeness) and "
            "for room among the bodies waiting for image processing",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "mmc4_fetch_retries_total",
            "HTTP attempts repeated after a transient failure (timeout, connection error, 429, "
            "5xx)",
            registry=r,
        )
        self.image_seconds = Histogram(
            "mmc4_image_processing_seconds",
            "Time from handing a downloaded body to the image processes to its stored result "
            "(decode, shrink, encode, write; waiting for a free process included)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.throttled = Counter(
            "mmc4_host_throttled_total",
            "Requests that had to wait for their host's rate or concurrency limit",
            registry=r,
        )
        self.retry_after = Counter(
            "mmc4_host_retry_after_total", "Responses whose Retry-After slowed a host", registry=r
        )

    def _add_queue_metrics(self, r: CollectorRegistry) -> None:
        self.reclaimed = Counter(
            "mmc4_reclaimed_total", "Items claimed after another worker's lease expired", registry=r
        )
        self.dead_lettered = Counter(
            "mmc4_dead_lettered_total", "Items this worker turned into dead letters", registry=r
        )
        self.deferred = Counter(
            "mmc4_deferred_total",
            "Items deferred because their host's backlog was full",
            registry=r,
        )
        self.redis_calls = Counter(
            "mmc4_redis_round_trips_total", "Redis round trips on the hot path", registry=r
        )

    def _add_worker_metrics(self, r: CollectorRegistry) -> None:
        self.loop_lag = Histogram(
            "mmc4_event_loop_lag_seconds",
            "How late the worker's event loop ran a timer (a blocked loop delays every request)",
            buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.held = Gauge("mmc4_worker_held_items", "Items this worker holds", registry=r)
        self.rate = Gauge(
            "mmc4_worker_images_per_second", "Images/s of this worker (last minute)", registry=r
        )
        self.last_redis_ok = Gauge(
            "mmc4_last_redis_success_timestamp_seconds", "Last successful Redis call", registry=r
        )

    def image(self, status: Status, stored_bytes: int, fetched_bytes: int) -> None:
        self.images.labels(status).inc()
        if stored_bytes:
            self.stored_bytes.inc(stored_bytes)
        if fetched_bytes:
            self.fetched_bytes.inc(fetched_bytes)
        self._done += 1

    def tick(self) -> None:
        """Update the images/s gauge from a one-minute window of samples."""
        now = time.monotonic()
        self._window.append((now, self._done))
        while len(self._window) > 2 and now - self._window[0][0] > 60:
            self._window.pop(0)
        t0, d0 = self._window[0]
        self.rate.set((self._done - d0) / (now - t0) if now > t0 else 0.0)

    def redis_ok(self) -> None:
        self.last_redis_ok_at = time.time()
        self.last_redis_ok.set(self.last_redis_ok_at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: Metrics, unready: Callable[[], str]) -> web.Application:
    """/metrics, /healthz (the process answers) and /readyz (the worker can work: Redis
    answered recently and the output can be written). `unready` says why not ("" if it can)."""

    async def get_metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        why = unready()
        if not why:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
