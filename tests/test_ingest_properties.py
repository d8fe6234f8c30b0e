"""Property: whatever a shard holds (arbitrary bytes, arbitrary JSON, hostile names and URLs,
any file name), ingest never raises, writes nothing outside OUTPUT, and counts every line.

Each example runs the real ingest against the real Redis, in a namespace of its own, then
writes the reports of the shards it completed (only ingest-time records: no crawl).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from crawling import TEST_REDIS_URL, crawl_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.keys import Keys
from core.shardfiles import check_shard_id
from core.storage import output_storage
from crawler.ingest import Ingest, IngestStats
from crawler.queue import WorkQueue
from crawler.shards import Shards
from crawler.sources import expand_sources

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
hostile_names = st.sampled_from(
    ["../../escaped.png", "/etc/passwd", "..", ".", "_status", "a\x00b", "a/b", "\\x", "", "ok.jpg"]
)
hostile_urls = st.sampled_from(
    ["http://[::1/x.jpg", "ftp://h/x", "http://", "javascript:x", "http://h.example/\x00",
     "http://2130706433/x.jpg", "http://h.example/ok.jpg", "x" * 5000]
)  # fmt: skip
names = hostile_names | st.text(max_size=40) | json_values
urls = hostile_urls | st.text(max_size=60) | json_values
image_info = st.lists(
    st.dictionaries(st.sampled_from(["image_name", "raw_url", "matched_sim"]), names | urls)
    | st.fixed_dictionaries({"image_name": names, "raw_url": urls})
    | json_values,
    max_size=5,
)
documents = st.fixed_dictionaries(
    {"image_info": image_info | json_values},
    optional={"could_have_url_duplicate": json_values, "text_list": json_values},
).map(orjson.dumps)
raw_lines = st.binary(max_size=120)
json_lines = json_values.map(orjson.dumps)
lines = st.lists(documents | json_lines | raw_lines, max_size=12)
file_names = st.text(
    st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1
).filter(lambda n: 0 < len(n.encode()) < 200 and n not in (".", ".."))


def usable(line: bytes) -> bool:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("image_info"), list)


def every_file(root: Path) -> list[Path]:
    return [Path(d) / f for d, _dirs, files in os.walk(root) for f in files]


async def ingest_and_report(cfg: Any, shard: Path) -> tuple[IngestStats, int]:
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    keys = Keys(cfg.redis.namespace)
    try:
        ingest = Ingest(cfg, client)
        await ingest.run(expand_sources([str(shard)]))
        queue = WorkQueue(client, keys, cfg.queue)
        await Shards(client, keys, queue, output_storage(cfg)).finalize_all()
        return ingest.stats, int(await client.xlen(keys.queue))
    finally:
        stale = [k async for k in client.scan_iter(match=f"{keys.ns}:*", count=1000)]
        if stale:
            await client.delete(*stale)
        await client.aclose()


def run_example(tmp_root: Path, name: str, body: bytes) -> tuple[IngestStats, int, Path]:
    box = tmp_root / uuid.uuid4().hex
    (box / "shards").mkdir(parents=True)
    shard = box / "shards" / name
    shard.write_bytes(body)
    cfg = crawl_config(f"p{uuid.uuid4().hex[:10]}", box)
    stats, queued = asyncio.run(ingest_and_report(cfg, shard))
    # nothing but reports under OUTPUT, nothing beside the box or under data/ (downloads)
    outside = [
        p
        for p in every_file(tmp_root)
        if not p.is_relative_to(box / "out") and p.parent != shard.parent
    ]
    assert outside == []
    return stats, queued, box


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines, name=file_names)
@example(lines=[b"{}"], name="0\\")  # a backslash in a file name is not an escape
@example(lines=[b"{}"], name="a{b,c}")  # nor is a brace pair in a name that exists
def test_any_shard_lines_are_counted_never_raise_and_write_only_under_output(
    tmp_path_factory: Any, lines: list[bytes], name: str
) -> None:
    body = b"\n".join(lines) + b"\n"
    stats, queued, _box = run_example(tmp_path_factory.mktemp("p"), name + ".jsonl", body)
    shard_id_ok = stats.shards == 1
    if not shard_id_ok:  # a file name that cannot be a shard id: refused before reading
        assert stats.lines == 0 and stats.shards_unreadable == 1
        return
    non_blank = [line.strip() for line in body.split(b"\n") if line.strip()]
    assert stats.lines == len(non_blank)
    assert stats.bad_lines == sum(1 for line in non_blank if not usable(line))
    assert stats.items == queued


containers = st.sampled_from([".jsonl", ".jsonl.gz", ".jsonl.zip"])


def packed(kind: str, body: bytes) -> bytes:
    if kind == ".jsonl.gz":
        return gzip.compress(body)
    if kind == ".jsonl.zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("x.jsonl", body)
        return out.getvalue()
    return body


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=containers,
    body=st.binary(max_size=400),
    cut=st.integers(0, 400),
    flip=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=4),
)
def test_any_bytes_in_a_gzip_or_zip_shard_are_read_or_counted_unreadable_never_raise(
    tmp_path_factory: Any, kind: str, body: bytes, cut: int, flip: list[tuple[int, int]]
) -> None:
    data = bytearray(packed(kind, body))
    for pos, value in flip:  # damage: corrupt bytes, then maybe truncate
        if pos < len(data):
            data[pos] = value
    data = data[: max(cut, len(data) // 2)] if cut < len(data) else data
    stats, queued, _box = run_example(
        tmp_path_factory.mktemp("c"), "docs_shard_1_v2" + kind, bytes(data)
    )
    assert stats.shards + stats.shards_unreadable == 1
    assert stats.items == queued
    assert stats.bad_lines <= stats.lines


@settings(max_examples=300, deadline=None)
@given(
    location=st.text(max_size=80)
    | st.text(max_size=60).map(lambda t: "http://" + t)
    | st.sampled_from(["http://[::1/x.jsonl", "https://h/a.jsonl?x=/../y#/../z", "http://h/{"])
)
def test_any_shard_location_expands_without_raising_to_a_usable_or_refused_shard_id(
    location: str,
) -> None:
    for source in expand_sources([location]):
        problem = check_shard_id(source.shard)
        assert problem is not None or ("/" not in source.shard and source.shard not in ("", ".."))
