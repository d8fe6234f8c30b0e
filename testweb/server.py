"""A web of our own on loopback: real images and real faults for tests, the demo and the benchmark.

The network is closed, so the crawler is exercised against :class:`ImageWeb`: ``hosts`` HTTP
servers on ``127.0.0.<first_host>``, ``127.0.0.<first_host + 1>``, … all on ONE port (on Linux all
of 127.0.0.0/8 routes to ``lo``; one aiohttp ``TCPSite`` is bound per address, never 0.0.0.0).
Every host serves every path; every response is generated from the URL alone (same URL, same
bytes), nothing is read from disk. Every request is logged as an :class:`Arrival` so tests can
assert per-host rate (:func:`check_rate`) and concurrency (:func:`max_concurrency`) limits.

URL scheme (``<tail>`` is an optional image spec: ``<w>x<h>/<name>.<fmt>``, ``<w>x<h>.<fmt>``,
``img/<w>x<h>/<name>.<fmt>``, or ``<name>[.<fmt>]`` for a 64×64 image (JPEG without extension);
empty means a 64×64 JPEG named after the fault; image query options apply to it too)::

    /img/<w>x<h>/<name>.<fmt>            fmt: jpg|jpeg|png|webp|gif; a real image of w×h
        ?mode=cmyk|RGB|RGBA|L|LA|P|1|I;16  pixel mode (cmyk: JPEG only; I;16: PNG only)
        ?transparency=1                    with mode=P: palette index 0 is transparent
        ?exif=6                            EXIF orientation tag (stored pixels stay w×h)
        ?frames=5                          animated (gif, webp, png)
        ?q=85                              JPEG/WebP quality
        ?ctype=text/html                   any Content-Type header (a wrong one)
    /fault/status/<code>[/...]           that status with a short text body
    /fault/retry-after/<code>/<value>    e.g. 429 or 503 with ``Retry-After: <value>``
    /fault/flaky/<k>/<id>[/<tail>]       503 (``?status=``, ``?retry_after=``) for the first k
                                         requests of (k, id), then the image
    /fault/slow/<ms>[/<tail>]            waits ms before the headers, then the image
    /fault/trickle/<bytes_per_s>[/<tail>]  the image's bytes, sent slowly
    /fault/huge/<bytes>                  JPEG header + junk, that many bytes (``?cl=0``: chunked,
                                         no Content-Length)
    /fault/redirect/<n>[/<tail>]         n redirect hops (``?code=301|302|303|307|308``), then image
    /fault/redirect-loop                 302 -> /fault/redirect-loop/b -> 302 -> back, for ever
    /fault/redirect-to/<quoted url>      302 to that URL (loopback targets only; or ``?to=``)
        ?wait_ms=500                       (any redirect) waits that long before answering
    /fault/html[/...], /fault/svg[/...]  an HTML page / an SVG document, status 200
    /fault/truncated/<w>x<h>.<fmt>       the first half of a valid image (``?keep=0.5``)
    /fault/corrupt[/...]                 random bytes behind a JPEG magic number (``?bytes=8192``)
    /fault/bomb[/...]                    a tiny 1-bit PNG whose header claims 30000×30000
                                         (``?size=WxH``; ``?full=1``: complete zlib bomb, ~110 KB)
    /fault/empty[/...]                   200, Content-Type image/jpeg, empty body
    /fault/optout/<directive>[/<tail>]   the image with ``X-Robots-Tag: <directive>`` (url-decoded,
                                         e.g. ``noai``, ``noimageai``, ``googlebot:%20noai``;
                                         ``?tag=`` overrides, ``?header=`` names another header)
    /fault/reset[/<tail>]                Content-Length of the image, half the body, then a TCP RST
    /fault/flaky-reset/<k>/<id>[/<tail>]  /fault/reset for the first k requests of (k, id), then
                                         the image
    /fault/hang[/...]                    never answers: no status line, the connection held open
                                         until the client leaves
    /fault/drop[/...]                    closes the connection without any response
    /fault/gzip[/<tail>]                 the image with ``Content-Encoding: gzip``
    /fault/frames/<n>                    an animated GIF of n 1x1 frames (23 bytes each)
    /fault/zip-bomb/<bytes>              that many zero bytes, gzip-compressed (``?enc=deflate``:
                                         zlib), served with the matching ``Content-Encoding``

Times are ``time.monotonic()`` of the server process (CLOCK_MONOTONIC on Linux, so comparable
with other processes on the same machine).

CLI: ``python -m testweb serve --hosts 8 --port 18650 [--log arrivals.jsonl]`` and
``python -m testweb shard OUT.jsonl --port 18650 --hosts 8 --docs 200 --seed 1 --faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import unquote

import orjson
from aiohttp import web

from testweb import faults
from testweb.arrivals import Arrival, check_rate, max_concurrency, min_interval
from testweb.images import SpecError, seed_of
from testweb.respond import REQUEST, RequestState, Responder


@dataclass(frozen=True)
class Latency:
    """Per-response delay for the benchmark: lognormal before the headers, plus slow hosts.

    Delay = ``median_ms · exp(sigma · N(0, 1))``, capped at ``max_ms``. Slow hosts (the indices
    in ``slow_hosts``, or else a seeded ``slow_host_share`` of all hosts, at least one when the
    share is > 0) add ``slow_delay_ms`` ("delay") or send image bodies at ``slow_bytes_per_s``
    ("trickle").
    """

    median_ms: float = 150.0
    sigma: float = 0.5
    max_ms: float = 10_000.0
    slow_host_share: float = 0.0
    slow_hosts: tuple[int, ...] | None = None
    slow_mode: Literal["delay", "trickle"] = "delay"
    slow_delay_ms: float = 5_000.0
    slow_bytes_per_s: int = 20_000
    seed: int | None = None

    def pick_slow_hosts(self, n_hosts: int, seed: int) -> frozenset[int]:
        if self.slow_hosts is not None:
            return frozenset(self.slow_hosts)
        if self.slow_host_share <= 0:
            return frozenset()
        k = min(n_hosts, max(1, round(self.slow_host_share * n_hosts)))
        return frozenset(random.Random(seed_of("slow", seed)).sample(range(n_hosts), k))

    def sample_s(self, rng: random.Random) -> float:
        if self.median_ms <= 0:
            return 0.0
        ms = self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return min(ms, self.max_ms) / 1000.0


async def cancel_others() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class ImageWeb(Responder):
    """``hosts`` loopback HTTP hosts ``127.0.0.<first_host>…`` on one port; see the module doc.

    Use ``async with ImageWeb() as web:``, ``await web.start()``/``await web.stop()``, or
    ``with ImageWeb().running_in_thread() as web:`` (own loop in a daemon thread). ``port=0``
    picks a port free on every host address.
    """

    def __init__(
        self,
        hosts: int = 8,
        port: int = 0,
        *,
        first_host: int = 2,
        latency: Latency | None = None,
        seed: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        cache_bytes: int = 512 * 1024 * 1024,
        workers: int | None = None,
    ) -> None:
        super().__init__(cache_bytes)
        if hosts < 1:
            raise ValueError("hosts must be >= 1")
        base = int(ipaddress.IPv4Address("127.0.0.0"))
        if first_host < 1 or first_host + hosts - 1 > 0xFFFFFE:
            raise ValueError("host addresses must stay inside 127.0.0.0/8")
        self.host_addrs: list[str] = [
            str(ipaddress.IPv4Address(base + first_host + i)) for i in range(hosts)
        ]
        self.requested_port = port
        self.port = port
        self.latency = latency
        self.seed = seed
        self.log_path = Path(log_path) if log_path is not None else None
        lat_seed = seed if latency is None or latency.seed is None else latency.seed
        self.slow_hosts: frozenset[int] = (
            latency.pick_slow_hosts(hosts, lat_seed) if latency else frozenset()
        )
        self._slow_addrs = {self.host_addrs[i] for i in self.slow_hosts if i < hosts}
        self._rng = random.Random(seed_of("latency", lat_seed))
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._log: IO[bytes] | None = None
        self.in_flight: dict[str, int] = defaultdict(int)
        self.peak_in_flight: dict[str, int] = defaultdict(int)

    # -- addresses ----------------------------------------------------------------------------

    @property
    def host_urls(self) -> list[str]:
        """Base URLs, ``http://127.0.0.2:PORT`` …, one per host (valid once started)."""
        return [f"http://{addr}:{self.port}" for addr in self.host_addrs]

    def url(self, host_index: int, path: str) -> str:
        """The URL of ``path`` on host ``host_index`` (0-based: 0 is ``127.0.0.<first_host>``)."""
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host_addrs[host_index]}:{self.port}{path}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        self.executor = ThreadPoolExecutor(self._workers, thread_name_prefix="testweb-gen")
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        attempts = 20 if self.requested_port == 0 else 1
        for attempt in range(attempts):
            sites: list[web.TCPSite] = []
            port = self.requested_port
            try:
                for addr in self.host_addrs:
                    site = web.TCPSite(runner, addr, port, backlog=1024)
                    await site.start()
                    sites.append(site)
                    if port == 0:
                        port = int(runner.addresses[-1][1])
                self.port = port
                break
            except OSError:
                for site in sites:
                    await site.stop()
                if attempt == attempts - 1:
                    await runner.cleanup()
                    self.executor.shutdown(wait=False)
                    raise
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def __aenter__(self) -> ImageWeb:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[ImageWeb]:
        """Serve on a private event loop in a daemon thread for the duration of the block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="testweb", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=60)
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=60)
                # Handlers still running (a slow or trickling response whose client left)
                # end here, not as "Task was destroyed but it is pending" at loop.close().
                asyncio.run_coroutine_threadsafe(cancel_others(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                if not thread.is_alive():
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.close()

    # -- arrivals -----------------------------------------------------------------------------

    @property
    def arrivals(self) -> list[Arrival]:
        """A copy of the arrival log (thread-safe)."""
        with self._lock:
            return list(self._arrivals)

    def clear_arrivals(self) -> None:
        with self._lock:
            self._arrivals.clear()
        self.peak_in_flight.clear()

    def reset_flaky(self) -> None:
        """Forget how often each flaky id was requested."""
        self.flaky.clear()

    def max_concurrency_per_host(self) -> dict[str, int]:
        return max_concurrency(self.arrivals)

    def min_interval_per_host(self) -> dict[str, float]:
        return min_interval(self.arrivals)

    def check_rate(self, rate: float, burst: int = 1, *, tolerance: float = 0.01) -> list[str]:
        return check_rate(self.arrivals, rate, burst, tolerance=tolerance)

    def wait_for_arrivals(
        self,
        count: int,
        timeout: float = 5.0,
        *,
        where: Callable[[Arrival], bool] | None = None,
    ) -> list[Arrival]:
        """Block until at least ``count`` arrivals (matching ``where``) are logged or ``timeout``
        passes; returns the (matching) arrivals.

        An arrival is logged just after its response was written, so a client that has read
        the response may briefly be ahead of the log (thread and process modes). Blocks: do
        not call it from the loop the web itself runs on.
        """
        deadline = time.monotonic() + timeout
        while True:
            arrivals = self.arrivals
            if where is not None:
                arrivals = [a for a in arrivals if where(a)]
            if len(arrivals) >= count or time.monotonic() >= deadline:
                return arrivals
            time.sleep(0.005)

    def _record(self, arrival: Arrival) -> None:
        line = orjson.dumps(asdict(arrival)) + b"\n"
        with self._lock:
            self._arrivals.append(arrival)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()

    # -- request handling ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.monotonic()
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = str(sockname[0]) if sockname else (request.host.rsplit(":", 1)[0])
        state = RequestState(host=host)
        REQUEST.set(state)
        self.in_flight[host] += 1
        self.peak_in_flight[host] = max(self.peak_in_flight[host], self.in_flight[host])
        status = 0
        resp: web.StreamResponse | None = None
        try:
            if self.latency is not None:
                delay = self.latency.sample_s(self._rng)
                if host in self._slow_addrs:
                    if self.latency.slow_mode == "delay":
                        delay += self.latency.slow_delay_ms / 1000.0
                    else:
                        state.trickle_bps = self.latency.slow_bytes_per_s
                if delay > 0:
                    await asyncio.sleep(delay)
            resp = await handler(request)
            if not state.broken:
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write_eof()
                status = resp.status
            return resp
        except ConnectionError:
            # The peer went away while we wrote; aiohttp closes quietly on ConnectionError.
            return resp if resp is not None else web.Response(status=500)
        finally:
            self.in_flight[host] -= 1
            self._record(Arrival(host, request.raw_path, start, time.monotonic(), status))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        parts = [unquote(p) for p in raw_path.split("/") if p]
        try:
            if not parts:
                return web.Response(text=__doc__ or "", content_type="text/plain")
            if parts[0] == "img":
                return await self.serve_image(request, parts[1:], default_name="img")
            if parts[0] == "fault" and len(parts) > 1:
                return await faults.answer(self, request, parts[1], parts[2:], raw_path)
            return web.Response(status=404, text="no such path\n")
        except SpecError as exc:
            return web.Response(status=400, text=f"bad request: {exc}\n")
