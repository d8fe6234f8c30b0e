"""The queue: leases, reclaim, dead letters, exactly-one records, backpressure, resume, retry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from crawling import crawl, crawl_config, image_doc, report, until, within, write_docs

from core import status
from core.config import Config
from core.keys import CRAWL_GROUP, Keys
from core.storage import output_storage
from crawler.entries import encode_result
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.shards import Shards
from crawler.sources import expand_sources
from testweb import ImageWeb


def short_leases(cfg: Config, lease_s: float) -> Config:
    """Leases shorter than a configuration may set (at least 1 s): these tests drive a
    WorkQueue directly and wait out leases many times."""
    cfg.queue.lease_timeout_s = lease_s
    return cfg


async def queue_of_one(aredis: aioredis.Redis, keys: Keys, cfg: Config) -> WorkQueue:
    """A WorkQueue of shard "s" holding one item, a.jpg."""
    q = WorkQueue(aredis, keys, cfg.queue)
    await q.ensure_group()
    pipe = aredis.pipeline()
    await q.add_to(pipe, "s", [("a.jpg", "http://h.example/a.jpg")])
    await pipe.execute()
    return q


async def test_an_unacknowledged_item_is_reclaimed_after_its_lease_expires(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    cfg = short_leases(crawl_config(namespace, tmp_path), 1.0)  # a stall of the test < 1 s
    q = await queue_of_one(aredis, Keys(namespace), cfg)
    await q.read("dead-worker", 10, 10)
    assert await q.reclaim("other", 10) == ([], 0)  # lease still fresh
    await asyncio.sleep(1.1)
    claimed, buried = await q.reclaim("other", 10)
    assert [c.name for c in claimed] == ["a.jpg"] and buried == 0
    pending = await aredis.xpending_range(Keys(namespace).queue, CRAWL_GROUP, "-", "+", 10)
    assert pending[0]["consumer"] == b"other" and pending[0]["times_delivered"] == 2


async def test_items_enqueued_in_batches_read_back_in_order(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    cfg = crawl_config(namespace, tmp_path)
    q = WorkQueue(aredis, Keys(namespace), cfg.queue)
    await q.ensure_group()
    items = [(f"{i}.jpg", f"http://h.example/{i}.jpg?q=é&x={i}") for i in range(1500)]
    pipe = aredis.pipeline(transaction=True)
    await q.add_to(pipe, "s", items[:1000])
    await q.add_to(pipe, "s", [])  # nothing: no call
    await q.add_to(pipe, "s", items[1000:1001])
    await q.add_to(pipe, "s", items[1001:])
    await pipe.execute()
    read = await q.read("w", 2000, 10)
    assert [(i.shard, i.name, i.url) for i in read] == [("s", n, u) for n, u in items]


async def test_renewed_leases_are_not_reclaimed(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    cfg = short_leases(crawl_config(namespace, tmp_path), 1.5)
    q = await queue_of_one(aredis, Keys(namespace), cfg)
    (item,) = await q.read("busy-worker", 10, 10)
    for _ in range(4):  # 2 s in all, renewed every 0.5 s: a stall of the test < 1 s
        await asyncio.sleep(0.5)
        await q.renew("busy-worker", [item.id])
    assert await q.reclaim("other", 10) == ([], 0)


async def test_an_item_delivered_too_often_becomes_a_dead_letter_with_a_reason(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = short_leases(crawl_config(namespace, tmp_path, queue={"max_deliveries": 3}), 0.05)
    q = await queue_of_one(aredis, keys, cfg)
    await q.seal("s", 1)
    (item,) = await q.read("w1", 10, 10)
    await q.note_error(item.id, "ValueError: decoder crashed")
    for _ in range(2):  # deliveries 2 and 3
        await asyncio.sleep(0.1)
        claimed, buried = await q.reclaim("w2", 10)
        assert len(claimed) == 1 and buried == 0
    await asyncio.sleep(0.1)
    claimed, buried = await q.reclaim("w2", 10)
    assert claimed == [] and buried == 1
    rec = msgspec.structs.asdict(status.decode(await aredis.hget(keys.shard_records("s"), "a.jpg")))
    assert rec["status"] == "dead_letter"
    assert "3 deliveries" in rec["error"] and "decoder crashed" in rec["error"]
    assert await aredis.xlen(keys.dead) == 1
    assert await aredis.xlen(keys.queue) == 0
    assert await aredis.sismember(keys.shards_complete, "s")


async def test_a_second_result_for_the_same_image_is_ignored(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    q = WorkQueue(aredis, keys, cfg.queue)
    await q.ensure_group()
    pipe = aredis.pipeline()
    await q.add_to(pipe, "s", [("a.jpg", "http://h/a")])
    await pipe.execute()
    assert not await q.seal("s", 1)
    (item,) = await q.read("w1", 10, 10)
    first = status.make_record("a.jpg", "http://h/a", "ok", bytes=10)
    second = status.make_record("a.jpg", "http://h/a", "timeout")
    assert await q.record([encode_result(item.id, "s", "a.jpg", first)]) == ["s"]
    assert await q.record([encode_result(item.id, "s", "a.jpg", second)]) == []
    assert status.decode(await aredis.hget(keys.shard_records("s"), "a.jpg")).status == "ok"
    assert await aredis.hget(keys.shard_meta("s"), "done") == b"1"
    assert await aredis.hget(keys.counts, "timeout") is None


async def test_a_result_for_an_image_not_of_its_shard_leaves_a_dead_letter_unless_it_is_one(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    """A stray's result is not recorded: it leaves a dead-letter entry naming it, except a
    dead_letter result, whose caller writes that entry itself (one entry, never two)."""
    keys = Keys(namespace)
    q = WorkQueue(aredis, keys, crawl_config(namespace, tmp_path).queue)
    await q.ensure_group()
    for name in ("a.jpg", "b.jpg"):
        await aredis.xadd(keys.queue, {"s": "nowhere", "n": name, "u": f"http://h/{name}"})
    ((_, entries),) = await aredis.xreadgroup(CRAWL_GROUP, "w1", {keys.queue: ">"}, count=10)
    (a_id, _), (b_id, _) = entries
    ok = status.make_record("a.jpg", "http://h/a.jpg", status.OK, bytes=10)
    dead = status.make_record("b.jpg", "http://h/b.jpg", status.DEAD_LETTER, error="3 deliveries")
    await q.record([
        encode_result(a_id.decode(), "nowhere", "a.jpg", ok),
        encode_result(b_id.decode(), "nowhere", "b.jpg", dead),
    ])  # fmt: skip
    ((_, fields),) = await aredis.xrange(keys.dead)
    assert fields[b"n"] == b"a.jpg" and b"not an image of this shard" in fields[b"reason"]
    assert b"its result: ok" in fields[b"reason"]
    assert await aredis.xlen(keys.queue) == 0
    assert await aredis.exists(keys.shard_records("nowhere")) == 0


async def test_ingest_waits_while_the_queue_is_full(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    urls = [f"http://h{i % 7}.example/{i}.jpg" for i in range(200)]
    shard = write_docs(
        tmp_path / "bp.jsonl", [image_doc(urls[i : i + 4]) for i in range(0, 200, 4)]
    )
    cfg = crawl_config(namespace, tmp_path, ingest={"max_queue_depth": 30, "batch_size": 8})
    ingest = Ingest(cfg, aredis)
    task = asyncio.create_task(ingest.run(expand_sources([str(shard)])))
    await within(60, until(lambda: aredis.xlen(keys.queue), lambda n: n >= 30))
    await asyncio.sleep(0.3)  # room for a batch too many, were ingest to add one
    assert not task.done()
    assert 30 <= await aredis.xlen(keys.queue) < 30 + 8
    peak, drained = 0, 0
    while not task.done():  # act as the workers: take everything now and then
        await asyncio.sleep(0.1)
        taken = await take_all(aredis, keys)
        peak = max(peak, taken)
        drained += taken
    drained += await take_all(aredis, keys)
    assert peak < 30 + 8
    assert ingest.stats.items == drained == 200


async def take_all(aredis: aioredis.Redis, keys: Keys) -> int:
    """Empty the queue in one step, as the workers would take it: how many it held (a
    length read apart from the trim could miss a batch that ingest adds in between)."""
    return int(await aredis.xtrim(keys.queue, maxlen=0, approximate=False))


async def test_ingest_resumes_after_the_last_enqueued_batch(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    docs = [image_doc([f"http://h.example/{i}-{k}.jpg" for k in range(2)]) for i in range(20)]
    docs[3]["image_info"][1]["image_name"] = docs[0]["image_info"][0]["image_name"]  # duplicate
    shard = write_docs(tmp_path / "resume.jsonl", docs)
    cfg = crawl_config(namespace, tmp_path, ingest={"batch_size": 6})
    await aredis.hset(keys.shard_meta("resume"), "ingest_line", 9)  # as if killed after line 9
    ingest = Ingest(cfg, aredis)
    await ingest.run(expand_sources([str(shard)]))
    entries = await aredis.xrange(keys.queue)
    names = {e[1][b"n"].decode() for e in entries}
    fresh = {i["image_name"] for d in docs[9:] for i in d["image_info"]}
    assert names == fresh and len(entries) == 22
    meta = await aredis.hgetall(keys.shard_meta("resume"))
    assert meta[b"total"] == b"39"  # 40 images, one duplicate name


async def test_a_rerun_fetches_nothing_again(web: ImageWeb, namespace: str, tmp_path: Path) -> None:
    tag = namespace
    urls = [web.url(i % 3, f"/img/120x90/{tag}-{i}.png") for i in range(8)]
    urls.append(web.url(0, f"/fault/status/404/{tag}"))
    shard = write_docs(tmp_path / "again.jsonl", [image_doc(urls)])
    cfg = crawl_config(namespace, tmp_path)
    await crawl(cfg, [str(shard)])
    first = report(cfg, "again")
    hits = len([a for a in web.arrivals if tag in a.path])
    assert hits == 9
    await crawl(cfg, [str(shard)])  # the report exists: the shard is skipped
    assert len([a for a in web.arrivals if tag in a.path]) == hits
    # lose the report and Redis state but keep the files: only the 404 is fetched again
    (cfg.output_dir / "_status" / "again.jsonl.gz").unlink()
    await crawl(cfg, [str(shard)])
    assert len([a for a in web.arrivals if tag in a.path]) == hits + 1
    second = report(cfg, "again")
    assert {n: r["sha256"] for n, r in second.items()} == {n: r["sha256"] for n, r in first.items()}
    assert sum(r["error"] == "already on disk" for r in second.values()) == 8


async def test_retry_requeues_chosen_statuses_of_a_reported_shard(
    web: ImageWeb, aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    tag = namespace
    web.reset_flaky()
    urls = [
        web.url(1, f"/fault/flaky/1/{tag}/100x100/f.jpg?status=404"),
        web.url(1, f"/img/100x100/{tag}-fine.jpg"),
    ]
    shard = write_docs(tmp_path / "rt.jsonl", [image_doc(urls)])
    cfg = crawl_config(namespace, tmp_path)
    await crawl(cfg, [str(shard)])
    assert sorted(r["status"] for r in report(cfg, "rt").values()) == ["http_404", "ok"]
    keys = Keys(namespace)
    shards = Shards(aredis, keys, WorkQueue(aredis, keys, cfg.queue), output_storage(cfg))
    assert await shards.reopen("rt", {"http_404"}) == 1
    assert not (cfg.output_dir / "_status" / "rt.jsonl.gz").exists()
    await crawl(cfg, [str(shard)])
    assert sorted(r["status"] for r in report(cfg, "rt").values()) == ["ok", "ok"]
    counts = await aredis.hgetall(keys.counts)
    assert counts[b"ok"] == b"2" and counts.get(b"http_404", b"0") == b"0"


async def test_deferred_items_come_back_by_redis_time_whatever_the_workers_clock(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock runs an hour ahead defers an item for 1 s: it is back in the
    queue after 1 s of Redis time, not after an hour."""
    import time as real_time

    monkeypatch.setattr("crawler.queue.time.time", lambda: real_time.monotonic() + 1e9)
    keys = Keys(namespace)
    q = await queue_of_one(aredis, keys, crawl_config(namespace, tmp_path))
    [item] = await q.read("w", 10, 10)
    await q.defer([item], 1.0)
    assert await aredis.xlen(keys.queue) == 0 and await aredis.zcard(keys.deferred) == 1
    assert (await aredis.xpending(keys.queue, CRAWL_GROUP))["pending"] == 0
    assert await q.promote() == 0  # not due yet
    await asyncio.sleep(1.1)
    assert await q.promote() == 1
    [back] = await q.read("w", 10, 10)
    assert (back.shard, back.name, back.url) == ("s", "a.jpg", "http://h.example/a.jpg")


async def test_a_shard_enqueued_without_placeholders_still_completes_by_count(
    aredis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    """A shard in flight from before placeholders (meta without `pending`): its items are
    taken, recorded once each, and it completes when done reaches total."""
    keys = Keys(namespace)
    q = WorkQueue(aredis, keys, crawl_config(namespace, tmp_path).queue)
    await q.ensure_group()
    await aredis.hset(keys.shard_meta("old"), mapping={"source": "old.jsonl", "total": 2})
    for name in ("a.jpg", "b.jpg"):
        await aredis.xadd(keys.queue, {"s": "old", "n": name, "u": f"http://h.example/{name}"})
    items = await q.read("w", 10, 10)
    assert [i.name for i in items] == ["a.jpg", "b.jpg"]
    results = [
        encode_result(i.id, "old", i.name, status.make_record(i.name, i.url, "ok")) for i in items
    ]
    assert await q.record(results[:1]) == []
    assert await q.record(results) == ["old"]  # a.jpg's second result is not counted
    assert await aredis.hget(keys.shard_meta("old"), "done") == b"2"
    assert await aredis.xlen(keys.dead) == 0
