"""core.storage against a real SeaweedFS (S3) and a local directory: the same behaviour."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from core.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage
from crawler import safefs
from crawler.config import StorageConfig


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


def test_a_missing_bucket_is_one_clear_line(s3_output: str) -> None:
    problem = open_storage("s3://no-such-bucket/x").problem_sync("_status")
    assert "s3://no-such-bucket/x/_status/" in problem
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
    from redis_server import free_port

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
