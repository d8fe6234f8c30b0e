"""Redis connections from the configured URL (redis://, rediss://, unix://; password in URL)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

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


async def retrying(
    fn: Callable[[], Awaitable[T]],
    backoff_s: float = 0.5,
    *,
    what: str = "redis",
    give_up_after_s: float = 0.0,
) -> T:
    """Call fn until Redis answers (for idempotent calls only), backing off up to 30 s.

    With ``give_up_after_s`` > 0, raise RedisUnavailable once Redis has been unreachable for
    that long (counted from this call's first failure).
    """
    delay = backoff_s
    first_failure = 0.0
    while True:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            first_failure = first_failure or now
            waited = now - first_failure
            if give_up_after_s and waited >= give_up_after_s:
                raise RedisUnavailable(
                    f"{what}: Redis unavailable for {waited:.0f} s ({exc})"
                ) from exc
            if give_up_after_s:
                delay = min(delay, max(0.05, give_up_after_s - waited))
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def text(value: Any) -> str:
    """A Redis reply value as str (replies are bytes: the clients do not decode)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
