"""Whether a failed attempt at an image is tried again, and after how long.

Transient failures (timeouts, connection errors, 429 and 5xx) get up to `fetch.max_attempts`
attempts. What the host did meanwhile decides how many of those are worth it: if it served
other requests while this one failed (`FetchResult.host_answered`), the fault is most likely
this URL's (a request the server never answers, a body it cuts off, a 503 for this path only):
one more attempt recovers a one-off fault, and if that attempt fails the same way, the image
ends there. A failure of another kind (a one-off reset, then a timeout while the crawler is
busy) goes on to the next attempt; and if the host served nothing, it may be overloaded or
briefly away as a whole, and every attempt applies.

Between attempts: none after a timeout (its deadline has spaced the attempts already), else
jittered exponential backoff from `fetch.backoff_base_s`, and never less than the response's
`Retry-After` (capped at `fetch.retry_after_max_s`). The host's limits (crawler.limits) hold
the host back for that Retry-After as well, for every URL of it.
"""

from __future__ import annotations

import random
from typing import Literal

from core import status
from core.config import FetchConfig
from core.fetch import FetchResult


class Retries:
    """One image's attempts: call `after` with each attempt's result."""

    __slots__ = ("attempts", "cfg", "rng", "suspect")

    def __init__(self, cfg: FetchConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.attempts = 0  # made so far
        # the status of the last failure, when its host served others
        self.suspect: status.Status | Literal[""] = ""

    def after(self, res: FetchResult) -> float | None:
        """Seconds to wait before the next attempt, or None: the image ends with `res`."""
        self.attempts += 1
        if res.ok or not res.transient or self.attempts >= self.cfg.max_attempts:
            return None
        if res.status == self.suspect:  # the same again: a third try would end the same way
            return None
        self.suspect = res.status if res.host_answered else ""
        return self.backoff_s(res)

    def backoff_s(self, res: FetchResult) -> float:
        if res.status == status.TIMEOUT:
            return 0.0
        f = self.cfg
        delay = min(f.backoff_max_s, f.backoff_base_s * 2 ** (self.attempts - 1))
        delay = self.rng.uniform(delay / 2, delay)
        if res.retry_after is not None:
            delay = max(delay, min(res.retry_after, f.retry_after_max_s))
        return delay
