"""How every command reports a failure: one line naming what failed and what to check, and a
distinct exit code from `core.exitcodes` (no traceback unless ``-vv``).

Commands raise what they raise (a Redis ``ConnectionError``, an ``OSError`` from a bind, a
``ConfigError``); `ReportingGroup`, the click group of ``mmc4-crawl`` and ``mmc4-assign``, turns
it into that line and code in one place. A command that knows better raises `CommandError`.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import traceback
from typing import Any

import click
import orjson
from redis import exceptions as redis_exc

from core import logs
from core.config import ConfigError
from core.exitcodes import ExitCode
from core.storage import StorageError

_OUTPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}
_PASSWORD = re.compile(r"(?<=://)([^:/@]*):[^@/]*@")


class CommandError(Exception):
    """A failure a command has already put into words, with its exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def redact(text: str) -> str:
    """Hide the password of any URL in `text` (``redis://:secret@host`` → ``redis://:***@host``)."""
    return _PASSWORD.sub(r"\1:***@", text)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException, redis_url: str = "") -> tuple[ExitCode, str] | None:
    """The exit code and one-line message of a failure, or None for one we cannot name."""
    from core.embedded import EmbeddedRedisError

    exc = _leaf(exc)
    where = f" at {redact(redis_url)}" if redis_url else ""
    if isinstance(exc, CommandError):
        return exc.code, exc.message
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE, f"configuration: {exc}"
    if isinstance(exc, redis_exc.AuthenticationError) or (
        isinstance(exc, redis_exc.ResponseError)
        and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
    ):
        return ExitCode.REDIS_UNAVAILABLE, (
            f"Redis{where} refused the credentials ({exc}): check the password in redis.url"
        )
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError):
        return ExitCode.REDIS_UNAVAILABLE, (
            f"cannot reach Redis{where} ({redact(str(exc))}): check that it is running and "
            "that redis.url (--redis-url, MMC4_REDIS__URL) points at it"
        )
    if isinstance(exc, EmbeddedRedisError):
        return ExitCode.REDIS_UNAVAILABLE, f"embedded Redis: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return ExitCode.ADDRESS_IN_USE, (
            f"cannot listen: {exc.strerror or exc}; choose another port (--port, "
            "metrics.port) or stop the process that holds it"
        )
    if isinstance(exc, StorageError):
        return ExitCode.OUTPUT_UNAVAILABLE, (
            f"output: {exc}; check paths.output, the bucket and the AWS_* settings"
        )
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
        name = f" {exc.filename}" if exc.filename else ""
        return ExitCode.OUTPUT_UNAVAILABLE, (
            f"cannot write{name} ({exc.strerror or exc}): check paths.output (--output) and "
            "its permissions and free space"
        )
    if isinstance(exc, FileNotFoundError):
        return ExitCode.NOT_FOUND, f"not found: {exc.filename or exc}"
    return None


def report(exc: BaseException, *, verbose: int, redis_url: str = "") -> ExitCode:
    """Print the failure of a command as one line (with its traceback at -vv); its exit code."""
    named = describe(exc, redis_url)
    if named is None:
        code = ExitCode.FAILURE
        leaf = _leaf(exc)
        message = (
            f"unexpected error: {type(leaf).__name__}: {redact(str(leaf))} "
            "(run with -vv for the traceback)"
        )
    else:
        code, message = named
    if verbose >= 2:
        traceback.print_exception(exc, file=sys.stderr)
    logging.shutdown()
    if logs.json_format():
        line = {"level": "ERROR", "message": f"error: {message}", "exit_code": int(code)}
        click.echo(orjson.dumps(line).decode(), err=True)
    else:
        click.echo(f"error: {message}", err=True)
    return code


class ReportingGroup(click.Group):
    """A click group whose commands fail with one line and a code from `ExitCode`.

    The group's callback stores the verbosity and the Redis URL (for the message) in
    ``ctx.meta["mmc4.verbose"]`` and ``ctx.meta["mmc4.redis_url"]``.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            ctx.exit(ExitCode.USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(ExitCode.INTERRUPTED)
        except Exception as exc:
            code = report(
                exc,
                verbose=int(ctx.meta.get("mmc4.verbose", 0)),
                redis_url=str(ctx.meta.get("mmc4.redis_url", "")),
            )
            ctx.exit(code)
