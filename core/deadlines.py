"""Deadlines that adapt to what each host has shown.

A host that answers in 200 ms does not need 30 s: an attempt's deadline is `FACTOR` times the
slowest of the host's recent complete responses, at least `fetch.min_timeout_s` and at most
`fetch.total_timeout_s`. A host not yet heard from often enough gets the same rule applied to
the worker's recent responses from every host (their 90th percentile, so that one slow host does
not set everyone's deadline); before the worker has heard anything, the ceiling applies, and
the host's deadline takes over, counted from then, once something is heard (`Judge`).

A slow host shows itself slow (its responses are timed when they complete), so its deadlines
grow with it; a server that never answers shows nothing and keeps the short deadline.

The time a host last served a response (one that is not itself a transient failure) tells
whether it served others while an attempt of it failed (`served_during`, see crawler.retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

FACTOR = 2.0  # deadline = FACTOR x the slowest recent response of the host
HOST_SAMPLES = 16  # recent responses remembered per host
MIN_SAMPLES = 3  # responses a host (or the worker) needs before its own times are used
ALL_SAMPLES = 512  # recent responses from every host
MAX_HOSTS = 20_000  # hosts remembered (the least recently heard from are forgotten)


class ResponseTimes:
    """Recent response times, per host and over all hosts; the deadline each implies."""

    def __init__(self, floor_s: float, ceiling_s: float) -> None:
        self.floor_s = min(floor_s, ceiling_s)
        self.ceiling_s = ceiling_s
        self._hosts: OrderedDict[str, deque[float]] = OrderedDict()
        self._heard: dict[str, float] = {}  # host -> when it last served a response
        self._all: deque[float] = deque(maxlen=ALL_SAMPLES)
        self._all_p90: float | None = None
        self._all_fresh = 0  # samples since _all_p90 was computed

    def observe(self, host: str, seconds: float, served: bool = True) -> None:
        """A complete response from `host` took `seconds` (request sent to body read);
        `served`: it was not a transient failure (429, 5xx)."""
        times = self._hosts.get(host)
        if times is None:
            times = self._hosts[host] = deque(maxlen=HOST_SAMPLES)
            if len(self._hosts) > MAX_HOSTS:
                forgotten, _ = self._hosts.popitem(last=False)
                self._heard.pop(forgotten, None)
        else:
            self._hosts.move_to_end(host)
        times.append(seconds)
        if served:
            self._heard[host] = time.monotonic()
        self._all.append(seconds)
        self._all_fresh += 1
        if self._all_fresh >= min(64, len(self._all)):
            self._all_p90 = _p90(self._all)
            self._all_fresh = 0

    def served_during(self, host: str, started: float) -> bool:
        """Whether `host` served a response while an attempt that began at `started`
        (time.monotonic()) ran, or within the host's deadline before its end (a failure that
        comes at once, a reset say, leaves no time for others to complete meanwhile)."""
        window = self.deadline_s(host) or 0.0
        since = min(started, time.monotonic() - window)
        return self._heard.get(host, float("-inf")) > since

    def deadline_s(self, host: str) -> float | None:
        """The deadline for an attempt at `host`; None while nothing is known (the ceiling
        applies)."""
        times = self._hosts.get(host)
        if times is not None and len(times) >= MIN_SAMPLES:
            slowest = max(times)
        elif len(self._all) >= MIN_SAMPLES and self._all_p90 is not None:
            slowest = self._all_p90
        else:
            return None
        return min(self.ceiling_s, max(self.floor_s, FACTOR * slowest))


def _p90(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class Judge:
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
        progress: Progress,
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


class Progress:
    """How far a request got: what a deadline error reports."""

    __slots__ = (
        "body_bytes", "deadline", "deadline_s", "headers", "held", "host", "paused_s", "sent",
    )  # fmt: skip

    def __init__(self) -> None:
        self.host = ""  # of the request under way
        self.headers = False
        self.body_bytes = 0
        self.deadline_s: float | None = None  # the host's adaptive deadline, when it applied
        self.held = 0  # bytes of a body read whole, counted in the fetcher's budget
        self.deadline: asyncio.Timeout | None = None
        self.paused_s = 0.0  # reading paused for the worker's memory budget
        self.sent = 0.0  # when the request under way went out (time.monotonic() - paused_s)

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
