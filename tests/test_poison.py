"""Poison on the queue: entries no ingest would write (bad URLs, bytes that are not UTF-8,
missing fields, names and shard ids that are paths, strays in a real shard), written with
XADD while real worker processes crawl. Each gets a terminal record or a dead-letter entry
naming why; no worker dies; every shard completes with exactly its own images."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from crawling import (
    TEST_REDIS_URL,
    churn_flags,
    crawl_config,
    own_names,
    report,
    start_worker,
    stuck_state,
    write_shards,
)
from yarl import URL

from core.keys import CRAWL_GROUP, Keys
from crawler.entries import Item, Poison, parse_entry
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.sources import expand_sources
from testweb import ImageWeb

# (fields, what the dead-letter entry's reason says)
POISON: list[tuple[dict[bytes, bytes], str]] = [
    ({b"s": b"poisonC", b"n": b"v6.jpg", b"u": b"http://[::1/x.jpg"}, "raw_url does not parse"),
    ({b"s": b"SHARD0", b"n": b"\x80\x81.jpg", b"u": b"http://127.0.0.2/a.jpg"}, "'n' is not UTF-8"),
    ({b"s": b"SHARD1", b"n": b"u.jpg", b"u": b"http://127.0.0.2/\xff\xfe"}, "'u' is not UTF-8"),
    ({b"s": b"\xc3\x28", b"n": b"a.jpg", b"u": b"http://127.0.0.2/a.jpg"}, "'s' is not UTF-8"),
    ({b"s": b"SHARD0", b"n": b"m.jpg"}, "'u' is missing"),
    ({b"x": b"y"}, "'s' is missing"),
    ({b"s": b"SHARD0", b"n": b"../../escaped.png", b"u": b"http://127.0.0.2/a"}, "bad_name"),
    ({b"s": b"../../escaped_dir", b"n": b"a.jpg", b"u": b"http://127.0.0.2/a"}, "shard id"),
    ({b"s": b"_status", b"n": b"SHARD0.jsonl.gz", b"u": b"http://127.0.0.2/a"}, "shard id"),
    ({b"s": b"SHARD1", b"n": b"intruder.jpg", b"u": b"URL"}, "not an image of shard"),
    ({b"s": b"no_such_shard", b"n": b"a.jpg", b"u": b"URL"}, "not an image of shard"),
    # its shard's records key is not a hash (the test makes it a string)
    ({b"s": b"wrongtype_shard", b"n": b"a.jpg", b"u": b"URL"}, "cannot be read: WRONGTYPE"),
]


async def test_poison_entries_end_as_records_or_dead_letters_and_every_shard_has_its_own_images(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path, queue={"lease_timeout_s": 1.0, "max_deliveries": 3})
    shards = [f"poison_shard_{i}" for i in range(2)]
    docs, paths = write_shards(web, tmp_path, shards, 12, seed=31, faults=0)
    good_url = docs[shards[0]][0]["image_info"][0]["raw_url"].encode()
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    queue = WorkQueue(client, keys, cfg.queue)
    logs = tmp_path / "workers.log"
    procs = []
    try:
        await queue.ensure_group()
        await Ingest(cfg, client).run(expand_sources([paths[0]]))
        await client.set(keys.shard_records("wrongtype_shard"), "not a hash")
        ids = []
        for fields, _why in POISON:
            real = {
                k: v.replace(b"SHARD0", shards[0].encode())
                .replace(b"SHARD1", shards[1].encode())
                .replace(b"URL", good_url)
                for k, v in fields.items()
            }
            ids.append((await client.xadd(keys.queue, real)).decode())
        # an own image with a URL ingest would have refused: it reaches a worker
        pipe = client.pipeline(transaction=True)
        await queue.add_to(pipe, "ftp_shard", [("f.jpg", "ftp://127.0.0.2/f.jpg")])
        await pipe.execute()
        await queue.seal("ftp_shard", 1)
        # poison already leased by a worker that died: the reclaim path, and the dead-letter
        # path for one delivered max_deliveries times
        for n, retries in ((b"\xfe-reclaimed.jpg", 1), (b"\xfe-buried.jpg", 5)):
            bad = {b"s": shards[0].encode(), b"n": n, b"u": b"http://127.0.0.2/x"}
            entry_id = (await client.xadd(keys.queue, bad)).decode()
            await client.xreadgroup(CRAWL_GROUP, "ghost", {keys.queue: ">"}, count=100)
            await client.xclaim(keys.queue, CRAWL_GROUP, "ghost", 0, [entry_id], retrycount=retries)
            ids.append(entry_id)
        await Ingest(cfg, client).run(expand_sources([paths[1]]))

        args = churn_flags(namespace, TEST_REDIS_URL, cfg.paths.output, queue__max_deliveries=3)
        procs = [start_worker(args, logs) for _ in range(2)]
        await wait_reported(client, keys, cfg.output_dir, [*shards, "ftp_shard"], logs)
        assert [p.poll() for p in procs] == [None, None], "a worker exited"
        assert await client.xlen(keys.queue) == 0
        reasons = [e[1][b"reason"].decode() for e in await client.xrange(keys.dead, "-", "+")]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
        await client.aclose()
    assert codes == [0] * len(procs)

    for shard in shards:
        assert set(report(cfg, shard)) == own_names(docs[shard])
        assert {r["status"] for r in report(cfg, shard).values()} == {"ok"}
    (ftp,) = report(cfg, "ftp_shard").values()
    assert ftp["status"] == "bad_url" and "scheme" in ftp["error"]
    for _fields, why in POISON:
        assert any(why in r for r in reasons), f"no dead letter says {why!r}: {reasons}"
    assert sum("'n' is not UTF-8" in r for r in reasons) == 3  # XADDed, reclaimed, buried
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "escaped_dir").exists()
    assert sorted(p.name for p in (cfg.output_dir / "_status").iterdir()) == sorted(
        f"{s}.{kind}" for s in [*shards, "ftp_shard"] for kind in ("jsonl.gz", "summary.json")
    )


async def wait_reported(
    client: aioredis.Redis, keys: Keys, output: Path, shards: list[str], logs: Path
) -> None:
    """Until every shard's report is written and nothing is queued, leased or complete."""
    deadline = time.monotonic() + 180  # a bound for a hang, not for a busy machine
    while time.monotonic() < deadline:
        reported = all((output / "_status" / f"{s}.jsonl.gz").exists() for s in shards)
        settled = reported and not await client.xlen(keys.queue)
        if settled and not await client.scard(keys.shards_complete):
            return
        await asyncio.sleep(0.2)
    pytest.fail("not every shard was reported\n" + await stuck_state(client, keys, shards[0], logs))


def test_an_entry_carries_its_url_parsed_and_a_malformed_url_becomes_a_bad_url_record() -> None:
    """The URL is parsed once, when the entry is read: the worker's host and the fetcher's
    request both come from `Item.target`."""
    url = "http://Example.com:8080/a%20b/c.jpg?x=1"
    item = parse_entry("1-0", {b"s": b"sh", b"n": b"img.jpg", b"u": url.encode()})
    assert isinstance(item, Item)
    assert item.target == URL(url) and item.target.host == "example.com"
    bad = parse_entry("1-1", {b"s": b"sh", b"n": b"img.jpg", b"u": b"ftp://example.com/x.jpg"})
    assert isinstance(bad, Poison) and bad.status == "bad_url"
