"""Chaos: poison entries, crawl and assignment workers killed with SIGKILL, and Redis killed and
restarted (AOF), all during one crawl of three shards. It ends with the invariants: one record
per image and only the shard's own images in its report, every stored file whole, no
temporary file left, every shard reported and rewritten."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
from crawling import (
    churn_flags,
    crawl_config,
    flags,
    own_names,
    report,
    start_worker,
    started,
    stuck_state,
    write_shards,
)
from PIL import Image
from redis_server import RedisProcess
from test_poison import POISON

from core.keys import CRAWL_GROUP, Keys
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.sources import expand_sources
from testweb import ImageWeb


async def test_poison_kills_and_a_redis_restart_end_with_every_shard_whole_and_rewritten(
    web: ImageWeb, tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    rng = random.Random(2024)
    ns = "chaos"
    keys = Keys(ns)
    shards = [f"chaos_shard_{i}" for i in range(3)]
    docs, paths = write_shards(web, tmp_path, shards, 10, seed=60, faults=0.05)
    cfg = crawl_config(ns, tmp_path, queue={"lease_timeout_s": 2.0})
    cfg.redis.url = server.url
    args = churn_flags(
        ns, server.url, cfg.paths.output, queue__max_deliveries=3, limits__host_rate=20,
        limits__local_host_rate=20, worker__grace_period_s=2,
    )  # fmt: skip
    assign_args = flags({
        "redis.url": server.url, "redis.namespace": ns, "paths.output": cfg.paths.output,
        "redis.reconnect_backoff_s": 0.1, "queue.lease_timeout_s": 2,
    })  # fmt: skip
    logs = tmp_path / "workers.log"

    def start_assigner() -> subprocess.Popen[bytes]:
        with open(logs, "ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "assign", "worker", *assign_args],
                stdout=subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip

    good_url = docs[shards[0]][0]["image_info"][0]["raw_url"].encode()

    async def add_poison() -> None:
        for fields, _why in POISON:
            await client.xadd(
                keys.queue,
                {
                    k: v.replace(b"SHARD0", shards[0].encode())
                    .replace(b"SHARD1", shards[1].encode())
                    .replace(b"URL", good_url)
                    for k, v in fields.items()
                },  # type: ignore[arg-type]
            )

    client = aioredis.Redis.from_url(server.url)
    workers = [start_worker(args, logs) for _ in range(3)]
    assigner = start_assigner()
    events = ["poison", "kill", "redis", "poison", "kill", "kill-assigner", "kill"]
    done_events: list[str] = []
    try:
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        ingest = asyncio.create_task(Ingest(cfg, client).run(expand_sources(paths)))
        deadline = time.monotonic() + 180  # a bound for a hang, not for a busy machine
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.3, 0.8))
            if events:
                event = events.pop(0)
                if event == "poison":
                    await add_poison()
                elif event == "kill":
                    i = rng.randrange(len(workers))
                    workers[i].send_signal(signal.SIGKILL)
                    await asyncio.to_thread(workers[i].wait)
                    workers[i] = start_worker(args, logs)
                elif event == "kill-assigner":
                    assigner.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(assigner.wait)
                    assigner = start_assigner()
                else:
                    server.kill()
                    await asyncio.sleep(0.5)
                    server.start()
                done_events.append(event)
                continue
            rewritten = all((cfg.output_dir / "_shards" / f"{s}.jsonl").exists() for s in shards)
            if ingest.done() and rewritten:
                try:
                    if not await client.xlen(keys.queue):
                        break
                except (OSError, aioredis.RedisError):
                    continue
        else:
            state = await stuck_state(client, keys, shards[0], logs)
            raise AssertionError(f"the chaos run did not finish\n{state}")
        await ingest
        await started(client, keys, workers)  # a worker restarted late gets its SIGTERM
        assert [p.poll() for p in [*workers, assigner]] == [None] * 4, "a process exited"
        pending = await client.xpending(keys.queue, CRAWL_GROUP)
        dead = [e[1][b"reason"].decode() for e in await client.xrange(keys.dead, "-", "+")]
    finally:
        for p in [*workers, assigner]:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in [*workers, assigner]]
        await client.aclose()
        server.stop()
    assert codes == [0] * 4
    assert len(done_events) == 7
    assert pending["pending"] == 0
    assert sum("'n' is not UTF-8" in r for r in dead) == 2  # each poison batch settled once
    for shard in shards:
        records = report(cfg, shard)  # one record per image
        assert set(records) == own_names(docs[shard])
        shard_dir = cfg.output_dir / shard
        files = {p.name for p in shard_dir.iterdir()}
        ok = {n for n, r in records.items() if r["status"] == "ok"}
        assert ok == files  # nothing else written, no temporary file
        for name in ok:
            data = (shard_dir / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == records[name]["sha256"]
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        rewritten = (cfg.output_dir / "_shards" / f"{shard}.jsonl").read_bytes().splitlines()
        assert len(rewritten) == len(docs[shard])
    assert not [p for p in (cfg.output_dir / "_status").iterdir() if p.name.startswith(".")]
