"""Deadlines that adapt to what each host has shown.

A host that answers in 200 ms does not need 30 s: an attempt's deadline is `FACTOR` times the
slowest of the host's recent complete responses, at least `fetch.min_timeout_s` and at most
`fetch.total_timeout_s`. A host not yet heard from often enough gets the same rule applied to
the worker's recent responses from every host (their 90th percentile, so that one slow host does
not set everyone's deadline); before the worker has heard anything, the ceiling applies, and
the host's deadline takes over, counted from then, once something is heard (fetch._Judge).

A slow host shows itself slow (its responses are timed when they complete), so its deadlines
grow with it; a server that never answers shows nothing and keeps the short deadline.

Whether a timeout is worth another attempt depends on what the host did meanwhile: if it
completed other responses while this one got nowhere, the fault is most likely this URL's (a
request the server never answers, a body it trickles), and it gets one more attempt only (the
crawler's own load may have been to blame the first time); if the host completed nothing, it
may be overloaded or briefly away as a whole, and the usual attempts apply.
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
        self._heard: dict[str, float] = {}  # host -> when it last completed a response
        self._all: deque[float] = deque(maxlen=ALL_SAMPLES)
        self._all_p90: float | None = None
        self._all_fresh = 0  # samples since _all_p90 was computed

    def observe(self, host: str, seconds: float) -> None:
        """A complete response from `host` took `seconds` (request sent to body read)."""
        times = self._hosts.get(host)
        if times is None:
            times = self._hosts[host] = deque(maxlen=HOST_SAMPLES)
            if len(self._hosts) > MAX_HOSTS:
                forgotten, _ = self._hosts.popitem(last=False)
                self._heard.pop(forgotten, None)
        else:
            self._hosts.move_to_end(host)
        times.append(seconds)
        self._heard[host] = time.monotonic()
        self._all.append(seconds)
        self._all_fresh += 1
        if self._all_fresh >= min(64, len(self._all)):
            self._all_p90 = _p90(self._all)
            self._all_fresh = 0

    def answered_since(self, host: str, since: float) -> bool:
        """Whether `host` completed a response after `since` (time.monotonic())."""
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
