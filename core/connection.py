"""Redis connections from the configured URL (redis://, rediss://, unix://; password in URL),
and how every command rides out a Redis outage (`RedisRetry`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.config import Config, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def redis_url(cfg: Config) -> str:
    if not cfg.redis.url:
        raise ConfigError(
            "no redis.url configured: set one (MMC4_REDIS__URL, --redis-url) or use `run`, "
            "which starts an embedded Redis"
        )
    return cfg.redis.url


def connect(cfg: Config) -> aioredis.Redis:
    """A client that retries briefly on connection errors; callers retry longer outages.
    A password in the URL wins over redis.password_file."""
    password = None
    if cfg.redis.password_file:
        try:
            password = Path(cfg.redis.password_file).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"redis.password_file: {exc}") from None
    return aioredis.Redis.from_url(
        redis_url(cfg),
        password=password,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=cfg.redis.socket_timeout_s,  # > every BLOCK the crawler uses (0.5 s)
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


class RedisUnavailable(ConnectionError):
    """Redis stayed unreachable for longer than the caller was willing to wait."""


@dataclass(frozen=True)
class RedisRetry:
    """How a caller rides out a Redis outage: the one retry policy of every command.

    A failed call (a Redis error or an OSError) is logged as ``<what>: Redis unavailable`` and
    tried again after a delay that doubles from `base_s` up to `cap_s` (redis-py's
    ``ExponentialBackoff``). With `give_up_after_s` > 0, `call` raises RedisUnavailable once
    Redis has been unreachable that long; 0 waits for Redis however long it takes.
    """

    what: str = "redis"
    base_s: float = 0.5
    cap_s: float = 30.0
    give_up_after_s: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, what: str, **policy: float) -> RedisRetry:
        """The policy starting at ``redis.reconnect_backoff_s``; `policy` sets the rest."""
        return cls(what, cfg.redis.reconnect_backoff_s, **policy)

    def _delay(self, failures: int) -> float:
        return float(ExponentialBackoff(cap=self.cap_s, base=self.base_s).compute(failures - 1))

    async def call(self, fn: Callable[[], Awaitable[T]], *, stop: asyncio.Event | None = None) -> T:
        """Call `fn` until Redis answers (for idempotent calls only). Once `stop` is set, the
        wait for the next try ends and a failure is raised instead of tried again."""
        failures = 0
        first_failure = 0.0
        while True:
            try:
                return await fn()
            except (RedisError, OSError) as exc:
                if stop is not None and stop.is_set():
                    raise
                failures += 1
                now = time.monotonic()
                first_failure = first_failure or now
                waited = now - first_failure
                delay = self._delay(failures)
                if self.give_up_after_s:
                    if waited >= self.give_up_after_s:
                        raise RedisUnavailable(
                            f"{self.what}: Redis unavailable for {waited:.0f} s ({exc})"
                        ) from exc
                    delay = min(delay, max(0.05, self.give_up_after_s - waited))
                log.warning("%s: Redis unavailable (%s); retrying in %.1fs", self.what, exc, delay)
                if stop is None:
                    await asyncio.sleep(delay)
                    continue
                with contextlib.suppress(TimeoutError):  # a stop tries once more, at once
                    await asyncio.wait_for(stop.wait(), delay)

    async def every(
        self, iteration: Callable[[], Awaitable[None]], interval_s: float = 0.0
    ) -> NoReturn:
        """Run `iteration` every `interval_s` until cancelled (a background loop). One that
        fails, for any reason, is logged and run again after the backoff delay; the delays
        start again from `base_s` after every iteration that succeeds."""
        failures = 0
        while True:
            try:
                await iteration()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = self._delay(failures)
                if isinstance(exc, RedisError):
                    log.warning(
                        "%s: Redis unavailable (%s); retrying in %.1fs", self.what, exc, delay
                    )
                elif isinstance(exc, OSError):
                    log.warning("%s: %s; retrying in %.1fs", self.what, exc, delay)
                else:
                    log.exception("%s failed; retrying in %.1fs", self.what, delay)
                await asyncio.sleep(delay)
            else:
                failures = 0
                await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def connected(cfg: Config) -> AsyncIterator[aioredis.Redis]:
    """A client of the crawl's Redis (`connect`), closed on the way out; a close that fails or
    hangs (Redis gone meanwhile) does not fail the caller."""
    client = connect(cfg)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.aclose()


def text(value: Any) -> str:
    """A Redis reply value as str (replies are bytes: the clients do not decode)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
