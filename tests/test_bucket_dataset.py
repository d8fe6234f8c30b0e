"""The assignment worker, the dataset index, `serve-dataset` and `export` with the output in a
bucket (``s3://``) of a real S3-compatible server (SeaweedFS, tests/s3_server.py), compared
with the same crawl's corpus on local disk."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import requests
from conftest import S3_BUCKET
from crawling import TEST_REDIS_URL
from dataset_helpers import Corpus, crawl_corpus, serving
from s3_server import SeaweedFS
from test_dataset_api import every_document
from test_dataset_export import read_back

from assign.task import AssignSettings, ShardTask, process
from assign.tree import open_tree
from assign.worker import run_assign_worker
from core import status
from core.config import Config
from core.keys import Keys
from testweb import ImageWeb


@pytest.fixture(scope="module")
def local(web: ImageWeb, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return crawl_corpus(web, tmp_path_factory.mktemp("crawl"))


@pytest.fixture(scope="module")
def bucket(local: Corpus, s3_server: SeaweedFS) -> Iterator[str]:
    """The local crawl's images and status reports in a bucket prefix (what crawl workers
    write there), then rewritten and indexed in the bucket by the assignment worker, fed by
    the announcements the crawl makes."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env().items():
            env.setenv(key, value)
        url = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:10]}"
        tree = open_tree(url)
        for path in sorted(local.output.rglob("*")):
            name = path.relative_to(local.output).as_posix()
            if path.is_file() and name.split("/")[0] not in (status.SHARDS_DIR, "_dataset"):
                tree.write(name, path.read_bytes())
        namespace = f"t{uuid.uuid4().hex[:10]}"
        cfg = Config()
        cfg.redis.url, cfg.redis.namespace, cfg.paths.output = TEST_REDIS_URL, namespace, url
        client = redis.Redis.from_url(TEST_REDIS_URL)
        try:
            for shard in local.shards:
                summary = orjson.loads(tree.read(f"{status.STATUS_DIR}/{shard}.summary.json"))
                client.xadd(Keys(namespace).shards_done, {
                    "shard": shard, "source": summary["source"], "output": url,
                    "report": tree.url(f"{status.STATUS_DIR}/{shard}.jsonl.gz"),
                })  # fmt: skip
            asyncio.run(run_assign_worker(cfg, once=True))
            assert client.xlen(Keys(namespace).shards_done) == len(local.shards)
        finally:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        yield url


def task_of(local: Corpus, url: str, shard: str) -> ShardTask:
    tree = open_tree(url)
    summary = orjson.loads(tree.read(f"{status.STATUS_DIR}/{shard}.summary.json"))
    report = tree.url(f"{status.STATUS_DIR}/{shard}.jsonl.gz")
    return ShardTask(shard=shard, source=summary["source"], report=report, output=url)


def test_the_assignment_worker_rewrites_into_the_bucket_what_it_writes_on_disk(
    local: Corpus, bucket: str
) -> None:
    tree = open_tree(bucket)
    for shard in local.shards:
        name = f"{status.SHARDS_DIR}/{shard}.jsonl"
        assert tree.read(name) == (local.output / name).read_bytes()
        report = orjson.loads(tree.read(f"{status.SHARDS_DIR}/{shard}.report.json"))
        assert report["complete"] is True and report["output"] == tree.url(name)
        assert tree.stat(f"_dataset/{shard}.meta.json") is not None
    # a second announcement of a rewritten shard finds it complete
    settings = AssignSettings("lapjv", downloaded_only=False, keep_empty_documents=False, output="")
    assert process(task_of(local, bucket, local.shards[0]), settings).skipped


def test_a_downloaded_only_rewrite_names_images_by_their_place_in_the_bucket(
    local: Corpus, bucket: str
) -> None:
    final = f"{bucket}-final"
    settings = AssignSettings("lapjv", downloaded_only=True, keep_empty_documents=False,
                              output=final)  # fmt: skip
    shard = local.shards[0]
    report = process(task_of(local, bucket, shard), settings)
    assert report.complete and not report.skipped and report.dropped_images > 0
    tree, out = open_tree(bucket), open_tree(final)
    stored = {
        rec["image_name"]: rec
        for rec in map(orjson.loads, gzip.decompress(
            tree.read(f"{status.STATUS_DIR}/{shard}.jsonl.gz")).splitlines())
        if rec["status"] == status.OK
    }  # fmt: skip
    lines = out.read(f"{shard}.jsonl").splitlines()
    assert lines[-1] == b"{not json"  # copied as it was
    images = [i for line in lines[:-1] for i in orjson.loads(line)["image_info"]]
    assert images and {i["image_name"] for i in images} <= set(stored)
    for image in images:
        assert image["local_path"] == tree.url(stored[image["image_name"]]["path"])
    again = process(task_of(local, bucket, shard), settings)
    assert again.skipped


@pytest.fixture(scope="module")
def servers(local: Corpus, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    logs = tmp_path_factory.mktemp("logs")
    with (
        serving(local.output, logs / "local.log") as on_disk,
        serving(
            bucket,
            logs / "bucket.log",  # type: ignore[arg-type]
        ) as in_bucket,
    ):
        yield on_disk, in_bucket


def test_the_api_over_the_bucket_serves_the_pages_it_serves_from_disk(servers: Any) -> None:
    on_disk, in_bucket = servers
    for params in ({"limit": 7}, {"limit": 5, "min_stored": 2}, {"all_stored": "true"}):
        served = every_document(in_bucket, **params)
        assert served == every_document(on_disk, **params) and served
    first = requests.get(f"{in_bucket.base}/datasets/mmc4?limit=3", headers=in_bucket.auth).json()
    nxt = requests.get(
        f"{in_bucket.base}/datasets/mmc4", headers=in_bucket.auth,
        params={"cursor": first["next"], "limit": 3},
    ).json()  # fmt: skip
    assert nxt["offset"] == 3 and nxt["documents"][0]["id"] == first["next"]
    one = requests.get(f"{in_bucket.base}/datasets/mmc4/{first['next']}", headers=in_bucket.auth)
    assert one.status_code == 200 and one.json() == nxt["documents"][0]


def test_images_come_through_the_api_with_etag_ranges_and_type(servers: Any, bucket: str) -> None:
    _, srv = servers
    tree = open_tree(bucket)
    served = 0
    for doc in every_document(srv, limit=100):
        for image in doc["images"]:
            if image["url"] is None:
                continue
            body = tree.read(f"{doc['shard']}/{image['image_name']}")
            url = srv.base + image["url"]
            r = requests.get(url, headers=srv.auth)
            assert r.status_code == 200 and r.content == body
            assert r.headers["Content-Type"] == image["mimetype"]
            assert "max-age=" in r.headers["Cache-Control"]
            again = requests.get(url, headers={**srv.auth, "If-None-Match": r.headers["ETag"]})
            assert again.status_code == 304 and again.content == b""
            part = requests.get(url, headers={**srv.auth, "Range": "bytes=10-99"})
            assert part.status_code == 206 and part.content == body[10:100]
            assert part.headers["Content-Range"] == f"bytes 10-99/{len(body)}"
            tail = requests.get(url, headers={**srv.auth, "Range": "bytes=-7"})
            assert tail.status_code == 206 and tail.content == body[-7:]
            beyond = requests.get(url, headers={**srv.auth, "Range": f"bytes={len(body)}-"})
            assert beyond.status_code == 416
            served += 1
    assert served >= 10
    shard = every_document(srv, limit=1)[0]["shard"]
    for missing in (f"{shard}/nothing.jpg", "unknown_shard/x.jpg", f"{shard}/.hidden"):
        r = requests.get(f"{srv.base}/datasets/mmc4/images/{missing}", headers=srv.auth)
        assert r.status_code == 404, missing
    assert requests.get(f"{srv.base}/datasets/mmc4/images/{shard}/x.jpg").status_code == 401


def samples(out: Path) -> list[dict[str, Any]]:
    """The samples of the tars in ``out``, without where they were read from."""
    return [{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}
            for sample in read_back(out)]  # fmt: skip


def export(output: str, out: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "--output", output, "export", out, "--no-progress",
         "--max-docs", "4", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return summary


def test_export_reads_the_bucket_and_writes_tars_to_a_directory_or_a_bucket(
    local: Corpus, bucket: str, tmp_path: Path
) -> None:
    from_disk = export(str(local.output), str(tmp_path / "disk"))
    from_bucket = export(bucket, str(tmp_path / "bucket"))
    expected = samples(tmp_path / "disk")
    assert expected and samples(tmp_path / "bucket") == expected
    into_bucket = f"{bucket}-tars"
    to_bucket = export(bucket, into_bucket, "--processes", "2")
    for summary in (from_bucket, to_bucket):
        assert {k: summary[k] for k in ("docs", "images", "tars", "failed_shards")} == {
            k: from_disk[k] for k in ("docs", "images", "tars", "failed_shards")
        }
    tars = open_tree(into_bucket)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    names = sorted(n for n in tars.list("") if n.endswith(".tar"))
    assert len(names) == from_disk["tars"]
    for name in names:
        (fetched / name).write_bytes(tars.read(name))
    assert samples(fetched) == expected
    assert tars.list("_progress")
    rerun = export(bucket, into_bucket)
    assert rerun["skipped_shards"] == len(local.shards) and rerun["tars"] == from_disk["tars"]


def test_dataset_index_rebuilds_the_index_in_the_bucket(local: Corpus, bucket: str) -> None:
    tree = open_tree(bucket)
    before = {s: tree.read(f"_dataset/{s}.meta.json") for s in local.shards}
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "--output", bucket, "dataset-index", "--force"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{len(local.shards)} shards indexed, 0 failed" in done.stdout
    for shard in local.shards:
        assert orjson.loads(tree.read(f"_dataset/{shard}.meta.json")) == orjson.loads(before[shard])


def test_a_missing_prefix_is_an_empty_dataset_not_a_crash(
    s3_server: SeaweedFS, tmp_path: Path
) -> None:
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env().items():
            env.setenv(key, value)
        empty = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:10]}"
        with serving(empty, tmp_path / "log") as srv:  # type: ignore[arg-type]
            r = requests.get(f"{srv.base}/datasets/mmc4", headers=srv.auth)
            assert r.status_code == 200 and r.json()["total"] == 0
