"""The arrival log of the test web (one record per request) and the checks tests make on it:
per-host concurrency, interval and rate."""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Arrival:
    """One request as the server saw it.

    ``host``: the loopback address it arrived on (``"127.0.0.3"``; all hosts share one port).
    ``path``: the request target as sent (path and query, percent-encoded).
    ``start``/``end``: ``time.monotonic()`` when the request was handed to the server / when the
    response was fully written or the connection broke. ``status``: the response status, 0 when
    no complete response was sent (drop, reset, client went away).
    """

    host: str
    path: str
    start: float
    end: float
    status: int = 0


def read_arrivals(path: str | os.PathLike[str]) -> list[Arrival]:
    """Read a JSONL arrival log written by ``ImageWeb(log_path=...)`` (partial lines skipped)."""
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            out.append(Arrival(**orjson.loads(line)))
    return out


def _by_host(arrivals: Iterable[Arrival]) -> dict[str, list[Arrival]]:
    groups: dict[str, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        groups[a.host].append(a)
    return dict(groups)


def max_concurrency(arrivals: Iterable[Arrival]) -> dict[str, int]:
    """Host -> the largest number of requests in flight at the same moment.

    Intervals are ``[start, end)``: a request that starts exactly when another ends does not
    overlap it.
    """
    result: dict[str, int] = {}
    for host, items in _by_host(arrivals).items():
        events = sorted([(a.start, 1) for a in items] + [(a.end, -1) for a in items])
        level = peak = 0
        for _, delta in events:  # at equal times -1 sorts before +1
            level += delta
            peak = max(peak, level)
        result[host] = peak
    return result


def check_concurrency(arrivals: Iterable[Arrival], limit: int) -> list[str]:
    """Violations (one line per host) of "at most ``limit`` requests in flight per host"."""
    return [
        f"{host}: {peak} requests in flight at once, limit {limit}"
        for host, peak in sorted(max_concurrency(arrivals).items())
        if peak > limit
    ]


def min_interval(arrivals: Iterable[Arrival]) -> dict[str, float]:
    """Host -> the shortest gap between consecutive request starts (inf with one request)."""
    result: dict[str, float] = {}
    for host, items in _by_host(arrivals).items():
        starts = sorted(a.start for a in items)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        result[host] = min(gaps) if gaps else math.inf
    return result


def check_rate(
    arrivals: Iterable[Arrival],
    rate: float,
    burst: int = 1,
    *,
    tolerance: float = 0.01,
    max_reports: int = 10,
) -> list[str]:
    """Violations of a per-host token-bucket limit of ``rate`` requests/s with bucket ``burst``.

    The limiter is a token bucket (equivalently GCRA with emission interval ``T = 1/rate`` and
    burst tolerance ``(burst - 1)·T``) that starts full. A host's request starts
    ``t_0 <= t_1 <= …`` conform iff every closed window holds at most ``burst + rate·width``
    requests, i.e. for all ``i <= j``::

        j - i + 1  <=  burst + rate · (t_j - t_i + tolerance)

    (for ``i = 0`` this is GCRA's "request n starts no earlier than t_0 + (n - burst + 1)/rate").
    ``tolerance`` (seconds) widens every window to absorb jitter between the client's send and
    the server's arrival timestamp. Checked in O(n) per host: with ``g_k = k - rate·t_k`` the
    worst window ending at ``j`` starts at the ``i <= j`` minimising ``g_i``. Every arrival
    counts (a real server sees them all), so after an over-full burst each later request is
    reported too until the bucket would have refilled.
    Returns human-readable violations, at most ``max_reports`` per host (plus a count line);
    an empty list means compliant.
    """
    if rate <= 0 or burst < 1:
        raise ValueError("rate must be > 0 and burst >= 1")
    limit = burst + rate * tolerance + 1e-9
    out: list[str] = []
    for host, items in sorted(_by_host(arrivals).items()):
        starts = sorted(a.start for a in items)
        best_g, best_i = math.inf, 0
        reported = extra = 0
        for j, t in enumerate(starts):
            g = j - rate * t
            if g <= best_g:  # ties: the latest start, so reports name the shortest window
                best_g, best_i = g, j
            if g - best_g + 1 > limit:
                if reported < max_reports:
                    i = best_i
                    width = t - starts[i]
                    out.append(
                        f"{host}: {j - i + 1} requests in {width:.4f}s (#{i}..#{j}); allowed "
                        f"{burst} + {rate:g}/s x ({width:.4f}s + {tolerance:g}s) = "
                        f"{burst + rate * (width + tolerance):.2f}"
                    )
                    reported += 1
                else:
                    extra += 1
        if extra:
            out.append(f"{host}: ... and {extra} more violating requests")
    return out
