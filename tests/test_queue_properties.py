"""Property: whatever bytes a queue entry holds, in whatever fields, no worker process dies;
every entry leaves the queue (a record or a dead letter), and a real shard crawled after
them still completes with exactly its own images."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
from crawling import TEST_REDIS_URL, churn_flags, crawl_config, own_names, report, start_worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from core.guard import check_url
from core.keys import CRAWL_GROUP, Keys
from testweb import ImageWeb, make_docs, write_shard

SHARD = "prop_shard"
FIELD_NAMES = st.one_of(st.sampled_from([b"s", b"n", b"u"]), st.binary(max_size=6))
VALUES = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([
        SHARD.encode(), b"_status", b"..", b"../x", b"a.jpg", b".hidden", b"", b"\x00",
        b"ftp://127.0.0.2/a.jpg", b"http://[::1/x", b"http://127.0.0.2/a.jpg",
        b"http://127.0.0.2:0/a.jpg", b"HTTP://127.0.0.2/%ff", "http://127.0.0.2/é".encode(),
    ]),
)  # fmt: skip
ENTRIES = st.lists(
    st.dictionaries(FIELD_NAMES, VALUES, min_size=1, max_size=5), min_size=1, max_size=6
)


def loopback_only(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Tests send nothing beyond loopback: a fetchable URL to any other host is pointed at
    the test web instead (its name could otherwise go to a DNS resolver)."""
    url = fields.get(b"u")
    if url is None:
        return fields
    try:
        text = url.decode("utf-8")
    except UnicodeDecodeError:
        return fields
    if check_url(text) is None and not (URL(text).host or "").startswith("127."):
        return {**fields, b"u": b"http://127.0.0.2/elsewhere.jpg"}
    return fields


def test_no_queue_entry_kills_a_worker_and_a_real_shard_still_completes(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """Two worker processes take every entry hypothesis writes (40 batches of up to 6
    arbitrary entries); then they crawl a real shard to exactly its own images."""
    keys = Keys(namespace)
    cfg = crawl_config(namespace, tmp_path)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.xgroup_create(keys.queue, CRAWL_GROUP, id="0", mkstream=True)
    logs = tmp_path / "workers.log"
    args = churn_flags(namespace, TEST_REDIS_URL, cfg.paths.output)
    procs = [start_worker(args, logs) for _ in range(2)]

    def tail() -> str:
        return "\n".join(logs.read_text(errors="replace").splitlines()[-40:])

    def wait(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, f"timed out: {what}\n{tail()}"
            time.sleep(0.2)

    def settled() -> bool:
        pending = client.xpending(keys.queue, CRAWL_GROUP)["pending"]
        return client.xlen(keys.queue) == 0 and pending == 0 and not client.zcard(keys.deferred)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=ENTRIES)
    def write(batch: list[dict[bytes, bytes]]) -> None:
        for fields in batch:
            client.xadd(keys.queue, loopback_only(fields))  # type: ignore[arg-type]
        assert [p.poll() for p in procs] == [None, None], tail()

    try:
        write()
        wait("every arbitrary entry settled", settled)
        docs = make_docs(web, 10, seed=5, sizes="small", faults=0)
        shard = tmp_path / f"{SHARD}.jsonl"
        write_shard(shard, docs)
        enqueued = subprocess.run(
            [sys.executable, "-m", "crawler", *args, "enqueue", str(shard)], capture_output=True
        )
        assert enqueued.returncode == 0, enqueued.stderr.decode()
        reported = cfg.output_dir / "_status" / f"{SHARD}.jsonl.gz"
        wait("the real shard reported", reported.exists)
        assert [p.poll() for p in procs] == [None, None], tail()
        assert client.xlen(keys.dead) > 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in procs]
        client.close()
    assert codes == [0, 0], tail()
    assert set(report(cfg, SHARD)) == own_names(docs)
    log = logs.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
