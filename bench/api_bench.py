"""Dataset API benchmark: page latency at depth, and stored images against nginx.

    .venv/bin/python bench/api_bench.py          (or: make bench-dataset)

1. Pages: a 100,000-document synthetic corpus (20 shards of 5,000), `serve-dataset` in its own
   process, one keep-alive aiohttp client asking, in turns, for a page of 100 at offset 0 and
   the last page (offset 99,900), plus the last page by cursor and a filtered first and last
   page; p50/p99 of each over many requests and the ratio deep p99 / first p99 (a filtered
   page's to the filtered first page's: a filter reads scattered documents at any depth).
2. Images: the same stored files fetched from `serve-dataset` and from nginx (Debian's
   package, one worker process, sendfile, access log off), by the same client with the same
   concurrency; requests/s and MB/s of each and the ratio.

Everything shares the machine's cores (client, server, nginx).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _corpus import make_corpus

from crawler.dataset.auth import new_token, token_hash

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def corpus(path: Path, docs: int, per_shard: int, with_images: bool) -> Path:
    stamp = path / "_complete"
    if not stamp.exists():
        shutil.rmtree(path, ignore_errors=True)
        print(f"building a {docs:,}-document corpus in {path} ...", flush=True)
        started = time.perf_counter()
        make_corpus(path, docs, per_shard, with_images=with_images)
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        stamp.touch()
    return path


class Server:
    def __init__(self, output: Path) -> None:
        self.token = new_token()
        cmd = [sys.executable, "-m", "crawler", "--output", str(output),
               "--set", f"dataset.token_hashes={token_hash(self.token)}",
               "serve-dataset", "--port", "0"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("dataset API on "):
            raise RuntimeError(f"serve-dataset did not start: {line!r}")
        self.base = line.split(" on ", 1)[1].strip().rsplit("/datasets/mmc4", 1)[0]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class Nginx:
    def __init__(self, root: Path, work: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes 1;
error_log {work}/error.log;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    types {{ image/jpeg jpg; }}
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location / {{ add_header Cache-Control "private, max-age=86400"; }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(work)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(10)


# The first pages, unfiltered and filtered, that the deeper pages are compared with.
FIRST = "offset 0"
FIRST_FILTERED = "offset 0, all_stored=true"


async def page_latencies(server: Server, rounds: int) -> dict[str, list[float]]:
    url = f"{server.base}/datasets/mmc4"
    async with aiohttp.ClientSession(headers=server.headers) as session:
        async with session.get(url, params={"limit": 1}) as r:
            total = (await r.json())["total"]
        last = total - 100
        async with session.get(url, params={"limit": 100, "offset": last - 100}) as r:
            cursor = (await r.json())["next"]
        kinds: dict[str, dict[str, Any]] = {
            FIRST: {"limit": 100, "offset": 0},
            f"offset {last:,} (last page)": {"limit": 100, "offset": last},
            "last page by cursor": {"limit": 100, "cursor": cursor},
        }
        async with session.get(url, params={"limit": 1, "all_stored": "true"}) as r:
            filtered = (await r.json())["total"]
        kinds[FIRST_FILTERED] = {"limit": 100, "all_stored": "true", "offset": 0}
        kinds["last page, all_stored=true"] = {
            "limit": 100,
            "all_stored": "true",
            "offset": filtered - 100,
        }
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(rounds + 50):  # the first 50 rounds warm up
            for kind, params in kinds.items():
                started = time.perf_counter()
                async with session.get(url, params=params) as r:
                    body = await r.read()
                elapsed = time.perf_counter() - started
                assert r.status == 200 and body.count(b'"id":') == 100, (kind, r.status)
                if i >= 50:
                    times[kind].append(elapsed * 1000)
    return times


async def image_rate(base: str, paths: list[str], headers: dict[str, str], seconds: float,
                     concurrency: int) -> tuple[float, float]:  # fmt: skip
    """(requests/s, MB/s) fetching ``paths`` round robin for ``seconds``."""
    done = 0
    nbytes = 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def one(start: int) -> None:
            nonlocal done, nbytes
            i = start
            while time.perf_counter() < stop_at:
                async with session.get(base + paths[i % len(paths)]) as r:
                    body = await r.read()
                    assert r.status == 200, r.status
                done += 1
                nbytes += len(body)
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return done / elapsed, nbytes / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1000, help="requests of each page kind")
    parser.add_argument("--image-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_data" / "dataset")
    args = parser.parse_args()

    out = corpus(args.work / f"api_{args.docs}", args.docs, 5_000, with_images=True)
    server = Server(out)
    try:
        print(f"\npages of 100 from {args.docs:,} documents, {args.rounds} requests each, "
              "one keep-alive client, in turns:")  # fmt: skip
        times = asyncio.run(page_latencies(server, args.rounds))
        first_p99 = {k: percentile(times[k], 0.99) for k in (FIRST, FIRST_FILTERED)}
        for kind, values in times.items():
            first = FIRST_FILTERED if "all_stored" in kind else FIRST  # its own filter's first
            p50, p99 = statistics.median(values), percentile(values, 0.99)
            print(f"  {kind:32s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   "
                  f"p99 / first page's p99: {p99 / first_p99[first]:.2f}x")  # fmt: skip

        images = sorted(p for p in out.glob("docs_*/*.jpg"))[:2000]
        rel = [str(p.relative_to(out)) for p in images]
        ours_paths = ["/datasets/mmc4/images/" + r for r in rel]
        nginx_paths = ["/" + r for r in rel]
        size = statistics.mean(p.stat().st_size for p in images) / 1000
        nginx = Nginx(out, Path(tempfile.mkdtemp(prefix="nginx-", dir=args.work)))
        try:
            print(f"\nstored images ({len(images)} files, mean {size:.0f} kB), "
                  f"{args.concurrency} concurrent keep-alive requests, "
                  f"{args.image_seconds:g} s each, in turns:")  # fmt: skip
            best: dict[str, tuple[float, float]] = {}
            sides = (("serve-dataset", server.base, ours_paths), ("nginx", nginx.base, nginx_paths))
            seconds = args.image_seconds / 2
            for _ in range(2):
                for name, base, paths in sides:
                    rate = asyncio.run(
                        image_rate(base, paths, server.headers, seconds, args.concurrency)
                    )
                    if name not in best or rate[0] > best[name][0]:
                        best[name] = rate
            for name, (rps, mbs) in best.items():
                print(f"  {name:14s} {rps:8.0f} requests/s  {mbs:7.1f} MB/s")
            ratio = best["serve-dataset"][0] / best["nginx"][0]
            version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
            version = version.strip()
            print(f"  ratio serve-dataset / nginx: {ratio:.2f}x   ({version}, 1 worker; "
                  f"best of 2 runs each)")  # fmt: skip
        finally:
            nginx.stop()
    finally:
        server.stop()
    print(f"\nmachine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"aiohttp {aiohttp.__version__}")  # fmt: skip


if __name__ == "__main__":
    main()
