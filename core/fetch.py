"""HTTP: one attempt at one image URL, with every cap a web-scale crawl needs.

Redirects are followed by hand so that each hop is checked (address policy, hop cap, loops).
The whole attempt (connect, headers, body) runs under one hard deadline, so a server that
trickles bytes cannot hold a slot for longer than ``total_timeout_s``. Bodies are read up to
``max_body_bytes`` and cut off beyond it, never buffered whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import DecompressSizeError
from aiohttp.resolver import DefaultResolver
from yarl import URL

from core import status
from core.config import FetchConfig
from core.deadlines import ResponseTimes
from core.guard import AddressPolicy, BlockedAddress, check_parsed


class GuardedResolver(AbstractResolver):
    """Resolves names, then drops non-public addresses unless they are allowed."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self.inner.resolve(host, port, family)
        if self.policy.allow_private:
            return infos
        public = [i for i in infos if self.policy.permits_host(i["host"])]
        if not public:
            raise BlockedAddress(f"{host} resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        await self.inner.close()


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def guarded_socket(policy: AddressPolicy) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory for aiohttp's TCPConnector: refuses (BlockedAddress) to make a socket
    for a non-public destination address, whatever spelling of it reached the connector."""

    def make(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not policy.permits_host(str(sockaddr[0])):
            raise BlockedAddress(f"{sockaddr[0]} is not a public address")
        return socket.socket(family=family, type=type_, proto=proto)

    return make


# Not a terminal status: the response redirects to another host (`final_url`), whose own
# limits the caller must respect before calling `fetch` again with the result's `hops`.
OTHER_HOST = "redirect_to_other_host"


@dataclass(slots=True)
class Hops:
    """Redirects followed so far in one attempt, across hosts: loop detection, the cap, and
    the time the attempt's requests have taken (one deadline covers all its hops)."""

    seen: set[str] = field(default_factory=set)
    count: int = 0
    spent_s: float = 0.0  # time spent in requests (not in waiting for a host or a slot)


@dataclass(slots=True)
class FetchResult:
    status: str  # status.OK when a body was read, else a terminal or transient status
    http_code: int = 0
    error: str = ""
    body: bytes = b""
    final_url: str = ""
    retry_after: float | None = None
    transient: bool = False
    hops: Hops | None = None  # with OTHER_HOST: the chain so far
    # With TIMEOUT: the host completed other responses meanwhile (see core.deadlines).
    host_answered: bool = False

    @property
    def ok(self) -> bool:
        return self.status == status.OK


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


def opted_out(values: list[str], agents: list[str]) -> bool:
    """Whether X-Robots-Tag values carry noai/noimageai for everyone or for one of agents."""
    wanted = {"noai", "noimageai"}
    names = {a.lower() for a in agents}
    for value in values:
        agent = ""
        for part in value.split(","):
            token = part.strip().lower()
            if ":" in token:
                head, _, rest = token.partition(":")
                head = head.strip()
                if head not in wanted and head not in _VALUED_DIRECTIVES:
                    agent, token = head, rest.strip()
            if token in wanted and (not agent or agent in names):
                return True
    return False


_READ_BUFFER = 1 << 18


def client_session(cfg: FetchConfig, max_connections: int) -> aiohttp.ClientSession:
    policy = AddressPolicy.of(cfg)
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,  # per-host limits are the HostGate's job
        ttl_dns_cache=cfg.dns_cache_ttl_s,
        use_dns_cache=True,
        resolver=GuardedResolver(policy),
        # The last word on every connection: the address the socket is made for.
        socket_factory=guarded_socket(policy),
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=cfg.connect_timeout_s,
        sock_connect=cfg.connect_timeout_s,
        # No read timeout: the attempt's own deadline (Fetcher) bounds every read, and an
        # aiohttp read timeout would re-arm a timer on every chunk received.
        sock_read=None,
    )
    headers = {"User-Agent": cfg.user_agent}
    if cfg.x_forwarded_for:
        headers["X-Forwarded-For"] = cfg.x_forwarded_for
    headers.update(cfg.headers)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        auto_decompress=True,
        # A crawl keeps no cookies: a jar would grow with every host of the corpus, be
        # searched on every request and tie one image's request to another's.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Bodies are read whole: a larger buffer pauses and resumes the socket less often.
        read_bufsize=_READ_BUFFER,
    )


class Slots:
    """A FIFO counting semaphore whose acquire and release are O(1).

    (asyncio.Semaphore in Python 3.11 scans every waiter on each acquire while slots are
    free: with a worker's window of requests queued for its connections, that scan was ~5 %
    of the event loop's time.) A slot is handed straight to the first waiter on release.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class BodyBudget:
    """Bytes of response bodies one worker holds: being read, or read and waiting for their
    image work (the worker gives them back when that is done).

    A new request waits while the budget is spent (`room`). A body being read takes its bytes
    as they arrive (`take`); past the limit, a read waits for room (image work gives bodies
    back), except when reads in progress alone overspend it: then the oldest read goes on, so
    reads never all wait for each other. Time a read waits here does not count against its
    deadline. Held at most: `limit`, plus one body of up to
    max_body_bytes, plus what each waiting read had received (aiohttp pauses a connection
    once ~512 KiB are buffered).
    """

    __slots__ = ("_next", "_readers", "_room", "_turn", "limit", "peak", "reading", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # bytes held: being read, or read and not given back
        self.reading = 0  # of which: of reads in progress
        self.peak = 0
        self._readers: dict[int, None] = {}  # reads in progress, oldest first
        self._next = 0
        # Two kinds of waiters, woken apart: new requests (up to a worker's window of them)
        # only when the budget has room, a read only when its turn may have come. Waking
        # every waiter on every change costs O(window) per image.
        self._room = _Waiters()
        self._turn: dict[int, asyncio.Future[None]] = {}  # waiting reads, by reader

    async def room(self) -> None:
        """Wait until the budget is not spent."""
        while self.used > self.limit:
            await self._room.wait()

    def start_read(self) -> int:
        self._next += 1
        self._readers[self._next] = None
        return self._next

    def end_read(self, reader: int, taken: int) -> None:
        """`reader` is done; the `taken` bytes it holds stay counted until given back."""
        oldest = next(iter(self._readers), None)
        self._readers.pop(reader, None)
        self.reading -= taken
        if reader == oldest:
            self._wake_turns()  # another read is the oldest now

    def take(self, n: int) -> None:
        """Count `n` bytes that arrived for a read in progress."""
        self.used += n
        self.reading += n
        self.peak = max(self.peak, self.used)

    def must_wait(self, reader: int) -> bool:
        """Whether `reader` must wait before reading on (see the class docstring)."""
        return self.used > self.limit and not (
            self.used - self.reading <= self.limit and next(iter(self._readers)) == reader
        )

    async def wait_turn(self, reader: int) -> None:
        while self.must_wait(reader):
            fut = asyncio.get_running_loop().create_future()
            self._turn[reader] = fut
            try:
                await fut
            finally:
                self._turn.pop(reader, None)

    def give_back(self, n: int) -> None:
        self.used -= n
        self._wake_turns()
        if self.used <= self.limit:
            self._room.wake()

    def _wake_turns(self) -> None:
        """Wake the reads that may go on: all of them when the budget has room, else only
        the oldest read, when what the others hold alone keeps within the budget."""
        if not self._turn:
            return
        if self.used <= self.limit:
            waking = list(self._turn.values())
        elif self.used - self.reading <= self.limit:
            oldest = self._turn.get(next(iter(self._readers), -1))
            waking = [oldest] if oldest is not None else []
        else:
            return
        for fut in waking:
            if not fut.done():
                fut.set_result(None)


class _Waiters:
    """Coroutines waiting for one kind of change; `wake` lets them all re-check."""

    __slots__ = ("_event", "count")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0

    async def wait(self) -> None:
        event = self._event
        self.count += 1
        try:
            await event.wait()
        finally:
            self.count -= 1

    def wake(self) -> None:
        if self.count:
            self._event.set()
            self._event = asyncio.Event()


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

    async def fetch(self, url: str, hops: Hops | None = None) -> FetchResult:
        """Fetch `url`, following redirects on the same host. A redirect to another host ends
        with status OTHER_HOST; pass its `hops` back with the next URL to go on."""
        async with self._slots:
            return await self._fetch(url, hops or Hops())

    async def _fetch(self, url: str, hops: Hops) -> FetchResult:
        progress = _Progress()
        try:
            res = await self._attempt(url, hops, progress)
        except BaseException:
            self._drop_body(progress)
            raise
        if not res.ok:
            self._drop_body(progress)  # read, then the deadline struck: not the caller's
        return res

    def _drop_body(self, progress: _Progress) -> None:
        if progress.held and self.budget is not None:
            self.budget.give_back(progress.held)
            progress.held = 0

    async def _attempt(self, url: str, hops: Hops, progress: _Progress) -> FetchResult:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        judge: _Judge | None = None
        try:
            target = URL(url, encoded=False)
            host = target.host or ""
            ceiling = self.cfg.total_timeout_s - hops.spent_s
            adaptive = self.times.deadline_s(host)
            limit = ceiling if adaptive is None else min(ceiling, adaptive - hops.spent_s)
            if limit < ceiling:
                progress.deadline_s = adaptive
            async with asyncio.timeout(max(0.0, limit)) as deadline:
                progress.deadline = deadline
                if adaptive is None:  # nothing heard yet: judged again once something is
                    begun = loop.time() - hops.spent_s
                    judge = _Judge(self.times, deadline, host, begun, progress)
                return await self._follow(target, progress, hops)
        except TimeoutError:
            # What the host did meanwhile decides the retries (see core.deadlines).
            answered = self.times.answered_since(progress.host, started)
            note = "; the host answered others meanwhile" if answered else ""
            error = f"deadline exceeded ({progress.describe(hops.count + 1)}{note})"
            return FetchResult(status.TIMEOUT, error=error, transient=True, host_answered=answered)
        except aiohttp.ClientConnectorDNSError as exc:
            if _blocked(exc):
                return FetchResult(status.BLOCKED_ADDRESS, error=str(exc.os_error))
            return FetchResult(status.DNS_ERROR, error=str(exc))
        except aiohttp.ClientConnectorError as exc:
            if _blocked(exc):
                return FetchResult(status.BLOCKED_ADDRESS, error=str(exc.os_error))
            return FetchResult(status.CONNECTION_ERROR, error=str(exc), transient=True)
        except BlockedAddress as exc:
            return FetchResult(status.BLOCKED_ADDRESS, error=str(exc))
        except (aiohttp.InvalidURL, ValueError) as exc:
            return FetchResult(status.BAD_URL, error=f"invalid URL: {exc}")
        except aiohttp.ServerTimeoutError as exc:
            return FetchResult(status.TIMEOUT, error=str(exc) or "read timeout", transient=True)
        except (aiohttp.ClientError, OSError) as exc:
            text = str(exc) or type(exc).__name__
            return FetchResult(status.CONNECTION_ERROR, error=text, transient=True)
        finally:
            hops.spent_s += time.monotonic() - started - progress.paused_s
            if judge is not None:
                judge.cancel()

    async def _follow(self, url: URL, progress: _Progress, hops: Hops) -> FetchResult:
        refused = check_parsed(url, self.policy)  # each redirect target is checked as it comes
        if refused is not None:
            return FetchResult(refused[0], error=refused[1], final_url=str(url))
        while hops.count <= self.cfg.max_redirects:
            hops.seen.add(str(url))
            progress.headers = False
            progress.host = url.host or ""
            sent = time.monotonic() - progress.paused_s  # minus pauses: see _Progress.paused
            async with self.session.get(url, allow_redirects=False) as resp:
                progress.headers = True
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        return FetchResult(
                            status.http_status(resp.status),
                            http_code=resp.status,
                            error="redirect without Location",
                        )
                    nxt = url.join(URL(location))
                    refused = check_parsed(nxt, self.policy)
                    if refused is not None:
                        why = f"redirect to {nxt}: {refused[1]}"
                        return FetchResult(refused[0], resp.status, why, final_url=str(nxt))
                    if str(nxt) in hops.seen:
                        return FetchResult(
                            status.TOO_MANY_REDIRECTS, resp.status, f"redirect loop at {nxt}"
                        )
                    hops.count += 1
                    self.times.observe(url.host or "", time.monotonic() - progress.paused_s - sent)
                    if nxt.host != url.host and hops.count <= self.cfg.max_redirects:
                        return FetchResult(OTHER_HOST, resp.status, final_url=str(nxt), hops=hops)
                    url = nxt
                    continue
                result = await self._response(resp, url, progress)
                self.times.observe(url.host or "", time.monotonic() - progress.paused_s - sent)
                return result
        return FetchResult(
            status.TOO_MANY_REDIRECTS,
            error=f"more than {self.cfg.max_redirects} redirects",
        )

    @contextlib.asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET `url` for a caller that reads the body itself (a shard download): redirects,
        to any host, are followed with the same address checks on every hop as `fetch`.
        Yields the final response, whatever its status. Raises BlockedAddress, ValueError
        (a bad redirect) or aiohttp's errors."""
        target = URL(url, encoded=False)
        seen: set[str] = set()
        for _hop in range(self.cfg.max_redirects + 1):
            refused = check_parsed(target, self.policy)
            if refused is not None:
                raise (
                    BlockedAddress(refused[1])
                    if refused[0] == status.BLOCKED_ADDRESS
                    else ValueError(refused[1])
                )
            seen.add(str(target))
            async with self.session.get(target, allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status not in (301, 302, 303, 307, 308) or not location:
                    yield resp
                    return
                nxt = target.join(URL(location))
            if nxt.scheme not in ("http", "https"):
                raise ValueError(f"redirect to {nxt}")
            if str(nxt) in seen:
                raise ValueError(f"redirect loop at {nxt}")
            target = nxt
        raise ValueError(f"more than {self.cfg.max_redirects} redirects")

    async def _response(
        self, resp: aiohttp.ClientResponse, url: URL, progress: _Progress
    ) -> FetchResult:
        code = resp.status
        if code != 200:
            transient = code == 429 or code >= 500
            retry_after = None
            if code in (429, 503):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return FetchResult(
                status.http_status(code),
                http_code=code,
                error=resp.reason or "",
                transient=transient,
                retry_after=retry_after,
                final_url=str(url),
            )
        if self.cfg.respect_opt_out:
            tags = resp.headers.getall("X-Robots-Tag", [])
            if tags and opted_out(tags, self.cfg.opt_out_agents):
                return FetchResult(
                    status.OPTED_OUT, code, "X-Robots-Tag: " + "; ".join(tags), final_url=str(url)
                )
        cap = self.cfg.max_body_bytes
        if resp.content_length is not None and resp.content_length > cap:
            return FetchResult(
                status.TOO_LARGE, code, f"Content-Length {resp.content_length} > {cap}"
            )
        body = await _read_capped(resp, cap, progress, self.budget)
        progress.held = len(body or b"")
        if body is None:
            return FetchResult(status.TOO_LARGE, code, f"body larger than {cap} bytes")
        return FetchResult(status.OK, code, body=body, final_url=str(url))


class _Judge:
    """While nothing has been heard from any host, an attempt runs under the ceiling; this
    brings its deadline forward once response times are known (checked every
    `times.floor_s`): to the host's deadline from then on, since the first responses to come
    back are the fastest of their burst. `begun`: the loop time the attempt started at."""

    __slots__ = ("begun", "deadline", "handle", "host", "progress", "times")

    def __init__(
        self,
        times: ResponseTimes,
        deadline: asyncio.Timeout,
        host: str,
        begun: float,
        progress: _Progress,
    ) -> None:
        self.times, self.deadline, self.host = times, deadline, host
        self.begun, self.progress = begun, progress
        self.handle = asyncio.get_running_loop().call_later(times.floor_s, self._judge)

    def _judge(self) -> None:
        loop = asyncio.get_running_loop()
        adaptive = self.times.deadline_s(self.host)
        if adaptive is None:
            self.handle = loop.call_later(self.times.floor_s, self._judge)
            return
        when = self.deadline.when()
        if when is None:  # paused for the worker's memory budget: judged after
            self.handle = loop.call_later(self.times.floor_s, self._judge)
            return
        new = loop.time() + adaptive
        if new < when:
            self.progress.deadline_s = new - self.begun
            self.deadline.reschedule(new)

    def cancel(self) -> None:
        self.handle.cancel()


class _Progress:
    """How far a request got: what a deadline error reports."""

    __slots__ = ("body_bytes", "deadline", "deadline_s", "headers", "held", "host", "paused_s")

    def __init__(self) -> None:
        self.host = ""  # of the request under way
        self.headers = False
        self.body_bytes = 0
        self.deadline_s: float | None = None  # the host's adaptive deadline, when it applied
        self.held = 0  # bytes of a body read whole, counted in the fetcher's budget
        self.deadline: asyncio.Timeout | None = None
        self.paused_s = 0.0  # reading paused for the worker's memory budget

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Reading paused for the worker's own budget: the deadline stops meanwhile (a busy
        worker does not turn its own backlog into timeouts)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        when = self.deadline.when() if self.deadline is not None else None
        if self.deadline is not None and when is not None:
            self.deadline.reschedule(None)
        try:
            yield
        finally:
            waited = loop.time() - started
            self.paused_s += waited
            if self.deadline is not None and when is not None:
                self.deadline.reschedule(when + waited)

    def describe(self, request_number: int) -> str:
        """`request_number`: 1 for the item's URL, 2 after the first redirect, ..."""
        hop = f" (hop {request_number})" if request_number > 1 else ""
        within = "" if self.deadline_s is None else f"; {self.deadline_s:.1f} s for this host"
        if not self.headers:
            return f"no response headers{hop}{within}"
        return f"{self.body_bytes} body bytes read{hop}{within}"


async def _read_capped(
    resp: aiohttp.ClientResponse, cap: int, progress: _Progress, budget: BodyBudget | None
) -> bytes | None:
    """The body, or None when it is (or inflates to) more than `cap` bytes. With a `budget`,
    the bytes are taken from it as they arrive; on success they stay taken (the caller gives
    them back when done with the body)."""
    chunks: list[bytes] = []
    size = taken = 0
    reader = budget.start_read() if budget is not None else 0
    done = False
    try:
        async for chunk in resp.content.iter_any():  # what has arrived, not cut into pieces
            size += len(chunk)
            progress.body_bytes = size
            if size > cap:
                resp.close()
                return None
            chunks.append(chunk)
            if budget is not None:
                taken += len(chunk)
                budget.take(len(chunk))
                if budget.must_wait(reader):
                    with progress.paused():
                        await budget.wait_turn(reader)
        done = True
        return b"".join(chunks)
    except aiohttp.ClientPayloadError as exc:
        if not _inflated_too_far(exc):
            raise
        resp.close()
        return None
    finally:
        if budget is not None:
            budget.end_read(reader, taken)
            if not done:
                budget.give_back(taken)


def _inflated_too_far(exc: BaseException) -> bool:
    """Whether aiohttp stopped a compressed body that inflates past its decompression limit."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, DecompressSizeError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _blocked(exc: Any) -> bool:
    seen = {exc.os_error if hasattr(exc, "os_error") else None, exc.__cause__, exc.__context__}
    return any(isinstance(e, BlockedAddress) for e in seen)
