"""Per-host politeness: a maximum rate and concurrency per host, locally and fleet-wide.

Locally, each host has a FIFO of waiting requests, a concurrency cap and a minimum spacing;
a host at its limit only delays its own waiters (each request waits on its own future, so no
host blocks another). Fleet-wide, a GCRA in Redis hands out start times: the gate asks for
permits for many hosts in one batched script call, so the Redis cost is one round trip per
batch, not per request. A Retry-After pushes the host back locally and fleet-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis.asyncio as aioredis

from core.config import LimitsConfig
from core.connection import RedisRetry
from core.keys import Keys
from core.scripts import Scripts
from core.tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class HostState:
    host: str
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    active: int = 0
    next_start: float = 0.0  # local spacing (monotonic)
    not_before: float = 0.0  # Retry-After (monotonic)
    permits: deque[float] = field(default_factory=deque)  # fleet start times (monotonic)
    permit_requested: bool = False
    timer: asyncio.TimerHandle | None = None
    last_used: float = 0.0
    throttled: int = 0  # times a request had to wait for this host
    finished: deque[float] = field(default_factory=lambda: deque(maxlen=32))  # release times

    def served_rate(self) -> float | None:
        """Requests per second this host's recent requests finished at (None: too few)."""
        if len(self.finished) < 2:
            return None
        span = self.finished[-1] - self.finished[0]
        return (len(self.finished) - 1) / span if span > 0 else None


DEFERRAL_MIN_S = 2.0
DEFERRAL_MAX_S = 300.0


def deferral_s(backlog: int, rate: float | None) -> float:
    """Seconds a busy host's excess items stay deferred: half the time its `backlog` takes at
    `rate` requests/s (the configured limit, or with limits off the rate its requests have been
    finishing at), within [DEFERRAL_MIN_S, DEFERRAL_MAX_S]; the minimum when the rate is not
    known yet."""
    if not rate:
        return DEFERRAL_MIN_S
    return min(DEFERRAL_MAX_S, max(DEFERRAL_MIN_S, backlog / rate / 2))


@dataclass
class Admitted(Generic[T]):
    """A batch of work split by host backlog (`HostGate.admit`)."""

    taken: list[tuple[T, str]]  # with its host
    deferred: dict[str, list[T]]  # by host: beyond that host's backlog


class HostGate:
    def __init__(
        self,
        cfg: LimitsConfig,
        client: aioredis.Redis | None,
        keys: Keys | None,
        *,
        on_throttle: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_throttle = on_throttle
        self.client = client
        self.keys = keys
        self.scripts = Scripts(client) if client is not None else None
        self.fleet = client is not None and cfg.host_rate > 0
        self.spacing = 1.0 / cfg.local_host_rate if cfg.local_host_rate > 0 else 0.0
        self.hosts: dict[str, HostState] = {}
        self._permit_wanted: set[HostState] = set()
        self._permit_event = asyncio.Event()
        self._permit_task: asyncio.Task[None] | None = None
        self.round_trips = 0

    # ---- public ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Wait for the host's turn; hold one of its concurrency slots meanwhile."""
        st = self.hosts.get(host)
        if st is None:
            st = self.hosts[host] = HostState(host)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.waiters.append(fut)
        self._pump(st)
        if not fut.done():
            st.throttled += 1
            if self.on_throttle is not None:
                self.on_throttle()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(st)  # granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    st.waiters.remove(fut)
            raise
        try:
            yield
        finally:
            self._release(st)

    def admit(self, items: Iterable[T], host_of: Callable[[T], str]) -> Admitted[T]:
        """Take each item unless its host already has `host_backlog` requests waiting or
        running here, counting the items taken before it; the others are to be deferred
        (for `deferral_s` of their host), so that one busy host cannot fill the window."""
        limit = self.cfg.host_backlog
        out: Admitted[T] = Admitted([], {})
        batch: dict[str, int] = {}  # items of each host taken from this batch (not yet waiting)
        for item in items:
            host = host_of(item)
            if self.backlog(host) + batch.get(host, 0) >= limit:
                out.deferred.setdefault(host, []).append(item)
                continue
            batch[host] = batch.get(host, 0) + 1
            out.taken.append((item, host))
        return out

    def backlog(self, host: str) -> int:
        st = self.hosts.get(host)
        return len(st.waiters) + st.active if st else 0

    def deferral_s(self, host: str) -> float:
        """How long to keep `host`'s excess items out of this worker: see `deferral_s`."""
        rates = [r for r in (self.cfg.local_host_rate, self.cfg.host_rate) if r > 0]
        st = self.hosts.get(host)
        rate = min(rates) if rates else (st.served_rate() if st else None)
        return deferral_s(self.backlog(host), rate)

    def penalize(self, host: str, delay_s: float) -> None:
        """Retry-After: no request to host for delay_s seconds, here and fleet-wide."""
        st = self.hosts.get(host)
        if st is None:
            st = self.hosts[host] = HostState(host)
        st.not_before = max(st.not_before, time.monotonic() + delay_s)
        if self.fleet and self.scripts is not None and self.keys is not None:
            task = asyncio.ensure_future(
                self.scripts.gcra_penalize(
                    keys=[self.keys.host_limit(host)], args=[int(delay_s * 1000)]
                )
            )
            task.add_done_callback(_log_failure)

    def throttled_hosts(self, top: int = 20) -> list[tuple[str, int]]:
        ranked = sorted(self.hosts.values(), key=lambda s: s.throttled, reverse=True)
        return [(s.host, s.throttled) for s in ranked[:top] if s.throttled]

    def prune(self, idle_s: float = 60.0) -> None:
        """Forget hosts idle for a while (bounded memory over a long crawl)."""
        now = time.monotonic()
        for host, st in list(self.hosts.items()):
            if (
                not st.waiters
                and st.active == 0
                and st.timer is None
                and now - st.last_used > idle_s
                and now > st.not_before
            ):
                del self.hosts[host]

    async def close(self) -> None:
        if self._permit_task is not None:
            await cancel_and_wait([self._permit_task])
        for st in self.hosts.values():
            if st.timer is not None:
                st.timer.cancel()

    # ---- scheduling ------------------------------------------------------------------
    def _release(self, st: HostState) -> None:
        st.active -= 1
        st.last_used = time.monotonic()
        st.finished.append(st.last_used)
        self._pump(st)

    def _pump(self, st: HostState) -> None:
        """Grant waiting requests of one host as far as its limits allow."""
        while st.waiters and st.active < self.cfg.host_concurrency:
            if st.waiters[0].done():  # cancelled waiter
                st.waiters.popleft()
                continue
            now = time.monotonic()
            start = max(st.next_start, st.not_before)
            if self.fleet:
                if not st.permits:
                    self._want_permits(st)
                    return
                start = max(start, st.permits[0])
            if start > now + 0.0005:
                self._wake_at(st, start)
                return
            if self.fleet:
                st.permits.popleft()
            st.next_start = now + self.spacing
            st.active += 1
            st.last_used = now
            st.waiters.popleft().set_result(None)

    def _wake_at(self, st: HostState, when: float) -> None:
        if st.timer is not None:
            if st.timer.when() <= when + 1e-3:
                return
            st.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.monotonic())
        st.timer = loop.call_at(loop.time() + delay, self._on_timer, st)

    def _on_timer(self, st: HostState) -> None:
        st.timer = None
        self._pump(st)

    # ---- fleet permits ---------------------------------------------------------------
    def _want_permits(self, st: HostState) -> None:
        if st.permit_requested:
            return
        st.permit_requested = True
        self._permit_wanted.add(st)
        self._permit_event.set()
        if self._permit_task is None or self._permit_task.done():
            self._permit_task = asyncio.ensure_future(self._permit_loop())

    async def _permit_loop(self) -> None:
        await RedisRetry("fleet rate limiter", base_s=0.1, cap_s=5.0).every(self._permit_once)

    async def _permit_once(self) -> None:
        """Permits for every host that wants some, in calls of up to 500 hosts; on a failure
        the hosts want them again (asked for after the backoff)."""
        await self._permit_event.wait()
        await asyncio.sleep(0.005)  # gather the hosts of this tick into one call
        self._permit_event.clear()
        batch = list(self._permit_wanted)
        self._permit_wanted.clear()
        try:
            for start in range(0, len(batch), 500):
                await self._fetch_permits(batch[start : start + 500])
        except Exception:
            for st in batch:
                st.permit_requested = False
                self._want_permits(st)
            raise

    async def _fetch_permits(self, batch: list[HostState]) -> None:
        assert self.scripts is not None and self.keys is not None
        interval_ms = 1000.0 / self.cfg.host_rate
        tau_ms = interval_ms * (self.cfg.host_burst - 1)
        counts = [
            max(1, min(len(st.waiters), self.cfg.host_concurrency) - len(st.permits))
            for st in batch
        ]
        reply = await self.scripts.gcra_reserve(
            keys=[self.keys.host_limit(st.host) for st in batch],
            args=[interval_ms, tau_ms, *counts],
        )
        self.round_trips += 1
        received = time.monotonic()
        for st, delays in zip(batch, reply, strict=True):
            st.permit_requested = False
            st.permits.extend(received + float(d) / 1000.0 for d in delays)
            self._pump(st)


def _log_failure(task: asyncio.Future[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not record Retry-After fleet-wide: %s", task.exception())
