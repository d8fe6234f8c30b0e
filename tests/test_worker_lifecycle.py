"""A worker's background loops always end when it closes, even one whose first cancellation
is turned into an error (Python 3.11's asyncio.timeout does that when its own deadline fires
at the moment of the cancel)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from crawling import crawl_config

from crawler.tasks import cancel_and_wait
from crawler.worker import Worker


async def test_a_loop_that_swallows_its_cancel_still_stops(tmp_path: Path) -> None:
    worker = Worker(crawl_config("lifecycle", tmp_path))
    swallowed = 0

    async def body() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed += 1
            raise TimeoutError("timed out") from None  # what the 3.11 race looks like

    async def quiet_body() -> None:
        await asyncio.sleep(30)

    loops = [asyncio.create_task(worker._loop(body)), asyncio.create_task(worker._loop(quiet_body))]
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait(loops), 10)  # as Worker.run closes its loops
    assert all(t.done() for t in loops)
    assert swallowed == 1


async def test_cancel_and_wait_cancels_until_the_task_ends() -> None:
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([task], each_s=0.05) == set()
    assert task.cancelled() and cancels == 3
