"""A fleet: several worker processes around one Redis, per-host limits held fleet-wide,
workers stopped with SIGTERM (graceful) and SIGKILL at random, Redis restarted once."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis
from crawling import churn_flags, crawl_config, flags, report, start_worker, started, stuck_state
from redis_server import RedisProcess

from core.exitcodes import ExitCode
from core.keys import CRAWL_GROUP, Keys
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.shards import Shards
from crawler.sources import expand_sources
from testweb import ImageWeb, check_rate, make_docs, write_shard

RATE, BURST = 6.0, 2


async def test_a_fleet_keeps_host_limits_and_accounts_for_every_image_through_churn(
    web: ImageWeb, tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    rng = random.Random(23)
    docs = make_docs(web, 90, seed=4242, sizes="small", faults=0.05)
    shard = tmp_path / "fleet_shard_0.jsonl"
    write_shard(shard, docs)
    paths = {i["raw_url"].split("/", 3)[3] for d in docs for i in d["image_info"]}
    cfg = crawl_config("fleet", tmp_path, queue={"lease_timeout_s": 2.0})
    cfg.redis.url = server.url
    args = churn_flags(
        "fleet", server.url, cfg.paths.output, limits__host_rate=RATE, limits__host_burst=BURST,
        limits__local_host_rate=RATE, limits__host_concurrency=2, worker__grace_period_s=3,
    )  # fmt: skip
    client = aioredis.Redis.from_url(server.url)
    keys = Keys("fleet")
    graceful_exits: list[int] = []
    try:
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        ingest_task = asyncio.create_task(Ingest(cfg, client).run(expand_sources([str(shard)])))
        logs = tmp_path / "workers.log"
        procs = [start_worker(args, logs) for _ in range(4)]
        events: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.5, 1.2))
            if len(events) < 6:
                i = rng.randrange(len(procs))
                if len(events) % 2 == 0:
                    await started(client, keys, [procs[i]])  # a SIGTERM drains a started worker
                    procs[i].send_signal(signal.SIGTERM)
                    graceful_exits.append(await asyncio.to_thread(procs[i].wait, 60))
                    events.append("term")
                else:
                    procs[i].send_signal(signal.SIGKILL)
                    await asyncio.to_thread(procs[i].wait)
                    events.append("kill")
                procs[i] = start_worker(args, logs)
                if len(events) == 3:
                    server.kill()
                    await asyncio.sleep(0.5)
                    server.start()
                    events.append("redis")
            elif ingest_task.done():
                try:
                    if not await client.exists(keys.shard_meta("fleet_shard_0")):
                        break
                except (OSError, aioredis.RedisError):
                    continue
        else:
            state = await stuck_state(client, keys, "fleet_shard_0", logs)
            raise AssertionError(f"the fleet did not finish\n{state}")
        await started(client, keys, procs)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 60) for p in procs]
        await ingest_task
        await Shards(
            client, keys, WorkQueue(client, keys, cfg.queue), cfg.output_dir
        ).finalize_all()
        pending = await client.xpending(keys.queue, CRAWL_GROUP)
    finally:
        await client.aclose()
        server.stop()

    assert graceful_exits == [0, 0, 0] and codes == [0, 0, 0, 0]
    assert pending["pending"] == 0
    records = report(cfg, "fleet_shard_0")  # asserts one record per image
    names = {i["image_name"] for d in docs for i in d["image_info"]}
    assert set(records) == names
    arrivals = [a for a in web.arrivals if a.path.lstrip("/") in paths]
    assert arrivals, "no request reached the web"
    # the GCRA state lives in Redis (with AOF), so restarts and churn do not reset it
    assert check_rate(arrivals, RATE, BURST, tolerance=0.05) == []


async def test_sigterm_finishes_within_the_grace_period_and_hands_back_the_rest(
    web: ImageWeb, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    tag = namespace
    quick = [web.url(i % 3, f"/img/64x64/{tag}-q{i}.jpg") for i in range(6)]
    stuck = [web.url(3 + i % 3, f"/fault/slow/20000/64x64/{tag}-s{i}.jpg") for i in range(6)]
    shard = tmp_path / "term_shard.jsonl"
    write_shard(shard, [{"image_info": [{"image_name": u.rsplit("/", 1)[1], "raw_url": u}
                                        for u in quick + stuck]}])  # fmt: skip
    cfg = crawl_config(namespace, tmp_path)
    await WorkQueue(aredis, keys, cfg.queue).ensure_group()
    await Ingest(cfg, aredis).run(expand_sources([str(shard)]))
    from crawling import TEST_REDIS_URL

    proc = start_worker(flags({
        "redis.url": TEST_REDIS_URL, "redis.namespace": namespace,
        "paths.output": cfg.paths.output, "fetch.allow_private_addresses": "true",
        "fetch.total_timeout_s": 30, "worker.image_processes": 1,
        "worker.flush_interval_s": 0.05, "worker.grace_period_s": 1.5,
    }))  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if int(await aredis.hget(keys.shard_meta("term_shard"), "done") or 0) >= 6:
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 20)
    took = time.monotonic() - started
    assert code == 0
    assert 1.0 < took < 8.0  # waited for the grace period, not for the 20 s responses
    records = await aredis.hgetall(keys.shard_records("term_shard"))
    recorded = [n.decode() for n, rec in records.items() if rec]  # "": still queued
    assert sorted(recorded) == sorted(u.rsplit("/", 1)[1] for u in quick)
    assert (await aredis.xpending(keys.queue, CRAWL_GROUP))["pending"] == 0
    handed_back = await aredis.xrange(keys.queue)
    assert sorted(e[1][b"n"].decode() for e in handed_back) == sorted(
        u.rsplit("/", 1)[1] for u in stuck
    )


async def test_a_worker_that_cannot_stop_gracefully_still_exits_by_its_deadline(
    tmp_path: Path,
) -> None:
    """A Redis that accepts connections and never answers: the worker hangs on its first
    call; SIGTERM must still end it (STOP_OVERRAN) with every thread's stack in its log."""
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        silent.append(w)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    log = tmp_path / "worker.log"
    proc = start_worker(
        flags({
            "redis.url": f"redis://127.0.0.1:{port}/0", "redis.socket_timeout_s": 600,
            "paths.output": tmp_path / "out", "worker.grace_period_s": 0.5,
        }),
        log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not silent and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert silent, "the worker never connected"
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 40)
    finally:
        if proc.poll() is None:
            proc.kill()
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()
    assert code == ExitCode.STOP_OVERRAN
    text = log.read_text()
    assert "graceful stop took longer than" in text
    assert "Thread 0x" in text and "File " in text  # the stacks, for the operator
