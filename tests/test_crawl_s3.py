"""A crawl whose output is a bucket (a real SeaweedFS on loopback): objects, reports, the
already-stored check, `retry`, and the start-up errors of a bad bucket or credentials."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from crawling import TEST_REDIS_URL, crawl, crawl_config, image_doc, report, write_docs
from s3_server import BUCKET, SeaweedFS

from core import status
from core.config import Config
from core.keys import Keys
from core.storage import open_storage
from crawler.queue import WorkQueue
from crawler.shards import Shards
from testweb import ImageWeb

PATHS = {
    "/img/900x600/a.jpg": "ok",
    "/img/300x200/b.png": "ok",
    "/img/1200x900/c.webp": "ok",
    "/fault/status/404": "http_404",
    "/fault/html": "not_an_image",
}


def shard_of(web: ImageWeb, tmp_path: Path, name: str) -> tuple[Path, dict[str, str]]:
    urls = [web.url(i % 6, p) for i, p in enumerate(PATHS)]
    doc = image_doc(urls)
    names = {i["image_name"]: PATHS[p] for i, p in zip(doc["image_info"], PATHS, strict=True)}
    return write_docs(tmp_path / f"{name}.jsonl", [doc]), names


async def crawl_to(output: str, namespace: str, tmp_path: Path, path: Path) -> Config:
    """Crawl the shard at `path` into `output` (a bucket prefix); the crawl's configuration."""
    cfg = crawl_config(namespace, tmp_path)
    cfg.paths.output = output
    await crawl(cfg, [str(path)])
    return cfg


async def test_a_crawl_to_a_bucket_stores_one_whole_object_and_one_record_per_image(
    web: ImageWeb, namespace: str, tmp_path: Path, s3_output: str
) -> None:
    path, expected = shard_of(web, tmp_path, "s3_shard_0")
    cfg = await crawl_to(s3_output, namespace, tmp_path, path)
    records = report(cfg, "s3_shard_0")
    assert {n: r["status"] for n, r in records.items()} == expected
    storage = open_storage(s3_output)
    ok = {n for n, st in expected.items() if st == "ok"}
    assert storage.names_sync("s3_shard_0") == ok  # nothing else: no partial, no temporary
    for name in ok:
        data = storage.get_sync(f"s3_shard_0/{name}")
        rec = records[name]
        assert rec["path"] == f"s3_shard_0/{name}"
        assert len(data) == rec["bytes"] and hashlib.sha256(data).hexdigest() == rec["sha256"]
    summary = orjson.loads(storage.get_sync(status.summary_key("s3_shard_0")))
    assert summary["records"] == summary["total"] == len(expected)
    assert storage.names_sync(status.STATUS_DIR) == {
        "s3_shard_0.jsonl.gz", "s3_shard_0.summary.json"
    }  # fmt: skip


async def test_a_second_crawl_records_what_the_bucket_holds_without_fetching_it(
    web: ImageWeb, namespace: str, tmp_path: Path, s3_output: str
) -> None:
    path, expected = shard_of(web, tmp_path, "s3_shard_1")
    cfg = await crawl_to(s3_output, namespace, tmp_path, path)
    first = report(cfg, "s3_shard_1")
    storage = open_storage(s3_output)
    storage.delete_sync(status.report_key("s3_shard_1"))  # the reports are lost, not images
    again = crawl_config(f"{namespace}b", tmp_path)
    again.paths.output = s3_output
    try:
        await crawl(again, [str(path)])
    finally:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{namespace}b:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    second = report(again, "s3_shard_1")
    for name, st in expected.items():
        assert second[name]["status"] == st
        if st == "ok":
            assert second[name]["error"] == "already on disk"
            assert second[name]["sha256"] == first[name]["sha256"]


async def test_retry_reopens_a_report_in_the_bucket(
    web: ImageWeb, namespace: str, tmp_path: Path, s3_output: str, aredis: aioredis.Redis
) -> None:
    path, _ = shard_of(web, tmp_path, "s3_shard_2")
    cfg = await crawl_to(s3_output, namespace, tmp_path, path)
    storage = open_storage(s3_output)
    keys = Keys(namespace)
    shards = Shards(aredis, keys, WorkQueue(aredis, keys, cfg.queue), storage)
    assert await shards.reopen("s3_shard_2", {"http_404"}) == 1
    assert "s3_shard_2.jsonl.gz.superseded" in storage.names_sync(status.STATUS_DIR)
    assert not storage.exists_sync(status.report_key("s3_shard_2"))
    assert await aredis.xlen(keys.queue) >= 1


def mmc4(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MMC4_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "crawler", "--redis-url", TEST_REDIS_URL, *args],
        cwd=cwd, env=clean | env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("bucket", "secret", "says"),
    [
        ("no-such-bucket", None, "the bucket does not exist (NoSuchBucket)"),
        (None, "wrong", "the secret key does not match"),
    ],
)
def test_a_worker_refuses_to_start_on_a_bucket_it_cannot_write(
    s3_server: SeaweedFS, tmp_path: Path, bucket: str | None, secret: str | None, says: str
) -> None:
    env = s3_server.env()
    if secret:
        env["AWS_SECRET_ACCESS_KEY"] = secret
    out = f"s3://{bucket or BUCKET}/x"
    done = mmc4("--output", out, "worker", env=env, cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and out in lines[0], done.stderr
