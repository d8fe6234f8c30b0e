"""The pool job that shrinks and stores an image, and the check of a file already stored."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from core.storage import LocalStorage, open_storage
from crawler.images import ImageSettings
from crawler.store import (
    OUTPUT_UNWRITABLE,
    TMP_PREFIX,
    Store,
    shrink_and_store,
    sweep_temporary,
    verify_bytes,
    verify_stored,
)

SETTINGS = ImageSettings(max_side=800)


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_large_image_is_shrunk_written_and_only_its_fields_come_back(tmp_path: Path) -> None:
    final = tmp_path / "shard" / "a.jpg"
    result = shrink_and_store(jpeg(2000, 1000), SETTINGS, (str(tmp_path), "shard", "a.jpg"))
    assert result.status == "ok" and result.data is None
    written = final.read_bytes()
    assert result.stored_bytes == len(written)
    assert result.sha256 == hashlib.sha256(written).hexdigest()
    with Image.open(final) as img:
        assert img.size == (800, 400) == (result.width, result.height)
    assert [p.name for p in final.parent.iterdir()] == ["a.jpg"]  # no temporary left


def test_a_small_image_is_written_byte_for_byte(tmp_path: Path) -> None:
    data = jpeg(300, 200)
    final = tmp_path / "s" / "b.jpg"
    result = shrink_and_store(data, SETTINGS, (str(tmp_path), "s", "b.jpg"))
    assert result.keep_original and final.read_bytes() == data
    assert result.stored_bytes == len(data)


def test_not_an_image_writes_nothing(tmp_path: Path) -> None:
    final = tmp_path / "s" / "c.jpg"
    result = shrink_and_store(b"<html>nope</html>", SETTINGS, (str(tmp_path), "s", "c.jpg"))
    assert result.status == "not_an_image"
    assert not final.exists()


def test_a_failed_write_is_a_write_error_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("a file where the shard directory should be")
    result = shrink_and_store(jpeg(100, 100), SETTINGS, (str(tmp_path), "s", "d.jpg"))
    assert result.status == "write_error" and result.error
    blocked = tmp_path / "ro"
    blocked.mkdir()
    (blocked / "e.jpg").mkdir()  # a directory under the final name: the rename fails
    result = shrink_and_store(jpeg(100, 100), SETTINGS, (str(tmp_path), "ro", "e.jpg"))
    assert result.status == "write_error"
    assert not [p for p in blocked.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_stored_file_is_recognised_and_a_broken_one_is_not(tmp_path: Path) -> None:
    data = jpeg(400, 300)
    (tmp_path / "s").mkdir()
    good, broken = tmp_path / "s" / "good.jpg", tmp_path / "s" / "broken.jpg"
    good.write_bytes(data)
    broken.write_bytes(data[: len(data) // 2])
    found = verify_stored((str(tmp_path), "s", "good.jpg"), SETTINGS)
    assert found is not None and found.data is None
    assert (found.width, found.height, found.stored_bytes) == (400, 300, len(data))
    assert found.sha256 == hashlib.sha256(data).hexdigest()
    assert verify_stored((str(tmp_path), "s", "broken.jpg"), SETTINGS) is None
    assert verify_stored((str(tmp_path), "s", "missing.jpg"), SETTINGS) is None
    assert verify_stored((str(tmp_path), "none", "good.jpg"), SETTINGS) is None


def test_on_disk_answers_for_a_whole_batch(tmp_path: Path) -> None:
    store = Store(LocalStorage(str(tmp_path)))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "here.jpg").write_bytes(b"x")
    (tmp_path / "s" / "dir.jpg").mkdir()
    asked = [("s", "here.jpg"), ("s", "gone.jpg"), ("s", "dir.jpg"), ("t", "here.jpg")]
    assert store.on_disk(asked) == [True, False, False, False]


def test_sweep_removes_only_old_temporaries(tmp_path: Path) -> None:
    old, fresh, image = (
        tmp_path / f"{TMP_PREFIX}old",
        tmp_path / f"{TMP_PREFIX}new",
        tmp_path / "i.jpg",
    )
    for p in (old, fresh, image):
        p.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert sweep_temporary(tmp_path, older_than_s=600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, image.name])


def test_a_shard_without_a_directory_at_first_look_has_nothing_from_an_earlier_run(
    tmp_path: Path,
) -> None:
    store = Store(LocalStorage(str(tmp_path)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.jpg").write_bytes(b"x")
    assert not store.all_new(["old", "new"])  # not looked at yet
    assert store.on_disk([("old", "a.jpg"), ("new", "a.jpg")]) == [True, False]
    assert store.all_new(["new"]) and not store.all_new(["new", "old"])
    (tmp_path / "new").mkdir()  # written since by this crawl
    (tmp_path / "new" / "a.jpg").write_bytes(b"x")
    assert store.on_disk([("new", "a.jpg")]) == [False]
    assert Store(LocalStorage(str(tmp_path))).on_disk([("new", "a.jpg")]) == [
        True
    ]  # the next run finds it


def test_a_bucket_is_listed_once_per_shard_for_what_an_earlier_run_stored(
    s3_output: str,
) -> None:
    storage = open_storage(s3_output)
    storage.put_sync("old/a.jpg", b"x")
    store = Store(storage)
    asked = [("old", "a.jpg"), ("old", "b.jpg"), ("new", "a.jpg")]
    assert store.on_disk(asked) == [True, False, False]
    assert store.all_new(["new"]) and not store.all_new(["old"])
    storage.put_sync("old/b.jpg", b"x")  # written since, by this crawl: the listing stands
    storage.put_sync("new/a.jpg", b"x")
    assert store.on_disk(asked) == [True, False, False]
    assert Store(storage).on_disk(asked) == [True, True, True]  # the next run finds them


async def test_an_upload_is_the_whole_shrunk_image_and_a_failed_one_pauses_the_output(
    s3_output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(open_storage(s3_output))
    target = store.target("shard", "a.jpg")
    body = jpeg(2000, 1000)
    img = store.image_job(body, SETTINGS, target)
    assert img.status == "ok" and img.data is not None
    done = await store.finish("shard", "a.jpg", img, body)
    assert done.status == "ok" and done.data is None
    stored = await store.storage.get("shard/a.jpg")
    assert len(stored) == done.stored_bytes and hashlib.sha256(stored).hexdigest() == img.sha256
    assert verify_bytes(stored, SETTINGS) is not None
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    refused = await Store(open_storage(s3_output)).finish("shard", "b.jpg", img, body)
    assert refused.status == OUTPUT_UNWRITABLE and "SignatureDoesNotMatch" in refused.error


async def test_a_kept_original_is_uploaded_from_the_body_the_worker_holds(
    s3_output: str,
) -> None:
    store = Store(open_storage(s3_output))
    body = jpeg(300, 200)  # small enough to be stored as it came
    img = store.image_job(body, SETTINGS, store.target("shard", "k.jpg"))
    assert img.status == "ok" and img.keep_original and img.data is None  # not sent back
    done = await store.finish("shard", "k.jpg", img, body)
    assert done.status == "ok" and done.stored_bytes == len(body)
    assert await store.storage.get("shard/k.jpg") == body


async def test_a_bucket_that_cannot_be_read_means_fetch_again_not_a_failed_image(
    s3_output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(s3_output)
    storage.put_sync("old/a.jpg", jpeg(100, 100))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = Store(open_storage(s3_output))
    assert store.on_disk([("old", "a.jpg")]) == [False]
    assert not store.all_new(["old"])  # unknown, not new: asked again next time
    assert await store.stored_bytes("old", "a.jpg") is None
