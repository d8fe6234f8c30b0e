"""A lock held while work runs stays with a live holder however long the work takes, and
lapses within one TTL of a dead holder, so that the next process takes the work over."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis
from crawling import TEST_REDIS_URL

from core import status
from core.config import Config
from core.keys import Keys
from core.locks import kept
from core.storage import open_storage
from crawler.queue import WorkQueue
from crawler.shards import Shards


async def test_a_kept_lock_outlives_its_ttl_and_is_gone_after_the_work(
    aredis: aioredis.Redis, namespace: str
) -> None:
    name = f"{namespace}:lock"
    lock = aredis.lock(name, timeout=0.3, blocking=False, thread_local=False)
    assert await lock.acquire()
    async with kept(lock, 0.3):
        await asyncio.sleep(1.0)  # more than three TTLs
        assert await lock.owned()
        rival = aredis.lock(name, timeout=0.3, blocking=False, thread_local=False)
        assert not await rival.acquire()
    assert not await aredis.exists(name)


# A finalizer whose report write never ends (the process is killed during it).
KILLED_FINALIZER = """
import asyncio, sys, time
import redis.asyncio as aioredis
from core import status
from core.config import Config
from core.keys import Keys
from core.storage import open_storage
from crawler.queue import WorkQueue
from crawler.shards import Shards

status.write_report = lambda *a, **k: time.sleep(600)
url, ns, out = sys.argv[1:]
cfg = Config()
cfg.queue.lease_timeout_s = 0.5

async def main():
    client = aioredis.Redis.from_url(url)
    keys = Keys(ns)
    await Shards(client, keys, WorkQueue(client, keys, cfg.queue), open_storage(out)).finalize("s0")

asyncio.run(main())
"""


async def test_a_shard_whose_finalizer_was_killed_is_reported_about_one_lease_later(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    cfg = Config()
    cfg.queue.lease_timeout_s = 0.5
    keys = Keys(namespace)
    out = str(tmp_path / "out")
    shards = Shards(aredis, keys, WorkQueue(aredis, keys, cfg.queue), open_storage(out))
    await aredis.hset(keys.shard_meta("s0"), mapping={"total": 0, "done": 0})
    await aredis.sadd(keys.shards_complete, "s0")
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_FINALIZER, TEST_REDIS_URL, namespace, out]
    )
    try:
        while not await aredis.exists(keys.shard_finalize_lock("s0")):
            assert child.poll() is None, "the finalizer ended before taking the lock"
            await asyncio.sleep(0.05)
        assert await shards.finalize_all() == []  # someone else is on it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    reported: list[str] = []
    for _ in range(100):  # 10 s: twenty leases
        reported = await shards.finalize_all()
        if reported:
            break
        await asyncio.sleep(0.1)
    assert reported == ["s0"]
    assert status.shard_is_reported(open_storage(out), "s0")
    assert not await aredis.sismember(keys.shards_complete, "s0")
