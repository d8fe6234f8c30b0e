"""The `enqueue` command as an operator runs it: signals while it waits, Redis outages,
broken and missing shards, exit codes and the summary it prints."""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import orjson
import pytest
import redis
from crawling import TEST_REDIS_URL, first_bytes, image_doc, signalled_after
from redis_server import RedisProcess, free_port

from core.exitcodes import ExitCode
from core.keys import Keys

# Far beyond the second or two a stop takes: only a process that ignores the signal fails.
STOP_BOUND_S = 10.0


def write_shard(path: Path, n_docs: int, tag: str = "a") -> list[str]:
    """One image per document; returns the image names in order."""
    urls = [f"http://h.example/{tag}/{i}.jpg" for i in range(n_docs)]
    names = [f"{tag}{i:05d}.jpg" for i in range(n_docs)]
    body = b"".join(
        orjson.dumps(image_doc([u], [n])) + b"\n" for u, n in zip(urls, names, strict=True)
    )
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return names


def enqueue_args(
    namespace: str, tmp_path: Path, *extra: str, url: str = TEST_REDIS_URL
) -> list[str]:
    return [
        sys.executable, "-m", "crawler", "--redis-url", url,
        "--set", f"redis.namespace={namespace}", "--set", f"paths.data_dir={tmp_path / 'data'}",
        "--output", str(tmp_path / "out"), "--set", "ingest.batch_size=10",
        "--set", "ingest.backpressure_poll_s=0.05", *extra,
    ]  # fmt: skip


def enqueue_without_redis(
    namespace: str, tmp_path: Path, shard_name: str, *settings: str
) -> tuple[list[str], str]:
    """`enqueue` of a five-document shard `shard_name` against a Redis URL where nothing
    listens, with `settings` (--set flags); the arguments and that URL."""
    shard = tmp_path / shard_name
    write_shard(shard, 5)
    url = f"redis://127.0.0.1:{free_port()}/0"
    return enqueue_args(namespace, tmp_path, *settings, "enqueue", str(shard), url=url), url


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}


def run_enqueue(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def queued_names(client: redis.Redis, keys: Keys) -> list[str]:
    return [f[b"n"].decode() for _id, f in client.xrange(keys.queue)]


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def stop_while_waiting(
    args: list[str], client: redis.Redis, keys: Keys, expected_len: int, sig: int
) -> subprocess.CompletedProcess[str]:
    """Stop enqueue with `sig` once it has filled the queue and polls it (0.3 s on)."""

    def filled() -> None:
        wait_for(lambda: client.xlen(keys.queue) >= expected_len)

    return signalled_after(args, 0.3, sig, STOP_BOUND_S, clean_env(), ready=filled)


def test_sigterm_and_sigint_stop_enqueue_waiting_on_a_full_queue_and_a_rerun_resumes_exactly(
    namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    shard = tmp_path / "docs_shard_1_v2.jsonl"
    names = write_shard(shard, 95)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        # batches of 10 while fewer than 25 wait: 30 queued, then it waits for room
        first = stop_while_waiting(
            enqueue_args(namespace, tmp_path, "--set", "ingest.max_queue_depth=25",
                         "enqueue", str(shard)),
            client, keys, 30, signal.SIGTERM,
        )  # fmt: skip
        assert first.returncode == ExitCode.TERMINATED, first.stderr
        assert "Traceback" not in first.stderr
        assert orjson.loads(first.stdout)["stopped"] is True
        assert queued_names(client, keys) == names[:30]
        assert client.hget(keys.shard_meta("docs_shard_1_v2"), "ingest_line") == b"30"
        assert client.hget(keys.shard_meta("docs_shard_1_v2"), "total") is None

        second = stop_while_waiting(
            enqueue_args(namespace, tmp_path, "--set", "ingest.max_queue_depth=55",
                         "enqueue", str(shard)),
            client, keys, 60, signal.SIGINT,
        )  # fmt: skip
        assert second.returncode == ExitCode.INTERRUPTED, second.stderr
        assert queued_names(client, keys) == names[:60]

        last = run_enqueue(enqueue_args(namespace, tmp_path, "enqueue", str(shard)))
        assert last.returncode == ExitCode.OK, last.stderr
        assert queued_names(client, keys) == names  # each once, in order
        assert client.hget(keys.shard_meta("docs_shard_1_v2"), "total") == b"95"
    finally:
        client.close()


def test_a_signal_before_the_command_starts_work_is_honoured(
    namespace: str, tmp_path: Path
) -> None:
    shard = tmp_path / "docs_shard_2_v2.jsonl"
    write_shard(shard, 5)
    args = enqueue_args(namespace, tmp_path, "enqueue", str(shard))
    proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)  # while Python is still importing
    proc.communicate(timeout=STOP_BOUND_S)
    assert proc.returncode in (ExitCode.TERMINATED, -signal.SIGTERM)


def test_enqueue_waits_for_redis_then_gives_up_with_one_line_and_exit_code_3(
    namespace: str, tmp_path: Path
) -> None:
    args, url = enqueue_without_redis(
        namespace, tmp_path, "docs_shard_3_v2.jsonl",
        "--set", "ingest.redis_wait_s=2", "--set", "redis.reconnect_backoff_s=0.2",
    )  # fmt: skip
    done = run_enqueue(args)
    assert done.returncode == ExitCode.REDIS_UNAVAILABLE
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Redis" in errors[0] and url.split("/")[2] in errors[0]


def test_enqueue_rides_out_redis_down_at_start_and_mid_run(namespace: str, tmp_path: Path) -> None:
    keys = Keys(namespace)
    shard = tmp_path / "docs_shard_4_v2.jsonl"
    names = write_shard(shard, 60)
    server = RedisProcess(tmp_path / "redis")
    args = enqueue_args(
        namespace, tmp_path, "--set", "ingest.max_queue_depth=25",
        "--set", "redis.reconnect_backoff_s=0.1", "enqueue", str(shard), url=server.url,
    )  # fmt: skip
    proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # it is waiting for a Redis that is not there yet
        assert proc.poll() is None
        server.start()
        with redis.Redis.from_url(server.url) as client:
            wait_for(lambda: client.xlen(keys.queue) >= 30)
        server.kill()  # an outage while it waits for room
        time.sleep(1.0)
        assert proc.poll() is None
        server.start()  # AOF: the 30 items and the resume point are back
        with redis.Redis.from_url(server.url) as client:
            assert client.xlen(keys.queue) == 30
            client.xtrim(keys.queue, maxlen=0)  # as if workers had taken them
            wait_for(lambda: proc.poll() is not None or client.xlen(keys.queue) >= 30)
            client.xtrim(keys.queue, maxlen=0)
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == ExitCode.OK, err
            assert client.hget(keys.shard_meta("docs_shard_4_v2"), "total") == b"60"
            lines = int(client.hget(keys.shard_meta("docs_shard_4_v2"), "lines") or 0)
            assert lines == len(names)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()


def broken_shards(tmp_path: Path) -> list[Path]:
    """A truncated gzip over 1 MiB, a gzip with corrupt data, a zip with no members, each
    followed by a good shard."""
    good = [tmp_path / f"docs_shard_{i}_v2.jsonl" for i in (11, 13, 15)]
    for i, path in enumerate(good):
        write_shard(path, 3, tag=f"g{i}")
    big = tmp_path / "docs_shard_10_v2.jsonl.gz"
    docs = [image_doc([f"http://h.example/{secrets.token_hex(48)}.jpg"]) for _ in range(20_000)]
    data = gzip.compress(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    assert len(data) > 1 << 20
    big.write_bytes(data[: len(data) * 2 // 3])
    corrupt = tmp_path / "docs_shard_12_v2.jsonl.gz"
    write_shard(corrupt, 200, tag="c")
    raw = bytearray(corrupt.read_bytes())
    raw[40:60] = b"\xff" * 20
    corrupt.write_bytes(bytes(raw))
    empty = tmp_path / "docs_shard_14_v2.jsonl.zip"
    with zipfile.ZipFile(empty, "w"):
        pass
    return [big, good[0], corrupt, good[1], empty, good[2]]


def test_unreadable_shards_are_counted_and_reported_the_rest_is_ingested_and_exit_is_1(
    namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    shards = broken_shards(tmp_path)
    done = run_enqueue(enqueue_args(namespace, tmp_path, "enqueue", *map(str, shards)))
    assert done.returncode == ExitCode.FAILURE, done.stderr
    assert "Traceback" not in done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["shards_unreadable"] == 3 and summary["shards"] == 3
    assert {u.split(":")[0] for u in summary["unreadable"]} == {
        "docs_shard_10_v2", "docs_shard_12_v2", "docs_shard_14_v2",
    }  # fmt: skip
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        assert int(client.hget(keys.ingest_errors, "unreadable_shard") or 0) == 3
        for good in ("docs_shard_11_v2", "docs_shard_13_v2", "docs_shard_15_v2"):
            assert client.hget(keys.shard_meta(good), "total") == b"3"
        # the truncated shard ends where it could be read: sealed, its reason in its meta
        meta = client.hgetall(keys.shard_meta("docs_shard_10_v2"))
        assert int(meta[b"total"]) == int(meta[b"lines"]) > 0
        assert b"unreadable_shard" in meta[b"unreadable"]
        # nothing could be read of the other two: no state left, a rerun tries again
        assert not client.exists(keys.shard_meta("docs_shard_14_v2"))
        rerun = run_enqueue(enqueue_args(namespace, tmp_path, "enqueue", *map(str, shards)))
        assert rerun.returncode == ExitCode.FAILURE
        assert orjson.loads(rerun.stdout)["shards_unreadable"] == 2  # the sealed one is done
    finally:
        client.close()


def test_a_missing_local_shard_is_an_error_naming_it(namespace: str, tmp_path: Path) -> None:
    done = run_enqueue(
        enqueue_args(namespace, tmp_path, "enqueue", str(tmp_path / "no_such_shard.jsonl"))
    )
    assert done.returncode == ExitCode.NOT_FOUND
    assert done.stderr.strip().splitlines() == [
        f"error: no such shard file: {tmp_path / 'no_such_shard.jsonl'}"
    ]


def test_the_corpus_known_gaps_named_by_a_brace_pattern_are_skipped_not_errors(
    namespace: str, tmp_path: Path
) -> None:
    for n in (3217, 3219):
        write_shard(tmp_path / f"docs_shard_{n}_v2.jsonl", 2, tag=str(n))
    pattern = str(tmp_path / "docs_shard_{3217..3219}_v2.jsonl")
    done = run_enqueue(enqueue_args(namespace, tmp_path, "enqueue", pattern))
    assert done.returncode == ExitCode.OK, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["shards"] == 2 and summary["shards_known_gaps"] == 1
    assert summary["shards_missing"] == 0
    named = run_enqueue(
        enqueue_args(namespace, tmp_path, "enqueue", str(tmp_path / "docs_shard_3218_v2.jsonl"))
    )
    assert named.returncode == ExitCode.NOT_FOUND  # named on its own, it is a mistake
    other_gap = str(tmp_path / "docs_shard_{3219..3220}_v2.jsonl")  # 3220 is not a gap
    assert run_enqueue(enqueue_args(namespace, tmp_path, "enqueue", other_gap)).returncode == (
        ExitCode.NOT_FOUND
    )


@pytest.mark.parametrize("skip", [False, True])
def test_documents_flagged_as_url_duplicates_are_counted_and_left_out_only_when_asked(
    namespace: str, tmp_path: Path, skip: bool
) -> None:
    keys = Keys(namespace)
    docs = [image_doc([f"http://h.example/{i}.jpg"], [f"{i}.jpg"]) for i in range(6)]
    for d in docs[::3]:
        d["could_have_url_duplicate"] = 1
    shard = tmp_path / "docs_shard_5_v2.jsonl"
    shard.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    setting = f"corpus.skip_url_duplicates={str(skip).lower()}"
    done = run_enqueue(enqueue_args(namespace, tmp_path, "--set", setting, "enqueue", str(shard)))
    assert done.returncode == ExitCode.OK, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["flagged_duplicates"] == 2
    assert summary["skipped_duplicates"] == (2 if skip else 0)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        expected = [f"{i}.jpg" for i in range(6) if not (skip and i % 3 == 0)]
        assert queued_names(client, keys) == expected
        meta = client.hgetall(keys.shard_meta("docs_shard_5_v2"))
        assert meta[b"flagged_duplicates"] == b"2"
        assert int(meta[b"total"]) == len(expected)
    finally:
        client.close()


def test_sigterm_stops_enqueue_waiting_on_a_stalled_shard_download(
    namespace: str, tmp_path: Path
) -> None:
    with socket.socket() as silent, contextlib.ExitStack() as accepted:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/docs_shard_6_v2.jsonl"
        args = enqueue_args(
            namespace, tmp_path, "--set", "fetch.allow_private_addresses=true", "enqueue", url
        )
        # signalled once its request has arrived: it waits for a response that never comes
        done = signalled_after(
            args, 0.3, signal.SIGTERM, STOP_BOUND_S, clean_env(),
            ready=lambda: first_bytes(silent, accepted),
        )  # fmt: skip
    assert done.returncode == ExitCode.TERMINATED
    assert orjson.loads(done.stdout)["stopped"] is True
    assert not list((tmp_path / "data" / "downloads").iterdir())  # no partial copy left


STUCK = """
import asyncio, sys
from core import early
early.install()
from core.runtime import StopSignals

async def main():
    signals = StopSignals()
    signals.install()
    print("ready", flush=True)
    await asyncio.sleep(60)  # a stop that never comes to an end on its own

asyncio.run(main())
"""


def test_a_second_signal_exits_at_once_with_the_first_signals_code() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK], env=clean_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None  # the first asks; this process does not stop by itself
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED


def test_run_on_a_missing_local_shard_is_the_same_error_before_anything_starts(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no_such_shard.jsonl"
    args = [
        sys.executable, "-m", "crawler", "--output", str(tmp_path / "out"),
        "--set", f"paths.data_dir={tmp_path / 'data'}", "run", "--no-progress", str(missing),
    ]  # fmt: skip
    done = run_enqueue(args)
    assert done.returncode == ExitCode.NOT_FOUND
    assert done.stderr.strip().splitlines() == [f"error: no such shard file: {missing}"]
    assert not (tmp_path / "data" / "redis").exists()  # no embedded Redis was started


def test_sigterm_stops_enqueue_waiting_for_an_unreachable_redis(
    namespace: str, tmp_path: Path
) -> None:
    args, _ = enqueue_without_redis(  # redis_wait_s 0: it would wait for Redis forever
        namespace, tmp_path, "docs_shard_7_v2.jsonl", "--set", "ingest.redis_wait_s=0"
    )
    done = signalled_after(
        args, 0.3, signal.SIGTERM, STOP_BOUND_S, clean_env(), ready_line="Redis unavailable"
    )
    assert done.returncode == ExitCode.TERMINATED
    assert "Traceback" not in done.stderr
