"""Shard sources: remote shards over HTTP (plain, gzip, zip), a missing shard, a bad shard."""

from __future__ import annotations

import gzip
import io
import socket
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from crawling import crawl_config, image_doc

from crawler.ingest import Ingest, expand_sources
from crawler.keys import Keys


def shard_bytes(n: int, tag: str) -> bytes:
    docs = [image_doc([f"http://h.example/{tag}/{i}-{k}.jpg" for k in range(2)]) for i in range(n)]
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


@pytest.fixture
async def shard_server() -> AsyncIterator[str]:
    plain = shard_bytes(3, "plain")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("inner.jsonl", shard_bytes(4, "zip"))
    files = {
        "/docs_shard_0_v2.jsonl": plain,
        "/docs_shard_1_v2.jsonl.gz": gzip.compress(shard_bytes(5, "gz")),
        "/docs_shard_2_v2.jsonl.zip": zipped.getvalue(),
        "/docs_shard_4_v2.jsonl.zip": b"this is not a zip archive",
    }

    async def handler(request: web.Request) -> web.Response:
        body = files.get(request.path)
        return web.Response(body=body) if body is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_remote_shards_are_streamed_and_a_missing_one_is_recorded_and_skipped(
    shard_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    sources = expand_sources([shard_server + "/docs_shard_{0..4}_v2.jsonl"]) + expand_sources(
        [
            shard_server + "/docs_shard_1_v2.jsonl.gz",
            shard_server + "/docs_shard_{2,4}_v2.jsonl.zip",
        ]
    )
    ingest = Ingest(cfg, aredis)
    await ingest.run(sources)
    totals = {
        shard: await aredis.hget(keys.shard_meta(shard), "total")
        for shard in ("docs_shard_0_v2", "docs_shard_1_v2", "docs_shard_2_v2")
    }
    assert totals == {"docs_shard_0_v2": b"6", "docs_shard_1_v2": b"10", "docs_shard_2_v2": b"8"}
    # shards 1-4 as .jsonl do not exist (404); shard 4's zip is not a zip
    assert ingest.stats.shards == 3 and ingest.stats.shards_missing == 4
    errors = await aredis.hgetall(keys.ingest_errors)
    assert errors[b"missing_shard"] == b"4" and errors[b"unreadable_shard"] == b"1"
    assert await aredis.xlen(keys.queue) == 24
    assert not list((tmp_path / "data" / "downloads").iterdir())  # temporary copies removed


async def test_a_shard_whose_download_fails_is_recorded_as_unreadable_and_skipped(
    shard_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    with socket.socket() as closed:  # a port that refuses connections
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    sources = expand_sources(
        [refused + "/docs_shard_0_v2.jsonl", shard_server + "/docs_shard_0_v2.jsonl"]
    )
    ingest = Ingest(cfg, aredis)
    await ingest.run(sources)
    assert ingest.stats.shards == 1
    assert (await aredis.hgetall(keys.ingest_errors))[b"unreadable_shard"] == b"1"
    assert await aredis.xlen(keys.queue) == 6
