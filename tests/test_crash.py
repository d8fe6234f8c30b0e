"""Crashes: workers killed with SIGKILL at random moments and Redis killed and restarted
(AOF) during a run; afterwards every image has exactly one terminal record and no file is
partial."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis
from crawling import churn_flags, crawl_config, report, start_worker, stuck_state
from PIL import Image
from redis_server import RedisProcess

from core.keys import Keys
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.shards import Shards
from crawler.sources import expand_sources
from testweb import ImageWeb, make_docs, write_shard


async def test_kill_9_workers_and_redis_mid_run_loses_nothing_and_duplicates_nothing(
    web: ImageWeb, tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    rng = random.Random(11)
    try:
        docs = make_docs(web, 120, seed=5, sizes="small", faults=0.1)
        shard = tmp_path / "crash_shard_0.jsonl"
        write_shard(shard, docs)
        cfg = crawl_config("crash", tmp_path, queue={"lease_timeout_s": 2.0})
        cfg.redis.url = server.url
        args = churn_flags(
            "crash", server.url, cfg.paths.output, limits__host_rate=40,
            limits__local_host_rate=40, worker__grace_period_s=2,
        )  # fmt: skip
        client = aioredis.Redis.from_url(server.url)
        keys = Keys("crash")
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        ingest = Ingest(cfg, client)
        ingest_task = asyncio.create_task(ingest.run(expand_sources([str(shard)])))
        logs = tmp_path / "workers.log"
        procs = [start_worker(args, logs) for _ in range(3)]
        kills, redis_restarted = 0, False
        deadline = time.monotonic() + 150
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                if kills < 6:
                    victim = rng.randrange(len(procs))
                    procs[victim].send_signal(signal.SIGKILL)
                    procs[victim].wait()
                    procs[victim] = start_worker(args, logs)
                    kills += 1
                if kills == 3 and not redis_restarted:
                    server.kill()
                    await asyncio.sleep(0.5)
                    server.start()
                    redis_restarted = True
                if ingest_task.done() and kills >= 6:
                    try:
                        meta = await client.exists(keys.shard_meta("crash_shard_0"))
                    except (OSError, aioredis.RedisError):
                        continue
                    if not meta:
                        break
            else:
                state = await stuck_state(client, keys, "crash_shard_0", logs)
                raise AssertionError(f"the run did not finish\n{state}")
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
        await ingest_task
        await Shards(
            client, keys, WorkQueue(client, keys, cfg.queue), cfg.output_dir
        ).finalize_all()
        await client.aclose()
    finally:
        server.stop()

    records = report(cfg, "crash_shard_0")  # asserts one record per image
    names = {info["image_name"] for d in docs for info in info_list(d)}
    assert set(records) == names
    assert redis_restarted and kills == 6
    shard_dir = cfg.output_dir / "crash_shard_0"
    files = {p.name for p in shard_dir.iterdir()}
    assert not [f for f in files if f.startswith(".")], "temporary files left behind"
    ok = {n for n, r in records.items() if r["status"] == "ok"}
    assert ok == files
    for name in ok:
        with Image.open(io.BytesIO((shard_dir / name).read_bytes())) as img:
            img.load()  # whole, decodable
            assert img.size == (records[name]["width"], records[name]["height"])
    assert len(ok) > 0.7 * len(names)
    assert os.path.exists(cfg.output_dir / "_status" / "crash_shard_0.summary.json")


def info_list(doc: dict[str, object]) -> list[dict[str, str]]:
    infos = doc["image_info"]
    assert isinstance(infos, list)
    return infos
