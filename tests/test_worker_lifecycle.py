"""A worker's background loops always end when it closes, even one whose first cancellation
is turned into an error (Python 3.11's asyncio.timeout does that when its own deadline fires
at the moment of the cancel); and what a worker changes in its process is undone."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
from crawling import crawl, crawl_config

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


async def test_the_garbage_collector_is_restored_when_in_process_workers_stop(
    namespace: str, tmp_path: Path
) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []
    real_read = Worker._read_loop

    async def read_loop(self: Worker, until_idle: bool) -> None:
        seen.append(gc.get_threshold())  # while the workers run
        await real_read(self, until_idle)

    cfg = crawl_config(namespace, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Worker, "_read_loop", read_loop)
        await crawl(cfg, [], workers=2)
    assert len(seen) == 2 and all(t[0] > before[0] for t in seen)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
