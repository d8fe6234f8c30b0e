"""`mmc4-crawl serve-dataset`: run the dataset API until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import errno
import sys

from core.config import Config
from core.exitcodes import ExitCode
from core.runtime import StopSignals, serving
from crawler.dataset.api import make_app
from crawler.dataset.auth import BadTokenHash, TokenCheck


async def serve(cfg: Config, host: str, port: int) -> int:
    """Serve until a signal; prints the address (with the port bound when 0 was asked)."""
    try:
        tokens = TokenCheck(cfg.dataset.token_hashes)
    except BadTokenHash as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not tokens:
        print(
            "error: dataset.token_hashes is empty: create a token with "
            "`mmc4-crawl dataset-token` and add its hash",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    async with contextlib.AsyncExitStack() as stack:
        try:
            bound = await stack.enter_async_context(serving(make_app(cfg, tokens), host, port))
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return ExitCode.ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else ExitCode.FAILURE
        print(f"dataset API on http://{host}:{bound}/datasets/mmc4", flush=True)
        with StopSignals() as signals:
            await signals.event.wait()
    return ExitCode.OK
