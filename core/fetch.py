"""HTTP: one attempt at one image URL, with every cap a web-scale crawl needs.

Redirects are followed by hand so that each hop is checked (address policy, hop cap, loops).
The whole attempt (connect, headers, body) runs under one hard deadline, so a server that
trickles bytes cannot hold a slot for longer than ``total_timeout_s``; within it, each host
gets a deadline adapted to what it has shown (core.deadlines). Bodies are read up to
``max_body_bytes`` and cut off beyond it, never buffered whole (core.responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from core import status
from core.budget import BodyBudget, Slots
from core.config import FetchConfig
from core.deadlines import Judge, Progress, ResponseTimes
from core.guard import AddressPolicy, BlockedAddress, canonical, check_parsed
from core.responses import opted_out, parse_retry_after, read_capped

# Not a terminal status: the response redirects to another host (`final_url`), whose own
# limits the caller must respect before calling `fetch` again with the result's `hops`.
OTHER_HOST = status.Status("redirect_to_other_host")

REDIRECTS = frozenset((301, 302, 303, 307, 308))


@dataclass(slots=True)
class Hops:
    """Redirects followed so far in one attempt, across hosts: loop detection, the cap, and
    the time the attempt's requests have taken (one deadline covers all its hops)."""

    seen: set[str] = field(default_factory=set)
    count: int = 0
    spent_s: float = 0.0  # time spent in requests (not in waiting for a host or a slot)


@dataclass(slots=True)
class FetchResult:
    status: status.Status  # OK when a body was read, else a terminal or transient status
    http_code: int = 0
    error: str = ""
    body: bytes = b""
    final_url: str = ""
    retry_after: float | None = None
    transient: bool = False
    hops: Hops | None = None  # with OTHER_HOST: the chain so far
    # A transient failure while the host served other requests (see crawler.retries).
    host_answered: bool = False

    @property
    def ok(self) -> bool:
        return self.status == status.OK


class Fetcher:
    """One request at a time per call, redirects followed by hand, under a hard deadline.

    At most `max_connections` requests run at once. The wait for one of those slots happens
    before the deadline starts (FIFO, in this process): a request is timed from the moment it
    can go out, so a busy worker never turns its own queue into `timeout` records.
    """

    def __init__(
        self,
        cfg: FetchConfig,
        session: aiohttp.ClientSession,
        max_connections: int,
        budget: BodyBudget | None = None,
    ) -> None:
        """`budget`: bodies are read within it; an ok result's body stays counted in it until
        the caller gives it back."""
        self.cfg = cfg
        self.session = session
        self.budget = budget
        self.policy = AddressPolicy.of(cfg)
        self._slots = Slots(max_connections)
        self.times = ResponseTimes(cfg.min_timeout_s, cfg.total_timeout_s)

    async def fetch(self, url: str | URL, hops: Hops | None = None) -> FetchResult:
        """Fetch `url`, following redirects on the same host. A redirect to another host ends
        with status OTHER_HOST; pass its `final_url` and `hops` back to go on."""
        async with self._slots:
            return await self._fetch(url, hops or Hops())

    @contextlib.asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `url` for a caller that reads the body itself (a shard download): redirects,
        to any host, are followed with the same checks on every hop as `fetch`. Yields the
        final response, whatever its status. Raises BlockedAddress, ValueError (a bad
        redirect) or aiohttp's errors."""
        async with self._final(URL(url, encoded=False), Hops(), Progress(), True) as got:
            if isinstance(got, FetchResult):
                if got.status == status.BLOCKED_ADDRESS:
                    raise BlockedAddress(got.error)
                raise ValueError(got.error)
            yield got

    async def _fetch(self, url: str | URL, hops: Hops) -> FetchResult:
        progress = Progress()
        started = time.monotonic()
        try:
            res = await self._attempt(url, hops, progress)
        except BaseException:
            self._drop_body(progress)
            raise
        if not res.ok:
            self._drop_body(progress)  # read, then the deadline struck: not the caller's
        if res.transient and self.times.served_during(progress.host, started):
            # What the host did meanwhile decides the retries (see crawler.retries).
            res.host_answered = True
            res.error += "; the host served other requests meanwhile"
        return res

    def _drop_body(self, progress: Progress) -> None:
        if progress.held and self.budget is not None:
            self.budget.give_back(progress.held)
            progress.held = 0

    async def _attempt(self, url: str | URL, hops: Hops, progress: Progress) -> FetchResult:
        started = time.monotonic()
        judge: Judge | None = None
        try:
            target = url if isinstance(url, URL) else URL(url, encoded=False)
            host = target.host or ""
            ceiling = self.cfg.total_timeout_s - hops.spent_s
            adaptive = self.times.deadline_s(host)
            limit = ceiling if adaptive is None else min(ceiling, adaptive - hops.spent_s)
            if limit < ceiling:
                progress.deadline_s = adaptive
            async with asyncio.timeout(max(0.0, limit)) as deadline:
                progress.deadline = deadline
                if adaptive is None:  # nothing heard yet: judged again once something is
                    begun = asyncio.get_running_loop().time() - hops.spent_s
                    judge = Judge(self.times, deadline, host, begun, progress)
                return await self._request(target, hops, progress)
        except TimeoutError:
            error = f"deadline exceeded ({progress.describe(hops.count + 1)})"
            return FetchResult(status.TIMEOUT, error=error, transient=True)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _failed(exc)
        finally:
            hops.spent_s += time.monotonic() - started - progress.paused_s
            if judge is not None:
                judge.cancel()

    async def _request(self, url: URL, hops: Hops, progress: Progress) -> FetchResult:
        async with self._final(url, hops, progress, False) as got:
            if isinstance(got, FetchResult):
                return got
            result = await self._response(got, progress)
            took = time.monotonic() - progress.paused_s - progress.sent
            self.times.observe(progress.host, took, served=not result.transient)
            return result

    @contextlib.asynccontextmanager
    async def _final(
        self, url: URL, hops: Hops, progress: Progress, any_host: bool
    ) -> AsyncIterator[aiohttp.ClientResponse | FetchResult]:
        """GET `url`, following its redirects: yields the final response (its status line
        and headers read), or the result that ends the chain there: a refused target, a
        loop, too many hops, or OTHER_HOST for a hop to another host unless `any_host`.
        Each URL is checked once: the first before it is requested, every redirect target
        when it arrives; each is requested in its canonical spelling (`guard.canonical`)."""
        if hops.count == 0:
            refused = check_parsed(url, self.policy)
            if refused is not None:
                yield FetchResult(refused[0], error=refused[1], final_url=str(url))
                return
        url = canonical(url)
        while True:
            hops.seen.add(str(url))
            progress.headers, progress.host = False, url.host or ""
            progress.sent = time.monotonic() - progress.paused_s  # see Progress.paused
            async with self.session.get(url, allow_redirects=False) as resp:
                progress.headers = True
                location = resp.headers.get("Location") if resp.status in REDIRECTS else None
                if not location:
                    yield resp
                    return
                code, nxt = resp.status, canonical(url.join(URL(location)))
            self.times.observe(progress.host, time.monotonic() - progress.paused_s - progress.sent)
            ended = self._hop(url, nxt, code, hops, any_host)
            if ended is not None:
                yield ended
                return
            url = nxt

    def _hop(self, url: URL, nxt: URL, code: int, hops: Hops, any_host: bool) -> FetchResult | None:
        """A redirect from `url` to `nxt`: what ends the chain there, or None to go on."""
        refused = check_parsed(nxt, self.policy)
        if refused is not None:
            return FetchResult(
                refused[0], code, f"redirect to {nxt}: {refused[1]}", final_url=str(nxt)
            )
        if str(nxt) in hops.seen:
            return FetchResult(status.TOO_MANY_REDIRECTS, code, f"redirect loop at {nxt}")
        hops.count += 1
        if hops.count > self.cfg.max_redirects:
            return FetchResult(
                status.TOO_MANY_REDIRECTS, code, f"more than {self.cfg.max_redirects} redirects"
            )
        if not any_host and nxt.host != url.host:
            return FetchResult(OTHER_HOST, code, final_url=str(nxt), hops=hops)
        return None

    async def _response(self, resp: aiohttp.ClientResponse, progress: Progress) -> FetchResult:
        code, url = resp.status, str(resp.url)
        if code != 200:
            retry_after = None
            if code in (429, 503):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            why = "redirect without Location" if code in REDIRECTS else resp.reason or ""
            return FetchResult(
                status.http_status(code), code, why, final_url=url,
                transient=code == 429 or code >= 500, retry_after=retry_after,
            )  # fmt: skip
        if self.cfg.respect_opt_out:
            tags = resp.headers.getall("X-Robots-Tag", [])
            if tags and opted_out(tags, self.cfg.opt_out_agents):
                why = "X-Robots-Tag: " + "; ".join(tags)
                return FetchResult(status.OPTED_OUT, code, why, final_url=url)
        cap = self.cfg.max_body_bytes
        if resp.content_length is not None and resp.content_length > cap:
            return FetchResult(
                status.TOO_LARGE, code, f"Content-Length {resp.content_length} > {cap}"
            )
        body = await read_capped(resp, cap, progress, self.budget)
        progress.held = len(body or b"")
        if body is None:
            return FetchResult(status.TOO_LARGE, code, f"body larger than {cap} bytes")
        return FetchResult(status.OK, code, body=body, final_url=url)


def _failed(exc: BaseException) -> FetchResult:
    """The result of an attempt that raised `exc` (an aiohttp error, OSError or ValueError)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if _blocked(exc):
            return FetchResult(status.BLOCKED_ADDRESS, error=str(exc.os_error))
        return FetchResult(status.DNS_ERROR, error=str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        if _blocked(exc):
            return FetchResult(status.BLOCKED_ADDRESS, error=str(exc.os_error))
        return FetchResult(status.CONNECTION_ERROR, error=str(exc), transient=True)
    if isinstance(exc, BlockedAddress):
        return FetchResult(status.BLOCKED_ADDRESS, error=str(exc))
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return FetchResult(status.BAD_URL, error=f"invalid URL: {exc}")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return FetchResult(status.TIMEOUT, error=str(exc) or "read timeout", transient=True)
    text = str(exc) or type(exc).__name__
    return FetchResult(status.CONNECTION_ERROR, error=text, transient=True)


def _blocked(exc: Any) -> bool:
    seen = {exc.os_error if hasattr(exc, "os_error") else None, exc.__cause__, exc.__context__}
    return any(isinstance(e, BlockedAddress) for e in seen)
