"""A worker's background loops always end when it closes, even one whose first cancellation
is turned into an error (Python 3.11's asyncio.timeout does that when its own deadline fires
at the moment of the cancel); and what a worker changes in its process is undone."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import pytest
from crawling import crawl, crawl_config

from core.tasks import cancel_and_wait
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
    assert gc.isenabled()
    seen: list[bool] = []
    real_read = Worker._read_loop

    async def read_loop(self: Worker, until_idle: bool) -> None:
        seen.append(gc.isenabled())  # while the workers run
        await real_read(self, until_idle)

    cfg = crawl_config(namespace, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Worker, "_read_loop", read_loop)
        await crawl(cfg, [], workers=2)
    assert seen == [False, False]  # collections on a timer while they ran
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_cyclic_garbage_is_collected_on_a_timer_while_a_worker_runs(
    namespace: str, tmp_path: Path
) -> None:
    """Automatic collection is off during a crawl, yet a reference cycle dropped on the event
    loop is freed within seconds."""
    real_read = Worker._read_loop
    freed_after: list[float] = []

    async def read_loop(self: Worker, until_idle: bool) -> None:
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle
        started = time.monotonic()
        while gone() is not None and time.monotonic() - started < 15:
            await asyncio.sleep(0.05)
        freed_after.append(time.monotonic() - started)
        await real_read(self, until_idle)

    cfg = crawl_config(namespace, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Worker, "_read_loop", read_loop)
        await crawl(cfg, [], workers=1)
    assert len(freed_after) == 1 and freed_after[0] < 7.0
