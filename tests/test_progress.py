"""Progress and ETA cover the whole crawl under backpressure (a small ingest.max_queue_depth),
and the status page shows it in a browser during and after a crawl."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from crawling import TEST_REDIS_URL
from PIL import Image

from testweb import ImageWeb, write_shard

SHARDS, PER_SHARD = 3, 24
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--virtual-time-budget=4000",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}


def _status(namespace: str, cwd: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "--redis-url", TEST_REDIS_URL,
         "--set", f"redis.namespace={namespace}", "status", "--json"],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(orjson.loads(done.stdout))


def _browser(url: str, profile: Path, shot: Path) -> str:
    assert CHROMIUM
    flags = [*CHROME_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
    ).stdout
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,1000", f"--screenshot={shot}", url],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    with Image.open(shot) as img:
        assert img.size == (1200, 1000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20  # text, cards and charts are drawn
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_progress_eta_and_status_page_cover_the_whole_crawl_under_backpressure(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    n = 0
    for s in range(SHARDS):
        docs = []
        for _ in range(PER_SHARD):
            url = web.url(n % 6, f"/fault/slow/400/p{n}.jpg")
            docs.append({"image_info": [{"image_name": f"p{n}.jpg", "raw_url": url}],
                         "text_list": ["t"], "similarity_matrix": [[0.5]]})  # fmt: skip
            n += 1
        write_shard(tmp_path / f"prog_shard_{s}.jsonl", docs)
    total = SHARDS * PER_SHARD
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}"]
    serve = subprocess.Popen(
        [sys.executable, "-m", "crawler", *base, "serve", "--port", str(port)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "crawler", *base,
         "--set", "fetch.allow_private_addresses=true", "--set", "ingest.max_queue_depth=6",
         "--set", "ingest.batch_size=3", "--set", "ingest.backpressure_poll_s=0.1",
         "--set", "limits.host_rate=50", "--set", "limits.local_host_rate=50",
         "--set", "worker.image_processes=1", "--output", "out",
         "run", "--no-progress", "--no-assign", "prog_shard_{0..2}.jsonl"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    page = f"http://127.0.0.1:{port}/"
    try:
        assert serve.stdout is not None and "status page on" in serve.stdout.readline()
        seen_during = False
        dom_during = ""
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            snap = _status(namespace, tmp_path)
            done = int(snap["done"])  # type: ignore[call-overload]
            # never the queue alone: the whole crawl, or unknown until a shard is read whole
            assert snap["total"] in (None, total), snap
            assert isinstance(snap["queued"], int) and isinstance(snap["rate"], float)
            if snap["total"] == total and 0 < done < total - 8 and not dom_during:
                assert snap["finished"] is False
                assert snap["shards_total"] == SHARDS
                if snap["eta_s"] is not None:
                    assert (
                        float(snap["eta_s"])
                        >= (total - done) / max(float(snap["rate"]), 1e-9) * 0.99
                    )  # type: ignore[arg-type]
                dom_during = _browser(page, tmp_path / "p1", tmp_path / "during.png")
                seen_during = True
            time.sleep(0.3)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err[-3000:]
        assert seen_during, "the crawl ended before a sample mid-crawl"
        for element in ("progress", "total", "bytes", "shards-count", "done-chart",
                        "rate-chart", "hosts-permanent", "hosts-transient"):  # fmt: skip
            assert f'id="{element}"' in dom_during
        assert re.search(r'id="state" class="state crawling">crawling<', dom_during)
        assert 'class="time-axis"' in dom_during and "<polyline" in dom_during
        assert re.search(r'id="shards-count">\d / 3<', dom_during)
        after = _status(namespace, tmp_path)
        assert after["finished"] is True and after["total"] == after["done"] == total
        assert after["shards_done"] == after["shards_total"] == SHARDS
        assert after["eta_s"] == 0.0
        dom_after = _browser(page, tmp_path / "p2", tmp_path / "after.png")
        assert re.search(r'id="state" class="state finished">finished<', dom_after)
        assert re.search(r'id="progress">100\.0%<', dom_after)
        assert re.search(r'id="shards-count">3 / 3<', dom_after)
        assert re.search(r'id="bytes">[0-9.]+ [kM]?B<', dom_after)
    finally:
        run.kill()
        serve.terminate()
        serve.wait(timeout=10)
