"""Monitoring: worker metrics and health endpoints, the status page in headless Chromium."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import redis
from crawling import TEST_REDIS_URL, crawl_config, image_doc, write_docs
from PIL import Image
from redis_server import free_port

from core.keys import Keys
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.sources import expand_sources
from crawler.worker import Worker
from testweb import ImageWeb


async def test_a_worker_serves_prometheus_metrics_and_health(
    web: ImageWeb, aredis: object, namespace: str, tmp_path: Path
) -> None:
    tag = namespace
    urls = [web.url(i % 4, f"/img/64x64/{tag}-{i}.jpg") for i in range(12)]
    urls.append(web.url(0, f"/fault/status/404/{tag}"))
    shard = write_docs(tmp_path / "m_shard.jsonl", [image_doc(urls)])
    port = free_port()
    cfg = crawl_config(namespace, tmp_path, metrics={"port": port})
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(cfg.redis.url)
    await WorkQueue(client, Keys(namespace), cfg.queue).ensure_group()
    await Ingest(cfg, client).run(expand_sources([str(shard)]))
    await client.aclose()
    worker = Worker(cfg)
    task = asyncio.create_task(worker.run())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            text = ""
            deadline = time.monotonic() + 90  # a bound for a hang, not for a busy machine
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                try:
                    async with http.get(base + "/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientError:
                    continue
                if 'mmc4_images_total{status="ok"} 12.0' in text and "http_404" in text:
                    break
            assert 'mmc4_images_total{status="ok"} 12.0' in text
            assert 'mmc4_images_total{status="http_404"} 1.0' in text
            assert "mmc4_fetch_duration_seconds_bucket" in text
            assert "mmc4_host_wait_seconds_bucket" in text  # politeness apart from the fetch
            assert "mmc4_image_processing_seconds_bucket" in text
            assert "mmc4_fetch_retries_total" in text
            assert 'mmc4_build_info{python="' in text and 'version="' in text
            assert "_created" not in text
            assert "mmc4_queue_depth" not in text  # fleet facts: `serve`'s mmc4_fleet_*
            assert "process_resident_memory_bytes" in text
            assert "mmc4_stored_bytes_total" in text
            assert tag not in text and "127.0.0" not in text  # no hosts in labels
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


def seed_status(namespace: str) -> None:
    keys = Keys(namespace)
    with redis.Redis.from_url(TEST_REDIS_URL) as r:
        r.hset(keys.counts, mapping={"ok": 4321, "http_404": 87, "timeout": 12, "bytes": 10**9})
        r.sadd(keys.shards_open, "docs_shard_77_v2")
        r.hset(keys.shard_meta("docs_shard_77_v2"), mapping={"images": 6000, "total": 6000,
                                                              "done": 4420})  # fmt: skip
        r.zadd(keys.hosts_failed, {"dead.example.com": 55, "slow.example.org": 9})
        now = time.time()
        for i in range(30):
            r.lpush(keys.history, f"{now - 300 + 10 * i:.1f} {1000 + 110 * i} {5000 - 100 * i}")
        r.xadd(keys.queue, {"s": "docs_shard_77_v2", "n": "a.jpg", "u": "http://x.example/a"})


@pytest.fixture
def status_page(namespace: str) -> object:
    seed_status(namespace)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler", "--redis-url", TEST_REDIS_URL,
         "--set", f"redis.namespace={namespace}", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "status page on" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=4000",
]  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_status_page_renders_live_numbers_in_a_browser(
    status_page: str, tmp_path: Path
) -> None:
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, *profile, "--dump-dom", status_page],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert re.search(r'id="done">4,420<', dom), dom[:2000]
    assert re.search(r'id="queued">1<', dom)
    assert "dead.example.com" in dom and ">55<" in dom
    assert "docs_shard_77_v2" in dom and ">6,000<" in dom
    assert "<polyline" in dom  # queue depth over time
    assert re.search(r'id="rate">[0-9.]+<', dom) and 'id="rate">0.0<' not in dom
    shot = tmp_path / "status.png"
    subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, *profile, "--window-size=1100,900",
         f"--screenshot={shot}", status_page],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    with Image.open(shot) as img:
        assert img.size == (1100, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # text, cards and the chart are drawn
        blue = (59, 120, 216)  # the chart line and the progress bars
        assert any(c[1] == blue for c in (colours or [])) or colours is None


def test_the_status_api_and_fleet_metrics(status_page: str) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(status_page + "api/status", timeout=10) as resp:
        data = json.load(resp)
    assert data["done"] == 4420 and data["by_status"]["ok"] == 4321
    assert data["top_failing_hosts"][0] == {"host": "dead.example.com", "failed": 55}
    assert data["rate"] == pytest.approx(110 / 10, rel=0.01)
    with urllib.request.urlopen(status_page + "metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'mmc4_fleet_images{status="ok"} 4321' in text
    assert "mmc4_fleet_queue_depth 1" in text
    assert "mmc4_fleet_stored_bytes 1000000000" in text
    assert "mmc4_fleet_finished 0" in text
