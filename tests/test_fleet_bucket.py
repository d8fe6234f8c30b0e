"""A fleet writing to one bucket: three worker processes, one killed with SIGKILL mid-run, the
S3 server (SeaweedFS) killed and started again mid-run. Every image ends with exactly one
terminal record, every stored object is whole (it decodes, and matches its record's size and
sha256), and no object under a final name is anything else."""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from crawling import TEST_REDIS_URL, churn_flags, crawl_config, report, start_worker, stuck_state
from PIL import Image
from s3_server import SeaweedFS

from core import status
from core.keys import CRAWL_GROUP, Keys
from core.storage import open_storage
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.sources import expand_sources
from testweb import ImageWeb, make_docs, write_shard

SHARD = "fleet_s3_shard_0"


@pytest.mark.timeout(400)
async def test_a_fleet_on_one_bucket_survives_a_killed_worker_and_a_restarted_server(
    web: ImageWeb, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = SeaweedFS(tmp_path / "s3")
    server.start()
    try:
        await run_fleet(web, server, tmp_path, namespace, monkeypatch)
    finally:
        server.stop()


async def run_fleet(
    web: ImageWeb, server: SeaweedFS, tmp_path: Path, namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)  # the workers inherit them
    server.create_bucket("fleet-bucket")
    output = "s3://fleet-bucket/crawl"
    docs = make_docs(web, 60, seed=5151, sizes="small", faults=0.05)
    shard = tmp_path / f"{SHARD}.jsonl"
    write_shard(shard, docs)
    names = {i["image_name"] for d in docs for i in d["image_info"]}
    cfg = crawl_config(namespace, tmp_path)  # (ingest checks addresses too)
    cfg.paths.output = output
    args = churn_flags(namespace, TEST_REDIS_URL, output, limits__host_rate=20,
                       limits__local_host_rate=20, worker__grace_period_s=3)  # fmt: skip
    keys = Keys(namespace)
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    storage = open_storage(output, cfg.storage)
    # SeaweedFS makes its first volume on the first write to a new bucket (seconds on a busy
    # machine): the server is ready once that is done
    await asyncio.to_thread(storage.put_sync, "_ready/probe", b"ready")
    logs = tmp_path / "workers.log"
    procs = []
    try:
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        await Ingest(cfg, client).run(expand_sources([str(shard)]))
        procs = [start_worker(args, logs) for _ in range(3)]

        async def recorded() -> int:
            return sum(int(v) for k, v in (await client.hgetall(keys.counts)).items()
                       if k != b"bytes")  # fmt: skip

        events: list[str] = []
        at: list[int] = []  # images recorded when the worker was killed, the server restarted
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            done = await recorded()
            if not events and done >= len(names) // 5:
                procs[0].send_signal(signal.SIGKILL)  # mid-upload, mid-record: anything
                await asyncio.to_thread(procs[0].wait)
                events.append("kill")
                at.append(done)
            elif events == ["kill"] and done >= len(names) // 3:
                await asyncio.to_thread(server.restart)
                events.append("s3")
                at.append(done)
            elif events == ["kill", "s3"] and await asyncio.to_thread(
                storage.exists_sync, status.report_key(SHARD)
            ):
                break
        else:
            state = await stuck_state(client, keys, SHARD, logs)
            raise AssertionError(f"the fleet did not finish ({events})\n{state}")
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in procs[1:]]
        pending = await client.xpending(keys.queue, CRAWL_GROUP)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await client.aclose()
    assert codes == [0, 0], logs.read_text()[-3000:]
    assert at[0] <= at[1] < len(names), "both happened mid-run"
    assert pending["pending"] == 0
    records = report(cfg, SHARD)  # asserts one record per image
    assert set(records) == names
    stored = {n: r for n, r in records.items() if r["status"] == status.OK}
    assert len(stored) >= len(names) // 2, Counter(r["status"] for r in records.values())
    objects = storage.names_sync(SHARD)
    # every object under the shard is an image some record names, whole
    assert objects == {r["path"].split("/", 1)[1] for r in stored.values()}
    for rec in stored.values():
        data = storage.get_sync(rec["path"])
        assert len(data) == rec["bytes"]
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size == (rec["width"], rec["height"])
