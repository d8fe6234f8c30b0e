"""Logging of every command: one format, a level from ``-v`` or ``MMC4_LOG_LEVEL``, JSON lines
with ``--log-format json`` (or ``MMC4_LOG_FORMAT=json``), and the worker's periodic summary.

Processes started by a command (the workers of `run`) inherit the level and the format
through those two environment variables.

A crawl worker logs, at INFO, one summary line per ``worker.log_interval_s`` (images done,
rate, failures by kind, like Scrapy's LogStats) and each kind of failure once per host per
interval, not once per image.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

from core.status import OK

LEVEL_ENV = "MMC4_LOG_LEVEL"
FORMAT_ENV = "MMC4_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def json_format() -> bool:
    """Whether this process logs JSON lines (set up by `setup`, inherited by children)."""
    return os.environ.get(FORMAT_ENV) == "json"


def level_name(verbose: int, environ: dict[str, str] | None = None) -> str:
    """``-v`` (or more) means DEBUG; otherwise MMC4_LOG_LEVEL, default INFO."""
    env = os.environ if environ is None else environ
    if verbose > 0:
        return "DEBUG"
    name = env.get(LEVEL_ENV, "INFO").strip().upper() or "INFO"
    if name not in _LEVELS:
        raise ValueError(f"{LEVEL_ENV}={name!r}: expected one of {', '.join(_LEVELS)}")
    return name


def setup(verbose: int = 0, fmt: str | None = None) -> None:
    """Configure the root logger of this process and export the choice to its children."""
    name = level_name(verbose)
    chosen = (fmt or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"log format {chosen!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    os.environ[LEVEL_ENV] = name
    os.environ[FORMAT_ENV] = chosen


class FailureLog:
    """Logs each (host, failure kind) once per interval; the rest are only counted (they
    appear in the worker's summary)."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.log = logger
        self.interval_s = interval_s
        self._seen: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def failure(self, host: str, kind: str, detail: str) -> None:
        now = time.monotonic()
        key = (host, kind)
        last = self._seen.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed += 1
            return
        if len(self._seen) > 10_000:  # bounded: forget what is older than one interval
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.interval_s}
        self._seen[key] = now
        self.log.info(
            "%s from %s%s (more of this host and kind are counted, not logged, for %.0f s)",
            kind, host or "?", f": {detail}" if detail else "", self.interval_s,
        )  # fmt: skip


class LogStats:
    """The periodic one-line summary of a worker: done, rate, failures by kind."""

    def __init__(self) -> None:
        self._last_time = time.monotonic()
        self._last: dict[str, int] = {}

    def line(self, by_status: dict[str, int], held: int) -> str:
        now = time.monotonic()
        elapsed = max(1e-6, now - self._last_time)
        delta = {k: v - self._last.get(k, 0) for k, v in by_status.items()}
        done = sum(by_status.values())
        new = sum(delta.values())
        failures = sorted(
            ((k, n) for k, n in delta.items() if k != OK and n > 0), key=lambda kv: -kv[1]
        )
        failed = ", ".join(f"{k} {n}" for k, n in failures) or "none"
        self._last_time, self._last = now, dict(by_status)
        return (
            f"{done} images done (+{new} in {elapsed:.0f} s, {new / elapsed:.1f}/s): "
            f"ok {delta.get(OK, 0)}, failures {failed}; holding {held}"
        )
