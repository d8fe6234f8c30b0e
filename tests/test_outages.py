"""Outages: Redis unavailable at start and mid-run (stopped and started again), and an output
that cannot be written (a full file system). Workers wait, say so, and carry on; nothing is
recorded as a failure for a reason of the machine's own."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from crawling import (
    TEST_REDIS_URL,
    churn_flags,
    crawl_config,
    flags,
    own_names,
    report,
    start_worker,
    stuck_state,
)
from redis_server import RedisProcess, free_port
from test_assign_worker import read_docs, write_crawl

from core.config import Config
from core.keys import Keys
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.sources import expand_sources
from testweb import ImageWeb, make_docs, write_shard


async def eventually(what: str, check: object, timeout_s: float = 30.0) -> None:
    """Poll the async predicate `check` until it holds, failing with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, aioredis.RedisError):
            if await check():  # type: ignore[operator]
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for: {what}")


async def test_the_assignment_worker_waits_for_redis_at_start_and_rides_out_an_outage(
    tmp_path: Path,
) -> None:
    server = RedisProcess(tmp_path / "redis", port=free_port())
    output = tmp_path / "crawl"
    ns = "assign_outage"
    args = flags({
        "redis.url": server.url, "redis.namespace": ns, "paths.output": str(output),
        "redis.reconnect_backoff_s": 0.1, "worker.heartbeat_interval_s": 1,
    })  # fmt: skip
    log = open(tmp_path / "assign.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "assign", "worker", *args], stdout=log, stderr=log
    )
    client = aioredis.Redis.from_url(server.url)
    try:
        await asyncio.sleep(1.5)  # no Redis yet
        assert proc.poll() is None, "the assignment worker exited without Redis"
        server.start()
        for n, shard in enumerate(["a_shard", "b_shard"]):
            if n == 1:  # an outage mid-crawl
                server.kill()
                await asyncio.sleep(2.0)
                assert proc.poll() is None, "the assignment worker exited in an outage"
                server.start()
            source, rep = write_crawl(output, shard)
            fields = {"shard": shard, "source": str(source), "report": str(rep)}
            await client.xadd(Keys(ns).shards_done, {**fields, "output": str(output)})
            done = output / "_shards" / f"{shard}.jsonl"
            await eventually(f"{shard} rewritten", lambda d=done: _exists(d))
            assert len(read_docs(done)) == 6
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        await client.aclose()
        server.stop()
        log.close()
    assert code == 0, (tmp_path / "assign.log").read_text()


async def _exists(path: Path) -> bool:
    return path.exists()


def two_workers(
    ns: str, url: str, output: str, host_rate: int, logs: Path
) -> tuple[list[str], list[subprocess.Popen[bytes]], list[str]]:
    """Two worker processes (logging to `logs`) with heartbeats every second: their options,
    the processes, and the `worker --check` command line."""
    args = churn_flags(
        ns, url, output, limits__host_rate=host_rate, limits__local_host_rate=host_rate,
        worker__heartbeat_interval_s=1,
    )  # fmt: skip
    procs = [start_worker(args, logs) for _ in range(2)]
    return args, procs, [sys.executable, "-m", "crawler", *args, "worker", "--check"]


async def enqueue(cfg: Config, client: aioredis.Redis, keys: Keys, shard: Path) -> None:
    await WorkQueue(client, keys, cfg.queue).ensure_group()
    await Ingest(cfg, client).run(expand_sources([str(shard)]))


async def test_crawl_workers_keep_their_heartbeats_through_outages_and_finish(
    web: ImageWeb, tmp_path: Path
) -> None:
    """After a long outage has grown every backoff, a short blip still leaves the workers
    visible (status, `worker --check`) once Redis is back, and the crawl completes."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    ns = "hb_outage"
    docs = make_docs(web, 20, seed=77, sizes="small", faults=0)
    shard = tmp_path / "hb_shard.jsonl"
    write_shard(shard, docs)
    cfg = crawl_config(ns, tmp_path)
    cfg.redis.url = server.url
    client = aioredis.Redis.from_url(server.url)
    keys = Keys(ns)
    logs = tmp_path / "workers.log"
    _args, procs, check = two_workers(ns, server.url, cfg.paths.output, 4, logs)
    try:
        await enqueue(cfg, client, keys, shard)

        async def both_alive() -> bool:
            return len([k async for k in client.scan_iter(match=keys.worker_pattern)]) == 2

        await eventually("two heartbeats", both_alive)
        for outage_s in (6.0, 1.0):  # a long outage, then a blip
            server.kill()
            await asyncio.sleep(outage_s)
            server.start()
            # beats from before the outage may come back with the AOF: only new ones count
            for key in [k async for k in client.scan_iter(match=keys.worker_pattern)]:
                await client.delete(key)
            # within the heartbeat's freshness window (3 intervals), as `worker --check` asks
            await eventually("two heartbeats after the outage", both_alive, 3.0)
            assert subprocess.run(check, capture_output=True).returncode == 0
        assert [p.poll() for p in procs] == [None, None]

        async def reported() -> bool:
            return (cfg.output_dir / "_status" / "hb_shard.jsonl.gz").exists()

        try:
            await eventually("the shard reported", reported, 60)
        except BaseException:
            print(await stuck_state(client, keys, "hb_shard", logs))
            raise
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
        await client.aclose()
        server.stop()
    assert codes == [0, 0]
    assert set(report(cfg, "hb_shard")) == own_names(docs)


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `directory`: a real file system that fills up (ENOSPC).
    Needs the right to mount (root in a container); the test is skipped without it."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        chunk = bytes(64 << 10)
        while len(chunk) >= 512:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


async def test_a_full_output_pauses_the_workers_and_records_nothing_until_it_has_room(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    docs = make_docs(web, 24, seed=91, sizes="small", faults=0)
    shard = tmp_path / "full_shard.jsonl"
    write_shard(shard, docs)
    keys = Keys(namespace)
    with small_tmpfs(tmp_path / "out", "4m") as output:
        cfg = crawl_config(namespace, tmp_path)
        assert cfg.output_dir == output
        stale = output / "_status" / ".old_shard.summary.json.999.tmp"
        stale.parent.mkdir()
        stale.write_bytes(b"{partial")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        logs = tmp_path / "workers.log"
        args, procs, check = two_workers(namespace, TEST_REDIS_URL, str(output), 3, logs)
        try:
            await enqueue(cfg, client, keys, shard)

            async def some_stored() -> bool:
                counts = await client.hgetall(keys.counts)
                return int(counts.get(b"ok", 0)) > 0

            await eventually("a first image stored", some_stored)
            filler = output / "filler"
            fill(filler)

            async def both_paused() -> bool:
                beats = [await client.hget(k, "paused")
                         async for k in client.scan_iter(match=keys.worker_pattern)]  # fmt: skip
                return len(beats) == 2 and all(beats)

            await eventually("both workers paused", both_paused)
            checked = subprocess.run(check, capture_output=True)
            assert checked.returncode == 1 and b"paused" in checked.stderr
            status = subprocess.run(
                [sys.executable, "-m", "crawler", *args, "status"], capture_output=True
            )
            assert status.stdout.count(b"PAUSED") == 2
            counts = {k.decode(): int(v) for k, v in (await client.hgetall(keys.counts)).items()}
            assert set(counts) <= {"ok", "bytes"}, counts  # no write_error, nothing else
            stored_while_full = counts["ok"]
            await asyncio.sleep(1.0)  # paused: nothing more is taken or recorded
            assert int(await client.hget(keys.counts, "ok") or 0) == stored_while_full
            assert [p.poll() for p in procs] == [None, None]

            filler.unlink()

            async def reported() -> bool:
                return (output / "_status" / "full_shard.jsonl.gz").exists()

            try:
                await eventually("the shard reported once there is room", reported, 60)
            except BaseException:
                print(await stuck_state(client, keys, "full_shard", logs))
                raise
            assert subprocess.run(check, capture_output=True).returncode == 0
            assert [p.poll() for p in procs] == [None, None]
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=30) for p in procs]
            await client.aclose()
        assert codes == [0, 0]
        records = report(cfg, "full_shard")
        assert set(records) == own_names(docs)
        assert {r["status"] for r in records.values()} == {"ok"}
        for name, rec in records.items():
            data = (output / "full_shard" / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == rec["sha256"]
        assert not stale.exists()
        leftovers = [p.name for p in output.rglob(".*")]
        assert leftovers == [], leftovers
