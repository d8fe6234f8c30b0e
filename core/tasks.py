"""Stopping asyncio tasks for certain.

One `cancel()` is not always enough on Python 3.11: when an `asyncio.timeout` inside the task
expires at the moment of the cancel, the task sees TimeoutError instead of CancelledError and,
if it handles that error, goes on. Cancel again until it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], *, rounds: int = 20, each_s: float = 0.5
) -> set[asyncio.Future[Any]]:
    """Cancel the tasks, again every `each_s` while any is pending; returns those still
    pending after `rounds` rounds (empty when all ended)."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        for t in pending:
            t.cancel()
        _done, pending = await asyncio.wait(pending, timeout=each_s)
    return pending
