"""Shard sources: remote shards over HTTP (plain, gzip, zip), a missing shard, a bad shard."""

from __future__ import annotations

import contextlib
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
from crawling import crawl, crawl_config, image_doc, own_names, report

from core import runtime, status
from core.keys import Keys
from crawler.ingest import Ingest
from crawler.sources import expand_sources
from testweb import ImageWeb, make_docs, write_shard


def shard_bytes(n: int, tag: str) -> bytes:
    docs = [image_doc([f"http://h.example/{tag}/{i}-{k}.jpg" for k in range(2)]) for i in range(n)]
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on an ephemeral loopback port; yields its base URL."""
    async with runtime.serving(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}"


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
    async with serving(app) as base:
        yield base


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


@pytest.fixture
async def hostile_server() -> AsyncIterator[str]:
    """Shards that break a limit: endless, a compressed bomb, redirects, a long line."""
    good = shard_bytes(2, "good")

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):  # far more than any test limit
                await resp.write(chunk)
        return resp

    async def bomb(request: web.Request) -> web.Response:
        body = gzip.compress(b"\n" * (8 << 20))  # 8 MiB of newlines in a few KB
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def plain(request: web.Request) -> web.Response:
        return web.Response(body=good)

    app = web.Application()
    app.router.add_get("/endless/docs_shard_0_v2.jsonl", endless)
    app.router.add_get("/bomb/docs_shard_1_v2.jsonl", bomb)
    app.router.add_get("/redirect/docs_shard_2_v2.jsonl", redirect)
    app.router.add_get("/{tail:.*}", plain)
    async with serving(app) as base:
        yield base


async def test_endless_and_compressed_bomb_downloads_stop_at_the_download_limit(
    hostile_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path, ingest={"max_download_bytes": 1 << 20})
    sources = expand_sources(
        [
            hostile_server + "/endless/docs_shard_0_v2.jsonl",
            hostile_server + "/bomb/docs_shard_1_v2.jsonl",
            hostile_server + "/ok/docs_shard_3_v2.jsonl",
        ]
    )
    ingest = Ingest(cfg, aredis)
    await ingest.run(sources)
    assert ingest.stats.shards == 1 and ingest.stats.shards_unreadable == 2
    assert (await aredis.hgetall(keys.ingest_errors))[b"download_too_large"] == b"2"
    assert await aredis.hget(keys.shard_meta("docs_shard_3_v2"), "total") == b"4"
    assert not await aredis.exists(keys.shard_meta("docs_shard_0_v2"))
    assert not list((tmp_path / "data" / "downloads").iterdir())


async def test_shard_downloads_are_held_to_the_address_guard_on_every_hop(
    hostile_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path, fetch={"allow_private_addresses": False})
    # the first hop is loopback too: a direct request and a redirect are both refused
    hop = hostile_server + "/redirect/docs_shard_2_v2.jsonl?to=http://127.0.0.1:9/x.jsonl"
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([hostile_server + "/ok/docs_shard_3_v2.jsonl", hop]))
    assert ingest.stats.shards == 0 and ingest.stats.shards_unreadable == 2
    assert (await aredis.hgetall(keys.ingest_errors))[b"unreadable_shard"] == b"2"


async def test_a_redirect_to_a_loopback_shard_is_followed_only_when_private_is_allowed(
    hostile_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    target = hostile_server + "/ok/docs_shard_3_v2.jsonl"
    hop = hostile_server + f"/redirect/docs_shard_2_v2.jsonl?to={target}"
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([hop]))
    assert await aredis.hget(keys.shard_meta("docs_shard_2_v2"), "total") == b"4"


async def test_the_shard_id_of_a_url_comes_from_its_path_not_its_query(
    hostile_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    url = hostile_server + "/ok/docs_shard_7_v2.jsonl.gz?x=/../escaped#/../y"
    (source,) = expand_sources([url])
    assert source.shard == "docs_shard_7_v2"
    ingest = Ingest(cfg, aredis)
    await ingest.run([source])
    # served as plain JSON lines under a .gz name: unreadable, and named by its path
    assert ingest.stats.unreadable[0].startswith("docs_shard_7_v2:")
    assert not await aredis.exists(keys.shard_meta("escaped"))


def test_a_long_shard_id_is_refused() -> None:
    from core.shardfiles import check_shard_id

    assert check_shard_id("docs_shard_" + "9" * 300) is not None
    assert check_shard_id("docs_shard_" + "9" * 150) is None


async def test_a_line_over_the_limit_is_skipped_and_counted_and_the_rest_is_ingested(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path, ingest={"max_line_bytes": 4096})
    long_doc = image_doc([f"http://h.example/long/{'x' * 5000}.jpg"])
    shard = tmp_path / "docs_shard_8_v2.jsonl"
    shard.write_bytes(shard_bytes(1, "a") + orjson.dumps(long_doc) + b"\n" + shard_bytes(1, "b"))
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([str(shard)]))
    assert ingest.stats.lines == 3 and ingest.stats.bad_lines == 1
    meta = await aredis.hgetall(keys.shard_meta("docs_shard_8_v2"))
    assert meta[b"total"] == b"4" and meta[b"bad_lines"] == b"1" and meta[b"lines"] == b"3"
    assert (await aredis.hgetall(keys.ingest_errors))[b"line_too_long"] == b"1"


async def test_a_shard_over_the_decompressed_limit_ends_there_and_completes_as_unreadable(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path, ingest={"max_shard_bytes": 64 << 10})
    shard = tmp_path / "docs_shard_9_v2.jsonl.gz"
    shard.write_bytes(gzip.compress(shard_bytes(2000, "big")))
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([str(shard)]))
    assert ingest.stats.shards_unreadable == 1
    meta = await aredis.hgetall(keys.shard_meta("docs_shard_9_v2"))
    assert 0 < int(meta[b"total"]) < 4000 and b"shard_too_large" in meta[b"unreadable"]
    assert await aredis.xlen(keys.queue) == int(meta[b"total"])
    assert (await aredis.hgetall(keys.ingest_errors))[b"shard_too_large"] == b"1"


async def test_a_truncated_shard_is_crawled_as_far_as_it_reads_and_completes_as_unreadable(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    web.reset_flaky()
    docs = make_docs(web, 60, seed=5, sizes="small", images_per_doc=(1, 2))
    cut = tmp_path / "docs_shard_20_v2.jsonl.gz"
    write_shard(cut, docs[:50])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    whole = tmp_path / "docs_shard_21_v2.jsonl"
    docs[50]["could_have_url_duplicate"] = 1  # crawled (the default), and counted
    write_shard(whole, docs[50:])
    cfg = crawl_config(namespace, tmp_path)
    await crawl(cfg, [str(cut), str(whole)])  # ends: no shard is left waiting
    for shard, damaged in (("docs_shard_20_v2", True), ("docs_shard_21_v2", False)):
        summary = orjson.loads(status.ReportPaths(cfg.output_dir, shard).summary.read_bytes())
        records = report(cfg, shard)
        assert summary["records"] == summary["total"] == len(records) > 0
        assert bool(summary["unreadable"]) is damaged
    assert len(report(cfg, "docs_shard_20_v2")) < len(own_names(docs[:50]))
    assert len(report(cfg, "docs_shard_21_v2")) == len(own_names(docs[50:]))
    summary = orjson.loads(
        status.ReportPaths(cfg.output_dir, "docs_shard_21_v2").summary.read_bytes()
    )
    assert summary["flagged_duplicates"] == 1 and summary["skipped_duplicates"] == 0


async def test_remote_shards_without_a_writable_data_dir_are_unreadable_not_a_crash(
    shard_server: str, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "data").write_text("a file where the data directory should be")
    cfg = crawl_config(namespace, tmp_path)
    local = tmp_path / "docs_shard_5_v2.jsonl"
    local.write_bytes(shard_bytes(2, "local"))
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([shard_server + "/docs_shard_0_v2.jsonl", str(local)]))
    assert ingest.stats.shards_unreadable == 1 and ingest.stats.shards == 1
    assert "paths.data_dir" in ingest.stats.unreadable[0]


async def test_a_shard_url_that_does_not_parse_is_unreadable_not_a_crash(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    cfg = crawl_config(namespace, tmp_path)
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources(["http://[::1/docs_shard_0_v2.jsonl"]))
    assert ingest.stats.shards_unreadable == 1
    assert ingest.stats.unreadable[0].startswith("docs_shard_0_v2:")


async def test_a_shard_whose_ingest_lock_another_process_holds_is_skipped_and_ours_is_released(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    for name in ("held", "free"):
        (tmp_path / f"{name}.jsonl").write_bytes(shard_bytes(2, name))
    held = aredis.lock(keys.shard_ingest_lock("held"), timeout=60, blocking=False)
    assert await held.acquire()
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([str(tmp_path / "held.jsonl"), str(tmp_path / "free.jsonl")]))
    assert ingest.stats.shards == 1 and ingest.stats.shards_skipped == 1
    assert await aredis.hget(keys.shard_meta("held"), "total") is None
    assert await aredis.hget(keys.shard_meta("free"), "total") == b"4"
    assert await aredis.exists(keys.shard_ingest_lock("free")) == 0  # released after ingest
    assert await held.owned()  # the other holder's lock is untouched
