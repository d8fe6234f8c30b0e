"""Garbage collection on a timer while a crawl worker runs, not on allocation counts.

What start-up allocated (modules, config, sessions) is frozen out of every later collection,
automatic collection is off while a worker runs, and `collect_on_a_timer` collects the young
generations every five seconds and everything every minute.

Almost nothing a crawl allocates is cyclic garbage (174 objects found in 10,000 images), but
every item's tasks, futures and buffers count towards the automatic thresholds: with the
youngest generation at 7000 objects, collections take ~9 % of the worker's CPU (0.38 s of CPU
per 10,000 images; on the timer: 0.11 s; see docs/performance.md). The timer also bounds how
long cyclic garbage lives: five seconds in the young generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import NoReturn

YOUNG_S = 5.0  # seconds between collections of the young generations
FULL_EVERY = 12  # young collections per full one (a minute)

_users = 0  # workers running in this process
_was_enabled = True  # whether automatic collection was on before the first one started


@contextlib.contextmanager
def automatic_collection_off() -> Iterator[None]:
    """Freeze what exists and turn automatic collection off for as long as any worker of the
    process is inside; when the last one leaves (tests and embedders run workers in longer-
    lived processes), the collector is as it was."""
    global _users, _was_enabled
    _users += 1
    if _users == 1:
        _was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
    try:
        yield
    finally:
        _users -= 1
        if _users == 0:
            gc.unfreeze()
            if _was_enabled:
                gc.enable()


async def collect_on_a_timer() -> NoReturn:
    """Collect cyclic garbage every YOUNG_S seconds until cancelled."""
    tick = 0
    while True:
        await asyncio.sleep(YOUNG_S)
        tick += 1
        gc.collect(2 if tick % FULL_EVERY == 0 else 1)
