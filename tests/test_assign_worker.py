"""The Redis-fed assignment worker, end to end against the test Redis."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from assign.solve import assign
from assign.worker import AssignWorker, run_assign_worker
from core import runtime
from core.config import Config
from core.keys import ASSIGN_GROUP, Keys

REDIS_URL = os.environ.get("MMC4_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_config(namespace: str, crawl_output: Path, **assign_settings: Any) -> Config:
    cfg = Config()
    cfg.redis.url = REDIS_URL
    cfg.redis.namespace = namespace
    cfg.paths.output = str(crawl_output)
    for key, value in assign_settings.items():
        setattr(cfg.assign, key, value)
    return cfg


def write_crawl(output: Path, shard: str, stored_every: int = 1) -> tuple[Path, Path]:
    """A shard and the crawler's status report for it, stored images under output/shard/."""
    rng = np.random.default_rng(11)
    docs, records = [], []
    for d in range(6):
        n, m = int(rng.integers(1, 5)), int(rng.integers(2, 12))
        images = [{"image_name": f"{shard}-{d}-{i}.jpg", "matched_text_index": 0} for i in range(n)]
        docs.append(
            {
                "text_list": [f"s{j}" for j in range(m)],
                "url": f"http://example.com/{d}",
                "image_info": images,
                "similarity_matrix": rng.uniform(0, 0.4, (n, m)).tolist(),
            }
        )
        for i, image in enumerate(images):
            ok = (d + i) % stored_every == 0
            records.append(
                {
                    "image_name": image["image_name"],
                    "status": "ok" if ok else "http_404",
                    "path": f"{shard}/{image['image_name']}" if ok else None,
                    "mimetype": "image/jpeg",
                    "bytes": 100,
                    "width": 10,
                    "height": 10,
                }
            )
    source = output.parent / "shards" / f"{shard}.jsonl"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    report = output / "_status" / f"{shard}.jsonl.gz"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records)))
    return source, report


async def announce(
    client: aioredis.Redis, namespace: str, shard: str, source: str, report: Path, output: Path
) -> bytes:
    fields = {"shard": shard, "source": source, "report": str(report), "output": str(output)}
    entry_id: bytes = await client.xadd(Keys(namespace).shards_done, fields)  # type: ignore[arg-type]
    return entry_id


@dataclass(frozen=True)
class Crawl:
    """A crawl's output (``tmp_path/crawl``) holding one shard and its status report
    (`write_crawl`), announced to the assignment worker as the crawler announces it."""

    output: Path
    shard: str
    source: Path
    report: Path

    @classmethod
    def of(cls, tmp_path: Path, shard: str, stored_every: int = 1) -> Crawl:
        output = tmp_path / "crawl"
        return cls(output, shard, *write_crawl(output, shard, stored_every))

    @property
    def rewritten(self) -> Path:
        return self.output / "_shards" / f"{self.shard}.jsonl"

    async def announce(
        self, client: aioredis.Redis, namespace: str, source: str | None = None
    ) -> bytes:
        """Announce the shard, its source at `source` (a URL) when given."""
        where = source or str(self.source)
        return await announce(client, namespace, self.shard, where, self.report, self.output)


async def pending_count(client: aioredis.Redis, namespace: str) -> int:
    summary: Any = await client.xpending(Keys(namespace).shards_done, ASSIGN_GROUP)
    return int(summary["pending"])


def read_docs(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_assigned(doc: dict[str, Any]) -> None:
    expected = assign(np.array(doc["similarity_matrix"], dtype=np.float64))
    assert [im["matched_text_index"] for im in doc["image_info"]] == expected


async def test_worker_rewrites_an_announced_shard_and_acknowledges_it(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard0")
    await crawl.announce(aredis, namespace)
    await run_assign_worker(make_config(namespace, crawl.output), once=True)
    docs = read_docs(crawl.rewritten)
    assert len(docs) == 6
    for doc in docs:
        assert_assigned(doc)
    assert (crawl.output / "_shards" / "shard0.report.json").is_file()
    assert await pending_count(aredis, namespace) == 0


async def test_downloaded_only_worker_keeps_stored_images_with_local_paths(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard1", stored_every=2)
    output = crawl.output
    await crawl.announce(aredis, namespace)
    cfg = make_config(namespace, output, downloaded_only=True, output=str(tmp_path / "final"))
    await run_assign_worker(cfg, once=True)
    docs = read_docs(tmp_path / "final" / "shard1.jsonl")
    assert docs
    for doc in docs:
        assert doc["image_info"]
        assert_assigned(doc)
        for image in doc["image_info"]:
            assert image["local_path"] == str(output / "shard1" / image["image_name"])
    summary = orjson.loads((tmp_path / "final" / "shard1.report.json").read_bytes())
    assert summary["dropped_images"] > 0 and summary["settings"]["downloaded_only"] is True


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[str]:
    """`path` served over HTTP on loopback; yields its URL."""

    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get(f"/{path.name}", handler)
    async with runtime.serving(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}/{path.name}"


async def test_remote_source_is_downloaded_first(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard2")
    cfg = make_config(namespace, crawl.output)
    cfg.fetch.allow_private_addresses = True  # the source is served on loopback
    async with serving(crawl.source) as url:
        await crawl.announce(aredis, namespace, url)
        await run_assign_worker(cfg, once=True)
    assert len(read_docs(crawl.rewritten)) == 6
    assert not list((crawl.output / "_shards").glob(".*.tmp"))


async def test_a_remote_source_is_downloaded_through_the_crawls_address_guard(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard4")
    cfg = make_config(namespace, crawl.output)  # loopback is not a public address: refused
    cfg.queue.max_deliveries = 1
    async with serving(crawl.source) as url:
        await crawl.announce(aredis, namespace, url)
        await run_assign_worker(cfg, once=True)
    assert not crawl.rewritten.exists()
    error = orjson.loads((crawl.output / "_shards" / "shard4.error.json").read_bytes())
    assert "127.0.0.1" in error["error"]


async def test_entry_left_pending_by_a_dead_worker_is_claimed_after_the_lease(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard3")
    cfg = make_config(namespace, crawl.output)
    cfg.queue.lease_timeout_s = 0.2
    dead = AssignWorker(cfg, aredis, consumer="dead-worker")
    await dead.ensure_group()
    await crawl.announce(aredis, namespace)
    assert await dead.next_entry(block=False) is not None  # read, then "crashes"
    await run_assign_worker(cfg, once=True)  # too early: the lease still runs
    assert not crawl.rewritten.exists()
    await asyncio.sleep(0.3)
    await run_assign_worker(cfg, once=True)
    assert len(read_docs(crawl.rewritten)) == 6
    assert await pending_count(aredis, namespace) == 0


async def test_already_complete_shard_is_acknowledged_without_rewriting(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard4")
    cfg = make_config(namespace, crawl.output)
    await crawl.announce(aredis, namespace)
    await run_assign_worker(cfg, once=True)
    mtime = crawl.rewritten.stat().st_mtime_ns
    await crawl.announce(aredis, namespace)
    await run_assign_worker(cfg, once=True)
    assert crawl.rewritten.stat().st_mtime_ns == mtime
    assert await pending_count(aredis, namespace) == 0


async def test_unusable_entries_are_acknowledged_and_failures_recorded(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    output = tmp_path / "crawl"
    _, report = write_crawl(output, "shard5")
    cfg = make_config(namespace, output)
    cfg.queue.max_deliveries = 1
    await announce(aredis, namespace, "../escape", "x.jsonl", report, output)
    await announce(aredis, namespace, "shard5", str(tmp_path / "missing.jsonl"), report, output)
    await run_assign_worker(cfg, once=True)
    assert await pending_count(aredis, namespace) == 0
    failure = json.loads((output / "_shards" / "shard5.error.json").read_text())
    assert failure["shard"] == "shard5" and "missing.jsonl" in failure["error"]
    assert not (tmp_path / "escape.jsonl").exists()


async def test_worker_stops_when_asked(tmp_path: Path, namespace: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_assign_worker(make_config(namespace, tmp_path), stop=stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_a_running_worker_passes_its_health_check_and_a_stopped_one_does_not(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    from click.testing import CliRunner

    from assign.cli import main

    cfg = make_config(namespace, tmp_path / "crawl")
    check = [
        "worker", "--check", "--set", f"redis.url={cfg.redis.url}",
        "--set", f"redis.namespace={namespace}",
    ]  # fmt: skip
    assert CliRunner().invoke(main, check).exit_code == 1  # nobody running
    stop = asyncio.Event()
    running = asyncio.create_task(run_assign_worker(cfg, stop=stop))
    try:
        for _ in range(50):
            if await aredis.keys(f"{namespace}:assign-worker:*"):
                break
            await asyncio.sleep(0.05)
        passed = await asyncio.to_thread(CliRunner().invoke, main, check)
        assert passed.exit_code == 0, passed.output
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert await aredis.keys(f"{namespace}:assign-worker:*") == []
    assert CliRunner().invoke(main, check).exit_code == 1


async def test_an_entry_naming_paths_outside_the_output_is_dropped_and_nothing_written_there(
    tmp_path: Path, namespace: str, aredis: aioredis.Redis
) -> None:
    crawl = Crawl.of(tmp_path, "shard0")
    output, source, report = crawl.output, crawl.source, crawl.report
    elsewhere = tmp_path / "elsewhere"
    foreign_report = tmp_path / "stolen" / "_status" / "shard0.jsonl.gz"
    foreign_report.parent.mkdir(parents=True)
    foreign_report.write_bytes(report.read_bytes())
    await announce(aredis, namespace, "shard0", str(source), report, elsewhere)
    await announce(aredis, namespace, "shard0", str(source), foreign_report, output)
    await run_assign_worker(make_config(namespace, output), once=True)
    assert not elsewhere.exists()
    assert not (output / "_shards").exists()
    assert await pending_count(aredis, namespace) == 0
