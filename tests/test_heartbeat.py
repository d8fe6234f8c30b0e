"""Specifications of core.heartbeat: the heartbeat hash, its tallies, the fleet history."""

from __future__ import annotations

import os
import socket
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_server import free_port

from core.heartbeat import Heartbeat, sample_history
from core.keys import Keys


async def test_a_beat_writes_who_and_when_and_the_workers_fields_with_a_ttl(
    aredis: aioredis.Redis, namespace: str
) -> None:
    key = f"{namespace}:beat"
    await Heartbeat(aredis, key, 2.0, lambda: {"shard": "s1", "held": 3}).beat()
    fields = {k.decode(): v.decode() for k, v in (await aredis.hgetall(key)).items()}
    assert fields["host"] == socket.gethostname() and fields["pid"] == str(os.getpid())
    assert abs(float(fields["seen"]) - time.time()) < 60
    assert fields["shard"] == "s1" and fields["held"] == "3"
    assert 0 < await aredis.ttl(key) <= 7  # three intervals and a second


async def test_tallies_reach_redis_with_a_beat_and_wait_for_the_next_when_it_fails(
    aredis: aioredis.Redis, namespace: str
) -> None:
    zset, key = f"{namespace}:failing", f"{namespace}:beat"
    away = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    beat = Heartbeat(away, key, 2.0, dict)
    beat.tally(zset, "a.test")
    beat.tally(zset, "a.test")
    with pytest.raises((RedisConnectionError, OSError)):
        await beat.beat()
    await away.aclose()
    beat.client = aredis
    beat.tally(zset, "b.test")
    await beat.beat()
    assert await aredis.zscore(zset, "a.test") == 2 and await aredis.zscore(zset, "b.test") == 1
    await beat.beat()  # sent once only
    assert await aredis.zscore(zset, "a.test") == 2


async def test_one_history_sample_per_interval_across_the_fleet(
    aredis: aioredis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await aredis.hset(keys.counts, mapping={"ok": 5, "timeout": 2, "bytes": 999})

    async def depth() -> int:
        return 7

    await sample_history(aredis, keys, "worker-1", depth)
    await sample_history(aredis, keys, "worker-2", depth)  # within the same 10 s
    samples = await aredis.lrange(keys.history, 0, -1)
    assert len(samples) == 1
    _when, done, queued = samples[0].decode().split()
    assert (done, queued) == ("7", "7")
