"""Deadlines that adapt to what each host has shown.

A host that answers in 200 ms does not need 30 s: an attempt's deadline is `FACTOR` times the
slowest of the host's recent complete responses, at least `fetch.min_timeout_s` and at most
`fetch.total_timeout_s`. A host not yet heard from often enough gets the same rule applied to
the worker's recent responses from every host (their 90th percentile, so that one slow host does
not set everyone's deadline); before the worker has heard anything, the ceiling applies, and
the host's deadline takes over, counted from then, once something is heard (fetch._Judge).

A slow host shows itself slow (its responses are timed when they complete), so its deadlines
grow with it; a server that never answers shows nothing and keeps the short deadline.

The time a host last served a response (one that is not itself a transient failure) tells
whether it served others while an attempt of it failed (`served_during`, see crawler.retries).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

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
