"""`mmc4-crawl serve-dataset`: run the dataset API until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import signal
import sys

from aiohttp import web

from core import early
from core.config import Config
from core.exitcodes import ExitCode
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
    runner = web.AppRunner(make_app(cfg, tokens), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return ExitCode.ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else ExitCode.FAILURE
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"dataset API on http://{host}:{bound}/datasets/mmc4", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if early.stop_requested:  # a signal that came while the server was starting
        stop.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return ExitCode.OK
