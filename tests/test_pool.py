"""Specifications of crawler.pool.ImagePool: image jobs in child processes, fed by the loop."""

from __future__ import annotations

import asyncio
import io
import operator
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from PIL import Image

from crawler.images import ImageSettings, init_worker
from crawler.pool import ImageJobError, ImagePool, ImageProcessDied
from crawler.store import shrink_and_store


@pytest.fixture
async def pool() -> AsyncIterator[ImagePool]:
    p = ImagePool(2, initializer=init_worker, initargs=(ImageSettings(),))
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is not alive
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_jobs_run_in_the_pool_processes_and_answer_their_own_caller(
    pool: ImagePool,
) -> None:
    results = await asyncio.gather(*(pool.run(operator.mul, i, 3) for i in range(200)))
    assert results == [3 * i for i in range(200)]
    seen = {await pool.run(os.getpid) for _ in range(20)}
    assert os.getpid() not in seen
    assert seen <= set(pool.pids) and len(pool.pids) == 2


def _wait_for_file(path: Path) -> int:
    """Job: wait (up to 20 s) for another job to create `path`."""
    deadline = time.monotonic() + 20
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return os.getpid()


def _create_file(path: Path) -> int:
    path.touch()
    return os.getpid()


async def test_both_processes_work_at_once(pool: ImagePool, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    waiter, creator = await asyncio.gather(
        pool.run(_wait_for_file, flag), pool.run(_create_file, flag)
    )
    assert waiter != creator


async def test_large_bodies_travel_whole(pool: ImagePool) -> None:
    body = os.urandom(5 << 20)
    assert await pool.run(bytes.__len__, body) == len(body)  # pickled with the arguments
    assert await pool.run(bytes.__len__, data=body) == len(body)  # sent as raw bytes
    assert await pool.run(operator.getitem, slice(-3, None), data=body) == body[-3:]
    assert await pool.run(bytes.__len__, data=b"") == 0
    sizes = await asyncio.gather(*(pool.run(len, data=os.urandom(n)) for n in range(0, 300, 7)))
    assert sizes == list(range(0, 300, 7))


async def test_a_job_that_raises_fails_alone(pool: ImagePool) -> None:
    with pytest.raises(ImageJobError, match="ZeroDivisionError"):
        await pool.run(operator.truediv, 1, 0)
    assert await pool.run(operator.add, 1, 2) == 3
    assert pool.restarts == 0


async def test_a_killed_process_fails_its_jobs_and_is_replaced(pool: ImagePool) -> None:
    victim = pool.pids[0]
    jobs = [asyncio.ensure_future(pool.run(time.sleep, 30)) for _ in range(4)]
    await asyncio.sleep(0.3)  # each process holds two of them
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(ImageProcessDied, match="died"):
        await asyncio.wait_for(asyncio.gather(*jobs[:1], *jobs[2:3]), 10)
    await _until(lambda: pool.restarts == 1 and len(pool.pids) == 2)
    assert victim not in pool.pids
    assert await asyncio.gather(*(pool.run(operator.neg, i) for i in range(10))) == [
        -i for i in range(10)
    ]
    for job in jobs:
        job.cancel()


async def test_a_cancelled_job_that_was_still_waiting_never_runs(
    pool: ImagePool, tmp_path: Path
) -> None:
    busy = [asyncio.ensure_future(pool.run(time.sleep, 0.5)) for _ in range(4)]
    marker = tmp_path / "ran"
    waiting = asyncio.ensure_future(pool.run(Path.write_text, marker, "x"))
    await asyncio.sleep(0.1)
    waiting.cancel()
    await asyncio.gather(*busy)
    assert await pool.run(operator.add, 2, 2) == 4  # everything sent since has been answered
    assert not marker.exists()


async def test_close_stops_every_process_and_fails_what_is_left() -> None:
    pool = ImagePool(1)
    await pool.start()
    pids = pool.pids
    running = asyncio.ensure_future(pool.run(time.sleep, 30))
    waiting = [asyncio.ensure_future(pool.run(time.sleep, 30)) for _ in range(3)]
    await asyncio.sleep(0.2)
    await asyncio.wait_for(pool.close(), 10)
    for job in (running, *waiting):
        with pytest.raises(ImageProcessDied, match="closed"):
            await job
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(os.getpid)


async def test_a_process_whose_socket_closes_exits_by_itself(pool: ImagePool) -> None:
    child = pool._children[0]
    pid = child.proc.pid if child.proc is not None else 0
    assert child.transport is not None
    child.transport.close()  # what the process sees when its worker dies
    await _until(lambda: not _alive(pid))
    await _until(lambda: pool.restarts == 1)


async def test_shrink_and_store_runs_in_the_pool(pool: ImagePool, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(buf, "JPEG")
    final = tmp_path / "shard" / "a.jpg"
    target = (str(tmp_path), "shard", "a.jpg")
    result = await pool.run(shrink_and_store, ImageSettings(), target, data=buf.getvalue())
    assert result.status == "ok" and result.data is None
    assert (result.width, result.height) == (800, 600)
    assert final.stat().st_size == result.stored_bytes
    with Image.open(final) as img:
        assert img.size == (800, 600)


def test_a_pool_needs_a_process() -> None:
    with pytest.raises(ValueError, match="at least one process"):
        ImagePool(0)


async def test_a_process_that_cannot_initialise_fails_the_start() -> None:
    pool = ImagePool(1, initializer=operator.truediv, initargs=(1, 0))
    with pytest.raises(ImageJobError, match="could not start: ZeroDivisionError"):
        await pool.start()
    await pool.close()
    assert pool.pids == [] or not any(_alive(pid) for pid in pool.pids)


def test_the_pool_works_on_uvloop_as_in_the_worker() -> None:
    async def scenario() -> tuple[list[int], int]:
        pool = ImagePool(2)
        await pool.start()
        try:
            products = await asyncio.gather(*(pool.run(operator.mul, i, 2) for i in range(50)))
            os.kill(pool.pids[1], signal.SIGKILL)
            await _until(lambda: pool.restarts == 1)
            assert await pool.run(operator.add, 1, 1) == 2
            return products, len(pool.pids)
        finally:
            await pool.close()

    products, processes = uvloop.run(scenario())
    assert products == [2 * i for i in range(50)]
    assert processes == 2


async def test_a_job_whose_arguments_cannot_be_sent_fails_alone(pool: ImagePool) -> None:
    with pytest.raises(ImageJobError, match="cannot send the job"):
        await pool.run(operator.add, lambda: 1, 2)
    assert await pool.run(operator.add, 2, 3) == 5


async def test_processes_are_pinned_round_robin_to_the_cpus_given_and_stay_so() -> None:
    cpu = min(os.sched_getaffinity(0))
    pool = ImagePool(2, cpus=[cpu])
    await pool.start()
    try:
        first = pool.pids
        assert {frozenset(os.sched_getaffinity(pid)) for pid in first} == {frozenset({cpu})}
        os.kill(first[0], signal.SIGKILL)
        await _until(lambda: len(pool.pids) == 2 and first[0] not in pool.pids)
        await _until(lambda: pool.restarts == 1)
        assert all(os.sched_getaffinity(pid) == {cpu} for pid in pool.pids)
    finally:
        await pool.close()
    unpinned = ImagePool(1)
    await unpinned.start()
    try:
        assert os.sched_getaffinity(unpinned.pids[0]) == os.sched_getaffinity(0)
    finally:
        await unpinned.close()
