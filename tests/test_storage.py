"""core.storage against a real SeaweedFS (S3) and a local directory: the same behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis_server import free_port
from s3_server import SeaweedFS

from core import safefs
from core.config import StorageConfig
from core.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(request.getfixturevalue("s3_output"))


def test_a_location_picks_its_storage(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    s3 = open_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.url("a/b.jpg") == "s3://bucket/some/prefix/a/b.jpg"


def test_put_get_list_rename_delete(storage: Storage) -> None:
    storage.put_sync("shard1/a.jpg", b"first")
    storage.put_sync("shard1/a.jpg", b"second")  # replaces
    storage.put_sync("shard1/b.jpg", b"b")
    storage.put_sync("shard10/c.jpg", b"c")  # a sibling prefix is not listed with shard1
    assert storage.get_sync("shard1/a.jpg") == b"second"
    assert storage.names_sync("shard1") == {"a.jpg", "b.jpg"}
    assert storage.names_sync("nothing") == set()
    assert storage.exists_sync("shard1/b.jpg")
    assert not storage.exists_sync("shard1/z.jpg")
    storage.rename_sync("shard1/b.jpg", "_status/b.superseded")
    assert storage.names_sync("shard1") == {"a.jpg"}
    assert storage.get_sync("_status/b.superseded") == b"b"
    storage.delete_sync("shard1/a.jpg")
    storage.delete_sync("shard1/a.jpg")  # already gone: nothing
    with pytest.raises(FileNotFoundError):
        storage.get_sync("shard1/a.jpg")


async def test_the_async_methods_match(storage: Storage) -> None:
    await asyncio.gather(*(storage.put(f"s/{i}.jpg", bytes([i]) * 100) for i in range(50)))
    assert await storage.names("s") == {f"{i}.jpg" for i in range(50)}
    assert await storage.get("s/7.jpg") == bytes([7]) * 100
    assert await storage.exists("s/7.jpg") and not await storage.exists("s/x.jpg")
    await storage.rename("s/7.jpg", "t/7.jpg")
    await storage.delete("s/8.jpg")
    assert await storage.names("t") == {"7.jpg"}
    assert len(await storage.names("s")) == 48


@pytest.mark.parametrize("key", ["../x/a.jpg", "a/../../b", "a", "a/.hidden", "/abs/b", "a/b/c"])
def test_keys_are_two_plain_names(storage: Storage, key: str) -> None:
    with pytest.raises(safefs.UnsafePath):
        storage.put_sync(key, b"x")


def test_a_writable_output_has_no_problem(storage: Storage) -> None:
    assert storage.problem_sync("_status") == ""
    assert storage.names_sync("_status") == set()  # the probe is removed
    assert storage.problem_sync("_status", write=False) == ""  # a reader's check: a listing


@pytest.mark.parametrize("write", [True, False])
def test_a_missing_bucket_is_one_clear_line(s3_output: str, write: bool) -> None:
    problem = open_storage("s3://no-such-bucket/x").problem_sync("_status", write=write)
    assert "s3://no-such-bucket/x/_status" in problem
    assert "the bucket does not exist (NoSuchBucket)" in problem
    assert "\n" not in problem


def test_bad_credentials_are_one_clear_line(
    s3_output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    problem = open_storage(s3_output).problem_sync("_status")
    assert "the secret key does not match" in problem and "\n" not in problem
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown")
    with pytest.raises(StorageError) as caught:
        open_storage(s3_output).put_sync("a/b", b"x")
    assert caught.value.errno == errno.EACCES or "InvalidAccessKeyId" in str(caught.value)


def test_an_unreachable_endpoint_fails_after_its_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    settings = StorageConfig(max_retries=2, backoff_initial_s=0.01, retry_timeout_s=5)
    problem = open_storage("s3://bucket/x", settings).problem_sync("_status")
    assert "cannot reach the endpoint" in problem and "\n" not in problem


async def test_in_flight_requests_are_bounded(s3_output: str) -> None:
    storage = open_storage(s3_output, StorageConfig(max_inflight=3))
    assert isinstance(storage, S3Storage)
    tasks = [asyncio.create_task(storage.put(f"s/{i}", b"x" * 1000)) for i in range(30)]
    await asyncio.sleep(0)  # every task has started: three hold the gate, the rest wait
    gate = storage._gate()
    assert gate.locked() and len(gate._waiters or ()) == 27
    await asyncio.gather(*tasks)
    assert len(await storage.names("s")) == 30


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@contextlib.asynccontextmanager
async def throttling_proxy(upstream: str, refusals: int) -> AsyncIterator[dict[str, int]]:
    """A loopback proxy in front of the S3 server that answers the first `refusals` requests
    with 503 SlowDown (as S3 throttles), then forwards each request as it came (the Host
    header too, so the client's signature still holds)."""
    seen = {"refused": 0, "forwarded": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if seen["refused"] < refusals:
            seen["refused"] += 1
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        seen["forwarded"] += 1
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
            request.method, upstream + request.path_qs, data=body,
            headers={k: v for k, v in request.headers.items() if k.lower() != "transfer-encoding"},
            skip_auto_headers={"Content-Type", "User-Agent"},
        ) as resp:  # fmt: skip
            payload = await resp.read()
            headers = {
                k: v for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }  # fmt: skip
            return web.Response(status=resp.status, body=payload, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    seen["port"] = port
    try:
        yield seen
    finally:
        await runner.cleanup()


async def test_throttling_is_retried_with_backoff_until_the_server_takes_the_request(
    s3_server: SeaweedFS, s3_output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = StorageConfig(backoff_initial_s=0.01, backoff_max_s=0.05)
    async with throttling_proxy(s3_server.endpoint, refusals=3) as seen:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seen['port']}")
        await open_storage(s3_output, fast).put("shard/a.jpg", b"image")
        assert seen["refused"] == 3 and seen["forwarded"] == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert await open_storage(s3_output).get("shard/a.jpg") == b"image"
    async with throttling_proxy(s3_server.endpoint, refusals=100) as seen:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seen['port']}")
        few = StorageConfig(max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.05)
        with pytest.raises(StorageError) as caught:
            await open_storage(s3_output, few).put("shard/b.jpg", b"image")
        assert seen["refused"] == 3  # the request and its two retries
    assert "SlowDown" in str(caught.value) and "\n" not in str(caught.value)


def test_credentials_come_from_a_named_profile(
    s3_output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3_server import ACCESS_KEY, SECRET_KEY

    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[crawl]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        "[wrong]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "crawl")
    assert open_storage(s3_output).problem_sync("_status") == ""
    problem = open_storage(s3_output, StorageConfig(profile="wrong")).problem_sync("_status")
    assert "InvalidAccessKeyId" in problem
    with pytest.raises(StorageError, match="profile"):
        open_storage(s3_output, StorageConfig(profile="missing"))


def test_write_file_replaces_a_path_whole_and_a_rerun_discards_what_a_killed_writer_left(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out" / "shard.jsonl"
    safefs.write_file(target, b"old\n")
    safefs.write_file(target, b"new\n", durable=False)
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.jsonl"]  # no temp left
    left = safefs.temp_path(target)  # a killed writer's temporary file
    left.write_bytes(b"partial")
    other = safefs.temp_path(tmp_path / "out" / "other.jsonl")
    other.write_bytes(b"someone else's")
    assert safefs.discard_leftovers(target) == 1
    assert not left.exists() and other.exists()
    with pytest.raises(OSError):
        safefs.write_file(tmp_path / "out" / "shard.jsonl" / "below-a-file", b"x")
    assert target.read_bytes() == b"new\n"
