"""End-to-end crawl benchmark: this crawler vs img2dataset vs the bare image cost.

Usage::

    .venv/bin/python bench/crawl_bench.py [--images 10000] [--webs clean,realistic,faulty]
    .venv/bin/python bench/crawl_bench.py --webs faulty --images 3000 --skip-bare   # quicker
    .venv/bin/python bench/crawl_bench.py --long [--long-images 200000]
    .venv/bin/python bench/crawl_bench.py --webs clean --skip-img2dataset --s3  # + a bucket

What it does, per web (``clean``: no added latency, CPU-bound; ``realistic``: lognormal latency,
median 150 ms, plus a few % slow hosts that trickle their bodies so that big images hit the
timeout):

1. starts ``python -m testweb serve`` in its own process on ``--hosts`` loopback hosts
   (its CPU is measured from /proc and excluded from every figure);
2. builds a pool of ``--pool`` distinct image specs with testweb's realistic size/format mix and
   spreads ``--images`` URLs over it and over the hosts. Every URL is unique (``?u=<i>``, which
   testweb ignores), so each image is fetched, processed and stored once, but the web serves a
   spec's cached bytes, so generating images never limits the run; the cache is warmed (every
   spec fetched once) before anything is timed;
3. runs, on the same shards / the same URL list:
   * this crawler end to end: ``mmc4-crawl run`` as a subprocess against a private
     ``redis-server`` started by the benchmark with the same flags as the embedded one (AOF,
     fsync always), so its INFO counters belong to the crawl alone; per-host limits set so they
     do not bind;
   * img2dataset (files output, keep_ratio_largest 800, resize only if bigger, opt-out header
     check off) with ``--i2d-processes`` x ``--i2d-threads``;
   * (around the first web's crawler run: once before it, once after, averaged) the bare cost:
     ``crawler.images.process_image`` on the same bytes in this process, alone, and then in
     ``--bare-processes`` forked processes at once (every core busy, as during a crawl: on a
     VM, a core can be slower while its neighbours work).
4. prints images/s, CPU ms per image (user+sys of the whole process tree: children are reaped
   by this process as a subreaper, plus the Redis server for the crawler), Redis round trips
   per image, peak RSS per process role, and the ratios.

``faulty`` is the realistic web again (its slow hosts answer ``--slow-delay-ms`` late instead
of trickling) crawled twice by each tool: the same URLs without faults, then with
``--fault-share`` of them replaced by faults of every class (``FAULT_MIX``: servers that never
answer, trickling bodies, 429/503 with Retry-After, resets, redirect loops, 50-200 MB bodies,
HTML, bombs, 404; some of the 429/503s and resets happen once only, so a retry recovers them).
The crawler runs with its own fetch settings there (deadlines, attempts), img2dataset with
``--timeout``/``--attempts``. Printed per tool: wall time and images/s with and without faults,
the faulty/no-faults ratio, the time until 99 % and 100 % of the URLs had their record (the
crawler: the records' times; img2dataset: its last answer from the web, by the web's arrival
log), how many of the faults a retry recovers ended as stored images, and the crawler's last
records.

``--s3`` adds, per web, the crawler run again with its output in a bucket of a SeaweedFS
server on loopback (``tests/s3_server.py``: ``weed server -s3`` with the Go runtime of
``GO_RUNTIME``, GOMAXPROCS=1 and garbage collection only near a 512 MiB limit, printed before
the run; ``--s3-go-defaults`` runs it with Go's defaults; the server's CPU is measured apart
and not counted) and prints its images/s and CPU per image against the local-disk run as
ratios. ``--s3-apart`` measures the crawler as a fleet sees it, with the S3 server on other
cores: this bench, its Redis and both crawler runs (disk and bucket) on CPU 0, the web and the
S3 server on the other CPUs (``on_cpus``: processes inherit the affinity they start with).

``--long`` crawls ``--long-images`` URLs (the same pool bytes under many URLs) on the clean web
with the crawler only, and prints throughput and worker/pool RSS every ``--sample-every`` s.

Every image is accounted for: the crawler's status reports must hold exactly one record per
URL, img2dataset's shard stats must add up to the URL count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from _procs import (  # noqa: E402
    TreeSampler,
    become_subreaper,
    children_cpu_s,
    process_cpu_s,
    reap_orphans,
)

import testweb  # noqa: E402
from core import config as cconfig  # noqa: E402
from core import status as cstatus  # noqa: E402
from core.keys import Keys  # noqa: E402
from core.storage import open_storage  # noqa: E402
from crawler import images as cimages  # noqa: E402

BIN = Path(sys.executable).parent
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    return env


# ---------------------------------------------------------------------------------------------
# The web


@dataclass
class Web:
    name: str
    served: testweb.WebProcess
    cpu_start: float = 0.0

    @property
    def pid(self) -> int:
        return self.served.proc.pid

    @property
    def bases(self) -> list[str]:
        return self.served.urls

    @property
    def slow(self) -> list[int]:
        return self.served.slow_hosts

    def cpu(self) -> float:
        return process_cpu_s(self.pid)

    def stop(self) -> None:
        self.served.stop(timeout=15)


def start_web(
    name: str, args: argparse.Namespace, first_host: int, log_path: Path | None = None
) -> Web:
    extra = ["--seed", str(args.seed)]
    latency = ["--latency-median-ms", str(args.latency_ms), "--latency-sigma", "0.5"]
    latency += ["--slow-host-share", str(args.slow_share)]
    if name == "realistic":
        extra += [*latency, "--slow-mode", "trickle", "--slow-bytes-per-s", str(args.slow_bps)]
    if name == "faulty":  # slow hosts answer late (trickling bodies are one of its faults)
        extra += [*latency, "--slow-mode", "delay", "--slow-delay-ms", str(args.slow_delay_ms)]
    log = os.environ.get("BENCH_WEB_LOG")
    if log_path is None and log:
        log_path = Path(f"{log}-{name}.jsonl")
    served = testweb.start_subprocess(
        args.hosts, 0, first_host=first_host, log_path=log_path,
        extra_args=extra, timeout=60, cwd=ROOT, env=clean_env(),
    )  # fmt: skip
    return Web(name, served)


# ---------------------------------------------------------------------------------------------
# Workload: a pool of specs, URLs spread over it and over the hosts, shards


def make_pool(n: int, seed: int) -> list[str]:
    """``n`` distinct image paths with testweb's realistic size/format/variant mix."""
    paths: list[str] = []
    seen: set[str] = set()
    batch = 0
    while len(paths) < n:
        docs = testweb.make_docs(["http://pool"], 200, seed=seed * 1000 + batch, sizes="realistic")
        for d in docs:
            for info in d["image_info"]:
                p = info["raw_url"][len("http://pool") :]
                if p not in seen and len(paths) < n:
                    seen.add(p)
                    paths.append(p)
        batch += 1
    return paths


@dataclass
class Workload:
    urls: list[str]
    spec_of: list[int]  # pool index of each URL
    shards: list[Path]
    url_list: Path


def make_workload(
    web: Web, pool: list[str], n: int, seed: int, shard_images: int, out: Path
) -> Workload:
    rng = random.Random(seed)
    order = list(range(len(pool)))
    urls: list[str] = []
    spec_of: list[int] = []
    for i in range(n):
        if i % len(pool) == 0:
            rng.shuffle(order)
        k = order[i % len(pool)]  # every spec equally often: the URL mix is the pool mix
        path = pool[k]
        sep = "&" if "?" in path else "?"
        urls.append(f"{web.bases[rng.randrange(len(web.bases))]}{path}{sep}u={i}")
        spec_of.append(k)
    return write_workload(urls, spec_of, rng, shard_images, out)


def write_workload(
    urls: list[str], spec_of: list[int], rng: random.Random, shard_images: int, out: Path
) -> Workload:
    """Shards (MMC4-shaped documents of 1-6 images) and a URL list for img2dataset."""
    n = len(urls)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    words = [
        "garden",
        "recipe",
        "travel",
        "city",
        "river",
        "mountain",
        "photo",
        "design",
        "light",
        "music",
    ]
    i = 0
    shard_no = 0
    while i < n:
        docs = []
        end = min(n, i + shard_images)
        d = 0
        while i < end:
            k = min(end - i, rng.randint(1, 6))
            texts = [" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(4)]
            infos, sims = [], []
            for url in urls[i : i + k]:
                m = rng.randrange(len(texts))
                infos.append({
                    "image_name": hashlib.sha256(url.encode()).hexdigest()[:12] + ".jpg",
                    "raw_url": url, "matched_text_index": m, "matched_sim": 0.3,
                    "face_detections": None,
                })  # fmt: skip
                sims.append([0.3 if j == m else 0.1 for j in range(len(texts))])
            docs.append({
                "text_list": texts, "url": f"http://example.invalid/doc/{shard_no}/{d}",
                "image_info": infos, "similarity_matrix": sims, "could_have_url_duplicate": 0,
            })  # fmt: skip
            i += k
            d += 1
        path = out / f"bench_{shard_no:05d}.jsonl"
        testweb.write_shard(path, docs)
        shards.append(path)
        shard_no += 1
    url_list = out / "urls.txt"
    url_list.write_text("".join(u + "\n" for u in urls))
    return Workload(urls, spec_of, shards, url_list)


# The faulty web: each kind its share of the faulty URLs (testweb.FAULT_KINDS names). Every
# class a crawl meets: servers that never answer, bodies that trickle (2-20 kB/s: some finish
# within a deadline, most never do), 429/503 with Retry-After (for good, or once), resets
# (for good, or once), redirect loops, 50-200 MB bodies (with and without Content-Length),
# HTML, decompression bombs, and the commonest of all, 404.
FAULT_MIX: dict[str, float] = {
    "hang": 1.0, "trickle": 1.0, "429": 0.5, "503-retry": 0.5, "flaky-retry-after": 1.0,
    "reset": 0.5, "flaky-reset": 1.0, "redirect-loop": 1.0, "huge": 0.5, "huge-chunked": 0.5,
    "html": 1.0, "bomb": 1.0, "404": 1.0,
}  # fmt: skip
# Faults a retry recovers: the image is there on the second request.
RECOVERABLE = ("flaky-retry-after", "flaky-reset")


@dataclass
class Faults:
    urls: list[str]  # the clean workload's URLs with some replaced by faults
    kinds: dict[int, str]  # URL index -> fault kind

    @property
    def recoverable(self) -> set[int]:
        return {i for i, k in self.kinds.items() if k in RECOVERABLE}


def add_faults(urls: list[str], share: float, seed: int, tag: str) -> Faults:
    """A share of `urls` replaced by faults on the same host (same positions and kinds for
    every `tag`; the tag names the faults, so that each run meets flaky faults afresh)."""
    pick = random.Random(seed * 7919 + 1)
    kinds = list(FAULT_MIX)
    weights = [FAULT_MIX[k] for k in kinds]
    bases = sorted({u.split("/", 3)[0] + "//" + u.split("/", 3)[2] for u in urls})
    out = list(urls)
    chosen: dict[int, str] = {}
    for i, url in enumerate(urls):
        if pick.random() >= share:
            continue
        kind = pick.choices(kinds, weights)[0]
        base = url.split("/", 3)[0] + "//" + url.split("/", 3)[2]
        other = bases[(bases.index(base) + 1) % len(bases)]
        path = testweb.fault_path(kind, random.Random(seed + i), f"{tag}-{i}", other)
        out[i] = f"{base}{path}{'&' if '?' in path else '?'}u={i}"
        chosen[i] = kind
    return Faults(out, chosen)


async def _fetch_all(urls: list[str], concurrency: int) -> list[bytes]:
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(url: str) -> bytes:
            async with sem, session.get(url) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"warm-up: {url} -> {r.status}")
                return body

        return await asyncio.gather(*(one(u) for u in urls))


def warm_up(web: Web, pool: list[str], concurrency: int = 8) -> list[bytes]:
    """Fetch every pool spec once (from a host that is not slow) so the web has it cached."""
    host = next(i for i in range(len(web.bases)) if i not in web.slow)
    urls = [web.bases[host] + p for p in pool]
    return asyncio.run(_fetch_all(urls, concurrency))


# ---------------------------------------------------------------------------------------------
# Redis (private, same flags as core/embedded.py)


@dataclass
class PrivateRedis:
    proc: subprocess.Popen[bytes]
    url: str
    client: redis.Redis

    @classmethod
    def start(cls, workdir: Path, fsync: str) -> PrivateRedis:
        d = workdir / "redis"
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(port), "--dir", str(d),
            "--appendonly", "yes" if fsync != "off" else "no",
            "--appendfsync", fsync if fsync != "off" else "no",
            "--save", "", "--logfile", str(d / "redis.log"), "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        return cls(proc, url, client)

    def counters(self) -> dict[str, int]:
        st = self.client.info("stats")
        out = {
            "commands": int(st["total_commands_processed"]),
            "reads": int(st.get("total_reads_processed", 0)),
        }
        for name, v in self.client.info("commandstats").items():
            out["cmd:" + name.removeprefix("cmdstat_")] = int(v["calls"])
        return out

    def cpu(self) -> float:
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunResult:
    name: str
    images: int
    wall_s: float
    cpu_s: float  # the measured system's own processes (tree + Redis for the crawler)
    web_cpu_s: float
    ok: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    accounted: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # sampled, see TreeSampler
    sys_by_role: dict[str, float] = field(default_factory=dict)  # its kernel part
    procs: dict[str, int] = field(default_factory=dict)
    redis_cpu_s: float = 0.0
    redis_reads: int = 0
    redis_commands: int = 0
    redis_top: list[tuple[str, int]] = field(default_factory=list)
    series: list[dict[str, float]] = field(default_factory=list)
    note: str = ""
    t99: float = 0.0  # seconds from the start until 99 % of the URLs had their record / result
    t100: float = 0.0  # ... until every URL had
    recovered: int | None = None  # faults a retry recovers that ended as stored images
    recoverable: int = 0  # faults a retry recovers, in the workload
    retried_ok: int = 0  # images stored after more than one attempt (the crawler's records)
    last: list[str] = field(default_factory=list)  # the last records made (the crawler's)
    server_cpu_s: float = 0.0  # the S3 server's (object storage runs; not in cpu_s)

    @property
    def rate(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.images if self.images else 0.0


def image_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12] + ".jpg"


def quantile_time(times: list[float], q: float) -> float:
    """The time by which a share `q` of `times` had passed."""
    if not times:
        return 0.0
    ordered = sorted(times)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def crawler_role(p: psutil.Process) -> str | None:
    cmd = p.cmdline()
    if "crawler" in cmd and "worker" in cmd:
        return "worker"
    if any("multiprocessing" in c for c in cmd):
        return "image-pool"
    if any("py-spy" in c for c in cmd):
        return None
    return "other"


def crawler_command(
    args: argparse.Namespace,
    rds: PrivateRedis,
    ns: str,
    out: Path,
    own_fetch: bool = False,
    output: str = "",
) -> list[str]:
    """`own_fetch`: the crawler's own fetch settings (deadlines, attempts), not --timeout and
    --attempts. `output`: where images and reports go (default: `out`)."""
    fetch = [
        f"fetch.total_timeout_s={args.timeout}",
        f"fetch.connect_timeout_s={args.timeout}",
        f"fetch.max_attempts={args.attempts}",
    ]
    sets = [
        f"redis.namespace={ns}",
        f"paths.data_dir={out / '_data'}",
        "fetch.allow_private_addresses=true",
        "limits.host_rate=0",
        "limits.local_host_rate=0",
        f"limits.host_concurrency={args.host_concurrency}",
        "limits.host_backlog=100000",
        *([] if own_fetch else fetch),
        f"worker.processes={args.workers}",
        *args.crawler_set,
    ]
    cmd = [str(BIN / "mmc4-crawl"), "--redis-url", rds.url, "--output", output or str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_crawler(
    name: str,
    args: argparse.Namespace,
    web: Web,
    rds: PrivateRedis,
    wl: Workload,
    out: Path,
    *,
    keep: list[int],
    profile: Path | None = None,
    series_every: float = 0.0,
    own_fetch: bool = False,
    recoverable: set[int] | None = None,
    output: str = "",
) -> RunResult:
    ns = f"bench-{name.replace('/', '-')}-{os.getpid()}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = crawler_command(args, rds, ns, out, own_fetch, output)
    cmd += ["run", *map(str, wl.shards), "--no-progress", "--no-assign"]
    keys = Keys(ns)
    n = len(wl.urls)
    own_cmds = 0
    prog_last = [time.monotonic(), 0]

    def progress() -> dict[str, float]:
        nonlocal own_cmds
        own_cmds += 2
        counts = rds.client.hgetall(keys.counts)
        done = sum(int(v) for k, v in counts.items() if k != b"bytes")
        mem = int(rds.client.info("memory")["used_memory"])
        now = time.monotonic()
        rate = (done - prog_last[1]) / max(1e-6, now - prog_last[0])
        prog_last[:] = [now, done]
        return {"done": done, "rate": rate, "redis_mem": mem}

    say(f"{name}: crawler run on {n} URLs ({len(wl.shards)} shards)")
    c0, w0, r0, k0 = children_cpu_s(), web.cpu(), rds.cpu(), rds.counters()
    t0, epoch0 = time.monotonic(), time.time()
    log = open(out.parent / f"{out.name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=out, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    keep_now = [*keep, proc.pid]
    sampler = TreeSampler(
        proc.pid, crawler_role, interval=0.5, series_every=series_every,
        extra=progress if series_every else None,
    ).start()  # fmt: skip
    spy: subprocess.Popen[bytes] | None = None
    printed = 0
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if profile is not None and spy is None:
                workers = sampler.pids("worker")
                if workers and time.monotonic() - t0 > args.profile_delay:
                    spy = start_py_spy(workers[0], profile, args.profile_seconds)
                    keep_now.append(spy.pid)
            while series_every and printed < len(sampler.series):
                row = sampler.series[printed]
                printed += 1
                say(
                    f"  {name}: {int(row.get('done', 0)):>8}/{n} images, "
                    f"{row.get('rate', 0):6.1f}/s now, worker RSS {mb(row.get('worker', 0))}, "
                    f"pool RSS max {mb(row.get('image-pool', 0))}, "
                    f"redis mem {mb(row.get('redis_mem', 0))}"
                )
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        log.close()
    wall = time.monotonic() - t0
    sampler.stop()
    if spy is not None:
        try:
            spy.wait(timeout=args.profile_seconds + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    reap_orphans(keep)
    k1 = rds.counters()
    cpu_tree = children_cpu_s() - c0
    redis_cpu = rds.cpu() - r0
    web_cpu = web.cpu() - w0
    if proc.returncode != 0:
        say(f"{name}: mmc4-crawl exited {proc.returncode}; see {out.parent / (out.name + '.log')}")
    # account for every image
    by_status: Counter[str] = Counter()
    names: set[str] = set()
    records = 0
    done_at: list[float] = []  # seconds from the start until each record was made
    last: list[tuple[float, cstatus.Record]] = []
    ok_names: set[str] = set()
    retried_ok = 0
    for rec in all_records(output or str(out)):
        records += 1
        names.add(rec.image_name)
        by_status[rec.status] += 1
        done_at.append(rec.time - epoch0)
        last.append((done_at[-1], rec))
        if rec.status == cstatus.OK:
            ok_names.add(rec.image_name)
            retried_ok += rec.attempts > 1
    expected = {hashlib.sha256(u.encode()).hexdigest()[:12] + ".jpg" for u in wl.urls}
    note = ""
    if records != n or names != expected:
        note = f"ACCOUNTING MISMATCH: {records} records, {len(names & expected)}/{n} names"
    delta = {k: k1.get(k, 0) - k0.get(k, 0) for k in k1}
    top = sorted(
        ((k[4:], v) for k, v in delta.items() if k.startswith("cmd:") and v > 0),
        key=lambda kv: -kv[1],
    )[:8]
    # delete the namespace's keys (private server, but keep it tidy for the next run)
    for key in rds.client.scan_iter(match=f"{ns}:*", count=1000):
        rds.client.delete(key)
    res = RunResult(
        name=f"crawler/{name}",
        images=n,
        wall_s=wall,
        cpu_s=cpu_tree + redis_cpu,
        web_cpu_s=web_cpu,
        ok=by_status.get("ok", 0),
        by_status=dict(by_status),
        accounted=records,
        peak_rss=sampler.peak_by_role(),
        cpu_by_role=sampler.cpu_by_role(),
        sys_by_role=sampler.cpu_by_role(kernel_only=True),
        procs=sampler.count_by_role(),
        redis_cpu_s=redis_cpu,
        redis_reads=max(0, delta.get("reads", 0) - own_cmds - 2),
        redis_commands=max(0, delta.get("commands", 0) - own_cmds - 4),
        redis_top=top,
        series=sampler.series,
        note=note,
        t99=quantile_time(done_at, 0.99),
        t100=max(done_at, default=0.0),
        recovered=(
            None
            if recoverable is None
            else sum(image_name(wl.urls[i]) in ok_names for i in recoverable)
        ),
        retried_ok=retried_ok,
        last=[
            f"{t:6.1f}s {r.status} after {r.attempts} attempt(s) {r.error[:70]!r} "
            f"{r.raw_url.split('/', 3)[-1][:60]}"
            for t, r in sorted(last, key=lambda tr: tr[0])[-6:]
        ],
    )
    say(f"{name}: crawler done in {wall:.1f}s ({res.rate:.0f} img/s), {records}/{n} records")
    return res


def all_records(output: str) -> Any:
    """Every record of every report under `output` (a directory or s3://bucket/prefix)."""
    storage = open_storage(output)
    for name in sorted(storage.names_sync(cstatus.STATUS_DIR)):
        if name.endswith(".jsonl.gz"):
            yield from cstatus.report_records(storage.get_sync(f"{cstatus.STATUS_DIR}/{name}"))


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None) -> Iterator[None]:
    """Processes started in the body run on `cpus` (they inherit this process's affinity);
    None leaves the affinity as it is."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def apart_cpus(args: argparse.Namespace) -> set[int] | None:
    """The CPUs of the web and the S3 server under --s3-apart (all but CPU 0), else None."""
    return set(range(1, os.cpu_count() or 1)) if args.s3_apart else None


def run_crawler_s3(
    name: str,
    args: argparse.Namespace,
    web: Web,
    rds: PrivateRedis,
    wl: Workload,
    workdir: Path,
    *,
    keep: list[int],
) -> RunResult:
    """The crawler run again with its output in a bucket of a SeaweedFS server on loopback
    (`tests/s3_server.py`). The server's CPU is measured apart (like the web's) and not
    counted in the crawler's."""
    from s3_server import SeaweedFS

    server = SeaweedFS(
        workdir / "seaweedfs", volume_size_mb=4096, go_runtime={} if args.s3_go_defaults else None
    )
    say(f"{name}-s3: {server.describe()}")
    with on_cpus(apart_cpus(args)):
        server.start()
    try:
        server.create_bucket("crawl-bench")
        os.environ.update(server.env())  # for the crawler (clean_env) and all_records
        # The bucket's first writes make SeaweedFS grow its volumes (seconds): not part of
        # the crawl, as in any bucket that is in use.
        warm = open_storage("s3://crawl-bench/warm-up")
        for i in range(20):
            warm.put_sync(f"w/{i}", bytes(40_000))
            warm.delete_sync(f"w/{i}")
        assert server.proc is not None
        s0 = process_cpu_s(server.proc.pid)
        res = run_crawler(
            f"{name}-s3", args, web, rds, wl, workdir / f"out-crawler-{name}-s3",
            keep=[*keep, server.proc.pid], output=f"s3://crawl-bench/{name}",
        )  # fmt: skip
        res.server_cpu_s = process_cpu_s(server.proc.pid) - s0
    finally:
        server.stop()
    return res


def start_py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    say(f"py-spy: recording worker pid {pid} and its image pool for {seconds:.0f}s -> {out}")
    cmd = [
        str(BIN / "py-spy"), "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
        "--rate", "200", "--duration", str(int(seconds)), "--nonblocking", "-o", str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# img2dataset lives in a venv of its own: installed into the project's venv, its dependency
# tree (wandb brings OpenTelemetry's SDK, which redis-py 8 imports whenever it is present)
# would add ~0.1 s of CPU to the start-up of every crawler process (timed separately).
I2D_VENV = ROOT / ".venv-bench"
I2D_INSTALL = "python3 -m venv .venv-bench && .venv-bench/bin/pip install img2dataset"


def img2dataset_command(args: argparse.Namespace) -> Path | None:
    for exe in (args.img2dataset, I2D_VENV / "bin" / "img2dataset", BIN / "img2dataset"):
        if exe is not None and Path(exe).exists():
            return Path(exe)
    return None


def run_img2dataset(
    name: str,
    args: argparse.Namespace,
    web: Web,
    wl: Workload,
    out: Path,
    *,
    keep: list[int],
    arrivals: Path | None = None,
    recoverable: set[int] | None = None,
) -> RunResult:
    """`arrivals`: the web's arrival log, for the time by which each URL was answered."""
    exe = img2dataset_command(args)
    n = len(wl.urls)
    if exe is None:
        say(f"img2dataset is not installed ({I2D_INSTALL}): skipped")
        return RunResult(f"img2dataset/{name}", n, 0, 0, 0, note="not installed")
    if out.exists():
        shutil.rmtree(out)
    per_shard = max(1, -(-n // (args.i2d_processes * args.i2d_shards_per_process)))
    cmd = [
        str(exe), "--url_list", str(wl.url_list), "--input_format", "txt",
        "--output_folder", str(out), "--output_format", "files",
        "--processes_count", str(args.i2d_processes), "--thread_count", str(args.i2d_threads),
        "--image_size", "800", "--resize_mode", "keep_ratio_largest",
        "--resize_only_if_bigger", "True", "--encode_quality", "90",
        "--timeout", str(int(args.timeout)), "--retries", str(args.attempts - 1),
        "--number_sample_per_shard", str(per_shard), "--disallowed_header_directives", "[]",
        "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]  # fmt: skip
    say(f"{name}: img2dataset run ({args.i2d_processes} processes x {args.i2d_threads} threads, "
        f"{per_shard} URLs per shard)")  # fmt: skip
    c0, w0 = children_cpu_s(), web.cpu()
    t0 = time.monotonic()
    log = open(out.parent / f"{out.name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=out.parent, env=clean_env(), stdout=log, stderr=subprocess.STDOUT
    )
    sampler = TreeSampler(proc.pid, lambda p: "process", interval=0.5).start()
    try:
        proc.wait()
    finally:
        log.close()
    wall = time.monotonic() - t0
    sampler.stop()
    reap_orphans(keep)
    cpu = children_cpu_s() - c0
    web_cpu = web.cpu() - w0
    stats: Counter[str] = Counter()
    counted = ok = 0
    for f in sorted(out.glob("*_stats.json")):
        s = json.loads(f.read_text())
        counted += int(s.get("count", 0))
        ok += int(s.get("successes", 0))
        for k, v in (s.get("status_dict") or {}).items():
            stats[k[:60]] += int(v)
    note = ""
    if proc.returncode != 0:
        note = f"img2dataset exited {proc.returncode}"
    if counted != n:
        note += f" ACCOUNTING MISMATCH: stats count {counted} != {n}"
    ok_urls: set[str] = set()
    for f in out.glob("*/*.json"):
        meta = json.loads(f.read_text())
        if meta.get("status") == "success":
            ok_urls.add(meta.get("url", ""))
    answered = answer_times(arrivals, t0, n) if arrivals is not None else []
    res = RunResult(
        name=f"img2dataset/{name}",
        images=n,
        wall_s=wall,
        cpu_s=cpu,
        web_cpu_s=web_cpu,
        ok=ok,
        by_status=dict(stats),
        accounted=counted,
        peak_rss=sampler.peak_by_role(),
        cpu_by_role=sampler.cpu_by_role(),
        sys_by_role=sampler.cpu_by_role(kernel_only=True),
        procs=sampler.count_by_role(),
        note=note.strip(),
        t99=quantile_time(answered, 0.99),
        t100=max(answered, default=0.0),
        recovered=(
            None if recoverable is None else sum(wl.urls[i] in ok_urls for i in recoverable)
        ),
    )
    say(f"{name}: img2dataset done in {wall:.1f}s ({res.rate:.0f} img/s), {counted}/{n} counted")
    return res


_URL_INDEX = re.compile(r"[?&]u=(\d+)")


def answer_times(log: Path, t0: float, n: int) -> list[float]:
    """Seconds from `t0` (monotonic) until each of the `n` URLs of a run had its last answer,
    from the web's arrival log (the requests of that run: those started after `t0`; a URL
    never seen counts as answered at the end)."""
    last: dict[int, float] = {}
    for a in testweb.read_arrivals(log):
        m = _URL_INDEX.search(a.path)
        if a.start >= t0 and m is not None:
            i = int(m.group(1))
            last[i] = max(last.get(i, 0.0), a.end - t0)
    end = max(last.values(), default=0.0)
    return [last.get(i, end) for i in range(n)]


@dataclass
class Bare:
    """The bare image cost, CPU ms per image weighted by the URL mix: one process alone (the
    other cores idle), and `processes` processes at once (every core busy, as in a crawl);
    each measured before and after the crawler's first run (`*_samples`), then averaged."""

    cpu_ms: float
    samples_ms: list[float]
    parallel_ms: float | None
    parallel_samples_ms: list[float]
    processes: int
    kept: int
    reencoded: int
    failed: int


# `init_worker`'s arguments, as the crawler's image processes start under the benchmark's
# configuration (settings and heap included: the same code path).
ImageStart = tuple[cimages.ImageSettings, int]


def _bare_per_spec(
    pool_bytes: list[bytes], reps: int, start: ImageStart
) -> tuple[list[float], list[str]]:
    """Median CPU seconds of process_image per spec, and each spec's outcome."""
    settings = start[0]
    cimages.init_worker(*start)
    per: list[float] = []
    outcomes: list[str] = []
    for data in pool_bytes:
        times = []
        for _ in range(reps):
            t = time.process_time()
            r = cimages.process_image(data, settings)
            times.append(time.process_time() - t)
        per.append(statistics.median(times))
        kept = "kept" if r.keep_original else "reencoded"
        outcomes.append(kept if r.status == cstatus.OK else "failed")
    return per, outcomes


def _bare_child(conn: Any, pool_bytes: list[bytes], reps: int, start: ImageStart) -> None:
    conn.send(_bare_per_spec(pool_bytes, reps, start)[0])
    conn.close()


def _weighted_ms(per: list[float], spec_of: list[int]) -> float:
    weights = Counter(spec_of)
    return 1000 * sum(per[k] * c for k, c in weights.items()) / len(spec_of)


def measure_bare(
    pool_bytes: list[bytes], spec_of: list[int], reps: int, processes: int, start: ImageStart
) -> tuple[float, float | None, list[str]]:
    """One measurement: (alone ms, at-once ms or None, outcomes per spec)."""
    per, outcomes = _bare_per_spec(pool_bytes, reps, start)
    alone = _weighted_ms(per, spec_of)
    if processes < 2:
        return alone, None, outcomes
    ctx = multiprocessing.get_context("fork")  # the children share pool_bytes, not a copy
    links = [ctx.Pipe(duplex=False) for _ in range(processes)]
    procs = [
        ctx.Process(target=_bare_child, args=(send, pool_bytes, reps, start)) for _, send in links
    ]
    for proc in procs:
        proc.start()
    results = [recv.recv() for recv, _ in links]
    for proc in procs:
        proc.join()
    return alone, statistics.mean(_weighted_ms(r, spec_of) for r in results), outcomes


def bare_sample(
    when: str, pool_bytes: list[bytes], spec_of: list[int], args: argparse.Namespace
) -> tuple[float, float | None, list[str]]:
    then = f", then in {args.bare_processes} processes at once" if args.bare_processes > 1 else ""
    say(f"bare ({when} the crawler's run): process_image on the pool bytes, alone{then}")
    start = cimages.init_args(cconfig.load(None, environ={}, overrides=args.crawler_set))
    sample = measure_bare(pool_bytes, spec_of, args.bare_reps, args.bare_processes, start)
    at_once = "" if sample[1] is None else f", {sample[1]:.2f} at once"
    say(f"bare: {sample[0]:.2f} CPU ms/image alone{at_once} (URL-weighted)")
    return sample


def combine_bare(samples: list[tuple[float, float | None, list[str]]], processes: int) -> Bare:
    alone = [a for a, _, _ in samples]
    parallel = [p for _, p, _ in samples if p is not None]
    outcomes = samples[0][2]
    return Bare(
        statistics.mean(alone), alone, statistics.mean(parallel) if parallel else None,
        parallel, processes, outcomes.count("kept"), outcomes.count("reencoded"),
        outcomes.count("failed"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reporting


def print_table(results: list[RunResult], bare: Bare | None) -> None:
    print()
    head = (
        f"{'run':<22}{'images':>8}{'ok':>8}{'wall s':>8}{'img/s':>8}{'CPU ms/img':>11}"
        f"{'web CPU %':>10}{'RT/img':>8}{'cmd/img':>8}  peak RSS"
    )
    print(head)
    print("-" * len(head) + "-" * 30)
    for r in results:
        web_pct = 100 * r.web_cpu_s / r.wall_s if r.wall_s else 0.0
        rt = f"{r.redis_reads / r.images:.3f}" if r.redis_reads else "-"
        cm = f"{r.redis_commands / r.images:.3f}" if r.redis_commands else "-"
        rss = ", ".join(
            f"{k} {mb(v)} (x{r.procs.get(k, 1)})" for k, v in sorted(r.peak_rss.items())
        )
        print(
            f"{r.name:<22}{r.images:>8}{r.ok:>8}{r.wall_s:>8.1f}{r.rate:>8.1f}{r.cpu_ms:>11.2f}"
            f"{web_pct:>9.0f}%{rt:>8}{cm:>8}  {rss}"
        )
    if bare is not None:
        samples = ", ".join(f"{x:.2f}" for x in bare.samples_ms)
        print(
            f"{'bare process_image':<22}{'':>8}{'':>8}{'':>8}{1000 / bare.cpu_ms:>8.1f}"
            f"{bare.cpu_ms:>11.2f}   (one process alone; mean of {samples} measured before and "
            f"after the first crawler run; {bare.kept} specs kept, {bare.reencoded} re-encoded, "
            f"{bare.failed} failed)"
        )
        if bare.parallel_ms is not None:
            samples = ", ".join(f"{x:.2f}" for x in bare.parallel_samples_ms)
            label = f"bare x{bare.processes} at once"
            print(
                f"{label:<22}{'':>8}{'':>8}{'':>8}{1000 / bare.parallel_ms:>8.1f}"
                f"{bare.parallel_ms:>11.2f}   ({bare.processes} processes at once, every core "
                f"busy as in a crawl; per process, mean of {samples})"
            )
    print()
    for r in results:
        extra = f"  [{r.note}]" if r.note else ""
        st = ", ".join(f"{k}={v}" for k, v in sorted(r.by_status.items(), key=lambda kv: -kv[1]))
        print(f"{r.name}: accounted {r.accounted}/{r.images}; {st}{extra}")
        if r.cpu_by_role and r.images:
            roles = dict(r.cpu_by_role)
            if r.redis_cpu_s:
                roles["redis"] = r.redis_cpu_s
            per = ", ".join(
                f"{k} {1000 * v / r.images:.2f}"
                + (
                    f" (kernel {1000 * r.sys_by_role[k] / r.images:.2f})"
                    if k in r.sys_by_role
                    else ""
                )
                for k, v in sorted(roles.items())
            )
            rest = max(0.0, r.cpu_s - sum(roles.values()))
            print(f"  CPU ms/img by role: {per}, rest {1000 * rest / r.images:.2f}")
        if r.redis_top:
            rc = f"Redis CPU {r.redis_cpu_s:.1f}s; "
            print(f"  {rc}commands: " + ", ".join(f"{k}={v}" for k, v in r.redis_top))
    print()
    by = {r.name: r for r in results}
    for web in ("clean", "realistic"):
        c, i = by.get(f"crawler/{web}"), by.get(f"img2dataset/{web}")
        if c is None:
            continue
        line = f"{web}: "
        if i is not None and i.rate:
            line += f"crawler/img2dataset images/s = {c.rate / i.rate:.2f}x; "
            line += f"CPU/img crawler/img2dataset = {c.cpu_ms / i.cpu_ms:.2f}x; "
        if bare is not None:
            line += f"crawler CPU/img / bare = {c.cpu_ms / bare.cpu_ms:.2f}x"
            if bare.parallel_ms is not None:
                line += f" (/ bare x{bare.processes} at once = {c.cpu_ms / bare.parallel_ms:.2f}x)"
            line += "; "
        line += f"Redis round trips/img = {c.redis_reads / c.images:.3f}"
        print(line)
        s3 = by.get(f"crawler/{web}-s3")
        if s3 is not None and s3.rate and c.cpu_ms:
            server_ms = 1000 * s3.server_cpu_s / s3.images
            print(
                f"{web}, output in a bucket (SeaweedFS on loopback) / local disk: "
                f"images/s = {s3.rate / c.rate:.2f}x, crawler CPU/img = "
                f"{s3.cpu_ms / c.cpu_ms:.2f}x; the S3 server's own CPU, not counted: "
                f"{server_ms:.2f} ms/img, on the same cores: a CPU-bound crawl with the "
                f"server elsewhere runs at ~{c.cpu_ms / s3.cpu_ms:.2f}x, with it here at "
                f"~{c.cpu_ms / (s3.cpu_ms + server_ms):.2f}x"
            )
    print()


def dump_json(
    path: Path, results: list[RunResult], bare: Bare | None, meta: dict[str, Any]
) -> None:
    data = {
        "meta": meta,
        "runs": [{**r.__dict__, "rate": r.rate, "cpu_ms": r.cpu_ms} for r in results],
        "bare_cpu_ms": bare.cpu_ms if bare else None,
        "bare_parallel_cpu_ms": bare.parallel_ms if bare else None,
    }
    path.write_text(json.dumps(data, indent=1, default=str))


# Where work dirs go. Not /tmp: the test suite creates and deletes thousands of files there,
# and on an ext4 without a journal (this machine's) every file created within minutes of such
# deletes, in the same block group, costs ~0.3-0.4 ms of kernel time instead of ~0.03 (the
# inode allocator skips recently deleted inodes one by one). The base is marked as the top of a
# directory tree (chattr +T) so that ext4 puts each run's work dir in a different block group,
# away from the files the previous run deleted. The probe below prints what creating costs.
WORK_BASE = Path("/var/tmp/mmc4-bench")


def work_base() -> Path:
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # best effort: other file systems ignore or refuse it
        subprocess.run(["chattr", "+T", str(WORK_BASE)], capture_output=True, check=False)
    return WORK_BASE


def create_cost_ms(directory: Path, n: int = 300) -> float:
    """CPU ms to create, write (1 kB) and close one file in `directory` (the files stay until
    the work dir goes: deleting them now would slow the creates that follow)."""
    probe = directory / "create-probe"
    probe.mkdir()
    start = time.process_time()
    for i in range(n):
        (probe / str(i)).write_bytes(b"x" * 1000)
    return 1000 * (time.process_time() - start) / n


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
        "pillow": cimages.library_versions(),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="URLs per run (default mode)")
    p.add_argument(
        "--webs", default="clean,realistic,faulty", help="comma list: clean, realistic, faulty"
    )
    p.add_argument("--fault-share", type=float, default=0.05, help="share of faulty URLs")
    p.add_argument(
        "--faulty-images", type=int, default=0, help="URLs per run on the faulty web (0: --images)"
    )
    p.add_argument("--hosts", type=int, default=32)
    p.add_argument("--pool", type=int, default=400, help="distinct image specs")
    p.add_argument("--shard-images", type=int, default=2000, help="images per shard file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument(
        "--img2dataset",
        type=Path,
        default=None,
        help=f"img2dataset executable (default: .venv-bench/bin/img2dataset: {I2D_INSTALL})",
    )
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument(
        "--s3", action="store_true",
        help="also crawl each web with the output in a bucket of a SeaweedFS on loopback",
    )  # fmt: skip
    p.add_argument("--bare-reps", type=int, default=3)
    p.add_argument(
        "--s3-apart", action="store_true",
        help="crawler and its Redis on CPU 0, the web and the S3 server on the others",
    )  # fmt: skip
    p.add_argument(
        "--s3-go-defaults", action="store_true",
        help="run the S3 server with the Go runtime's defaults (not s3_server.GO_RUNTIME)",
    )  # fmt: skip
    p.add_argument(
        "--bare-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="the bare cost is also measured in this many processes at once (1: alone only)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="per-request timeout, both crawlers (img2dataset's default)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=1,
        help="attempts per URL, both crawlers (img2dataset default: retries=0)",
    )
    p.add_argument("--workers", type=int, default=1, help="crawler worker processes")
    p.add_argument("--host-concurrency", type=int, default=256)
    p.add_argument(
        "--crawler-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra --set for the crawler (repeatable)",
    )
    p.add_argument(
        "--redis-fsync",
        default="always",
        choices=["always", "everysec", "no", "off"],
        help="private Redis AOF fsync policy (embedded Redis uses always)",
    )
    p.add_argument("--i2d-processes", type=int, default=2)
    p.add_argument("--i2d-threads", type=int, default=64)
    p.add_argument("--i2d-shards-per-process", type=int, default=4)
    p.add_argument("--latency-ms", type=float, default=150.0)
    p.add_argument("--slow-share", type=float, default=0.03)
    p.add_argument("--slow-bps", type=int, default=50_000, help="realistic web's slow hosts")
    p.add_argument(
        "--slow-delay-ms", type=float, default=2000.0, help="faulty web's slow hosts' delay"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the clean runs, one more crawler run under py-spy",
    )
    p.add_argument("--profile-seconds", type=float, default=25.0)
    p.add_argument("--profile-delay", type=float, default=3.0)
    p.add_argument("--long", action="store_true", help="long run: crawler only, clean web")
    p.add_argument("--long-images", type=int, default=200_000)
    p.add_argument("--sample-every", type=float, default=15.0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if not become_subreaper():
        say("warning: could not become a child subreaper; orphaned pool CPU may be missed")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crawl_bench_", dir=work_base()))
    workdir.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    say(f"machine: {meta['nproc']} CPUs, {meta['cpu']}, {meta['pillow']}; work dir {workdir}")
    meta["file_create_ms"] = create_cost_ms(workdir)
    say(f"file system: creating a 1 kB file in the work dir costs {meta['file_create_ms']:.3f} "
        "CPU ms")  # fmt: skip
    if meta["file_create_ms"] > 0.1:
        say("warning: file creation is slow here (on an ext4 without journal, right after many "
            "files were deleted nearby); both tools pay it per file: see --workdir")  # fmt: skip
    if args.s3_apart:
        if (os.cpu_count() or 1) < 2:
            raise SystemExit("--s3-apart needs 2 CPUs or more")
        os.sched_setaffinity(0, {0})  # everything started from here on inherits it
        say(f"--s3-apart: this bench, its Redis and the crawler on CPU 0; the web and the S3 "
            f"server on CPUs {sorted(apart_cpus(args) or [])}")  # fmt: skip
    webs = ["clean"] if args.long else [w.strip() for w in args.webs.split(",") if w.strip()]
    n = args.long_images if args.long else args.images
    shard_images = max(args.shard_images, 10_000) if args.long else args.shard_images
    pool = make_pool(args.pool, args.seed)
    rds = PrivateRedis.start(workdir, args.redis_fsync)
    results: list[RunResult] = []
    bare: Bare | None = None
    web: Web | None = None
    try:
        for i, name in enumerate(webs):
            if name == "faulty":
                arrivals = workdir / "arrivals-faulty.jsonl"
                web = start_web(name, args, first_host=2 + i * 64, log_path=arrivals)
                results += run_faulty(args, web, rds, pool, workdir, arrivals)
                web.stop()
                web = None
                continue
            with on_cpus(apart_cpus(args)):
                web = start_web(name, args, first_host=2 + i * 64)
            keep = [web.pid, rds.proc.pid]
            say(f"{name} web: {len(web.bases)} hosts, pid {web.pid}, slow hosts {web.slow}")
            t = time.monotonic()
            w0 = web.cpu()
            pool_bytes = warm_up(web, pool)
            say(f"{name}: warmed {len(pool)} specs ({mb(sum(map(len, pool_bytes)))}) in "
                f"{time.monotonic() - t:.1f}s (web CPU {web.cpu() - w0:.1f}s)")  # fmt: skip
            wl = make_workload(web, pool, n, args.seed, shard_images, workdir / f"in-{name}")
            bare_now = bare is None and not args.skip_bare and not args.long
            bare_samples = []
            if bare_now:
                bare_samples.append(bare_sample("before", pool_bytes, wl.spec_of, args))
            res = run_crawler(
                name, args, web, rds, wl, workdir / f"out-crawler-{name}", keep=keep,
                series_every=args.sample_every if args.long else 0.0,
            )  # fmt: skip
            results.append(res)
            if bare_now:
                bare_samples.append(bare_sample("after", pool_bytes, wl.spec_of, args))
                bare = combine_bare(bare_samples, args.bare_processes)
            if args.s3 and not args.long:
                results.append(run_crawler_s3(name, args, web, rds, wl, workdir, keep=keep))
            if not args.long and not args.skip_img2dataset:
                results.append(
                    run_img2dataset(name, args, web, wl, workdir / f"out-i2d-{name}", keep=keep)
                )
            if args.profile and name == "clean" and not args.long:
                prof = workdir / "profile-clean.txt"
                run_crawler(
                    "clean-profiled", args, web, rds, wl, workdir / "out-crawler-profiled",
                    keep=keep, profile=prof,
                )  # fmt: skip
                if prof.exists():
                    from _profile import summarize

                    print(summarize(prof, top=25))
            web.stop()
            web = None
            if args.long:
                print_long(res)
    finally:
        if web is not None:
            web.stop()
        rds.stop()
    print_table(results, bare)
    print_faulty(results, args)
    if args.json:
        dump_json(args.json, results, bare, meta)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"kept {workdir}")
    return 1 if any("MISMATCH" in r.note for r in results) else 0


def run_faulty(
    args: argparse.Namespace,
    web: Web,
    rds: PrivateRedis,
    pool: list[str],
    workdir: Path,
    arrivals: Path,
) -> list[RunResult]:
    """The realistic web with and without faults: each tool crawls the same URLs twice, the
    second time with a share of them replaced by faults (same positions, same kinds)."""
    keep = [web.pid, rds.proc.pid]
    say(f"faulty web: {len(web.bases)} hosts, pid {web.pid}, slow hosts {web.slow}")
    warm_up(web, pool)
    n = args.faulty_images or args.images
    clean = make_workload(web, pool, n, args.seed, args.shard_images, workdir / "in-no-faults")
    out: list[RunResult] = []
    for tool in ("crawler", "img2dataset"):
        if tool == "img2dataset" and args.skip_img2dataset:
            continue
        faults = add_faults(clean.urls, args.fault_share, args.seed, tool)
        wl = write_workload(
            faults.urls, clean.spec_of, random.Random(args.seed + 1), args.shard_images,
            workdir / f"in-faulty-{tool}",
        )  # fmt: skip
        kinds = Counter(faults.kinds.values())
        say(f"faulty/{tool}: {len(faults.kinds)} of {n} URLs are faults "
            f"({len(faults.recoverable)} recoverable by a retry): "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))  # fmt: skip
        for label, work, recoverable in (
            ("no-faults", clean, None),
            ("faulty", wl, faults.recoverable),
        ):
            if tool == "crawler":
                res = run_crawler(
                    label, args, web, rds, work, workdir / f"out-crawler-{label}", keep=keep,
                    own_fetch=True, recoverable=recoverable,
                )  # fmt: skip
            else:
                res = run_img2dataset(
                    label, args, web, work, workdir / f"out-i2d-{label}", keep=keep,
                    arrivals=arrivals, recoverable=recoverable,
                )  # fmt: skip
            res.recoverable = len(recoverable or ())
            out.append(res)
    return out


def print_faulty(results: list[RunResult], args: argparse.Namespace) -> None:
    by = {r.name: r for r in results}
    if "crawler/faulty" not in by:
        return
    print(
        f"faulty web: {100 * args.fault_share:g} % of the URLs faults of every class "
        "(bench/crawl_bench.py FAULT_MIX), the realistic web's latency and slow hosts; "
        "no-faults: the same URLs without them. The crawler with its own fetch settings "
        f"(deadlines, attempts), img2dataset with --timeout {int(args.timeout)} "
        f"--retries {args.attempts - 1}."
    )
    head = (
        f"{'':<13}{'no-faults wall':>15}{'img/s':>7}{'t99':>7}{'t100':>7}"
        f"{'faulty wall':>13}{'img/s':>7}{'t99':>7}{'t100':>7}"
        f"{'faulty/no-faults (wall, t100)':>31}{'recovered by retrying':>23}"
    )
    print(head)
    for tool in ("crawler", "img2dataset"):
        c, f = by.get(f"{tool}/no-faults"), by.get(f"{tool}/faulty")
        if c is None or f is None or not c.wall_s:
            continue
        ratio = f"{f.wall_s / c.wall_s:.2f}x, {f.t100 / c.t100 if c.t100 else 0:.2f}x"
        print(
            f"{tool:<13}{c.wall_s:>14.1f}s{c.rate:>7.1f}{c.t99:>6.1f}s{c.t100:>6.1f}s"
            f"{f.wall_s:>12.1f}s{f.rate:>7.1f}{f.t99:>6.1f}s{f.t100:>6.1f}s"
            f"{ratio:>31}{f'{f.recovered} of {f.recoverable}':>23}"
        )
    for r in (by.get("crawler/no-faults"), by.get("crawler/faulty")):
        if r is not None and r.last:
            print(f"{r.name}: the last records\n  " + "\n  ".join(r.last))
    print()


def print_long(res: RunResult) -> None:
    rows = res.series
    if not rows:
        return
    print("\nlong run: worker/pool RSS over time")
    print(f"{'t s':>8}{'done':>10}{'img/s':>8}{'worker RSS':>12}{'pool RSS':>10}{'redis':>9}")
    step = max(1, len(rows) // 25)
    for row in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        print(
            f"{row['t']:>8.0f}{int(row.get('done', 0)):>10}{row.get('rate', 0):>8.0f}"
            f"{mb(row.get('worker', 0)):>12}{mb(row.get('image-pool', 0)):>10}"
            f"{mb(row.get('redis_mem', 0)):>9}"
        )
    k = max(1, len(rows) // 10)
    first = [r.get("worker", 0) for r in rows[k : 2 * k]] or [rows[0].get("worker", 0)]
    last = [r.get("worker", 0) for r in rows[-k:]]
    print(
        f"worker RSS: {mb(statistics.mean(first))} early (10-20%) vs {mb(statistics.mean(last))} "
        f"late (last 10%); overall {res.rate:.0f} img/s, {res.cpu_ms:.2f} CPU ms/img"
    )


if __name__ == "__main__":
    sys.exit(main())
