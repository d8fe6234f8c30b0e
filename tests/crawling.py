"""Helpers for tests that crawl: build shards, run ingest + workers, read the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core import status
from core.config import Config
from core.diagnostics import task_stacks
from core.keys import Keys
from core.storage import output_storage
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.shards import Shards
from crawler.sources import expand_sources
from crawler.worker import Worker
from testweb import ImageWeb, make_docs, write_shard

TEST_REDIS_URL = os.environ.get("MMC4_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CRAWL_TIMEOUT_S = 90.0  # far beyond any test crawl; a hang fails with every task's stack
T = TypeVar("T")


def image_doc(urls: list[str], names: list[str] | None = None) -> dict[str, Any]:
    names = names or [hashlib.sha256(u.encode()).hexdigest()[:12] + ".jpg" for u in urls]
    return {
        "text_list": ["first sentence", "second sentence"],
        "url": "http://example.invalid/doc",
        "image_info": [
            {
                "image_name": n,
                "raw_url": u,
                "matched_text_index": 0,
                "matched_sim": 0.2,
                "face_detections": None,
            }
            for n, u in zip(names, urls, strict=True)
        ],
        "similarity_matrix": [[0.2, 0.1] for _ in urls],
        "could_have_url_duplicate": 0,
    }


def write_docs(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    return path


def write_slow_shard(web: ImageWeb, path: Path, n: int) -> Path:
    """A shard of `n` one-image documents whose every image waits 2 s for its headers: a crawl
    of it is still going seconds after it starts."""
    docs = [
        {"image_info": [{"image_name": f"s{i}.jpg",
                         "raw_url": web.url(i % 6, f"/fault/slow/2000/x{i}.jpg")}],
         "text_list": ["t"], "similarity_matrix": [[0.5]]}
        for i in range(n)
    ]  # fmt: skip
    return write_docs(path, docs)


async def crawl(cfg: Config, shard_paths: list[str], *, workers: int = 1) -> list[Worker]:
    """Ingest the shards and run in-process workers until the queue is empty."""
    client = aioredis.Redis.from_url(cfg.redis.url)
    keys = Keys(cfg.redis.namespace)
    try:
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        ingest = Ingest(cfg, client)
        await ingest.run(expand_sources(shard_paths))
        crew = [Worker(cfg) for _ in range(workers)]
        await within(CRAWL_TIMEOUT_S, asyncio.gather(*(w.run(until_idle=True) for w in crew)))
        await Shards(
            client, keys, WorkQueue(client, keys, cfg.queue), output_storage(cfg)
        ).finalize_all()
        return crew
    finally:
        await client.aclose()


async def within(seconds: float, aw: Awaitable[T]) -> T:
    """Await `aw`, failing after `seconds` with the stack of every task still running."""
    fut = asyncio.ensure_future(aw)
    await asyncio.wait({fut}, timeout=seconds)
    if not fut.done():
        stacks = task_stacks()
        fut.cancel()
        raise AssertionError(f"not done after {seconds}s; tasks:\n{stacks}")
    return fut.result()


async def until(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], every_s: float = 0.05
) -> T:
    """Read `read()` every `every_s` until `done` holds for what it returns (bound it with
    `within`)."""
    while not done(got := await read()):
        await asyncio.sleep(every_s)
    return got


async def started(
    client: aioredis.Redis, keys: Keys, procs: list[subprocess.Popen[bytes]], timeout: float = 120
) -> None:
    """Wait until each worker process of `procs` has written its heartbeat (a worker's id holds
    its pid): it has started, its signal handlers in place, and a SIGTERM drains it."""

    async def beating() -> bool:
        try:
            for proc in procs:
                pattern = keys.worker(f"*-{proc.pid}-*")
                if not [k async for k in client.scan_iter(match=pattern, count=1000)]:
                    return False
        except (OSError, RedisError):
            return False  # Redis restarting
        return True

    await within(timeout, until(beating, bool))


async def stuck_state(client: aioredis.Redis, keys: Keys, shard: str, log: Path) -> str:
    """What a crawl that did not finish left behind: for the failure message."""
    lines = [f"shard meta: {await client.hgetall(keys.shard_meta(shard))}"]
    lines.append(f"queue length: {await client.xlen(keys.queue)}")
    lines.append(f"groups: {await client.xinfo_groups(keys.queue)}")
    lines.append(f"deferred: {await client.zcard(keys.deferred)}")
    lines.append(f"complete: {await client.smembers(keys.shards_complete)}")
    text = log.read_text(errors="replace") if log.exists() else ""
    lines.append("worker log (last 60 lines):\n" + "\n".join(text.splitlines()[-60:]))
    return "\n".join(lines)


def report(cfg: Config, shard: str) -> dict[str, dict[str, Any]]:
    """The shard's report as image_name -> record (asserting one record per name)."""
    data = output_storage(cfg).get_sync(status.report_key(shard))
    records = [msgspec.structs.asdict(r) for r in status.report_records(data)]
    names = [r["image_name"] for r in records]
    assert len(names) == len(set(names)), "more than one record for an image"
    return {r["image_name"]: r for r in records}


def crawl_config(namespace: str, tmp_path: Path, **sections: dict[str, object]) -> Config:
    """A configuration for tests: fast timeouts, loopback allowed, its own namespace."""
    cfg = Config()
    cfg.redis.url = TEST_REDIS_URL
    cfg.redis.namespace = namespace
    cfg.redis.reconnect_backoff_s = 0.1
    cfg.paths.output = str(tmp_path / "out")
    cfg.paths.data_dir = str(tmp_path / "data")
    cfg.fetch.allow_private_addresses = True
    cfg.fetch.total_timeout_s = 3.0
    cfg.fetch.connect_timeout_s = 2.0
    cfg.fetch.backoff_base_s = 0.05
    cfg.fetch.backoff_max_s = 0.2
    cfg.fetch.retry_after_max_s = 1.0
    cfg.fetch.max_body_bytes = 2_000_000
    cfg.limits.host_rate = 50.0
    cfg.limits.host_burst = 2
    cfg.limits.local_host_rate = 50.0
    cfg.limits.host_concurrency = 2
    cfg.worker.image_processes = 1
    cfg.worker.flush_interval_s = 0.05
    cfg.worker.heartbeat_interval_s = 1.0
    cfg.queue.reclaim_interval_s = 0.5
    cfg.ingest.backpressure_poll_s = 0.05
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    cfg.validate()
    return cfg


def start_worker(args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """A `mmc4-crawl worker` process with the given global options; its log is appended to
    `log` when given (read it when a test fails)."""
    with open(log or os.devnull, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "crawler", "-v", *args, "worker"],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )


def churn_flags(namespace: str, redis_url: str, output: str, **overrides: object) -> list[str]:
    """--set options for worker processes that are killed and restarted under a test: short
    leases, quick reclaims, fast retries and flushes, one image process each. `overrides`
    use "section__key" names (limits__host_rate=6)."""
    settings: dict[str, object] = {
        "redis.url": redis_url, "redis.namespace": namespace, "redis.reconnect_backoff_s": 0.1,
        "paths.output": output, "fetch.allow_private_addresses": "true",
        "fetch.total_timeout_s": 2, "fetch.backoff_base_s": 0.05, "fetch.backoff_max_s": 0.2,
        "fetch.retry_after_max_s": 0.5, "queue.lease_timeout_s": 2,
        "queue.reclaim_interval_s": 0.3, "worker.image_processes": 1,
        "worker.flush_interval_s": 0.05,
    }  # fmt: skip
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return flags(settings)


def flags(settings: dict[str, object]) -> list[str]:
    """--set options for a worker process."""
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


def own_names(docs: list[dict[str, Any]]) -> set[str]:
    """The image names of a shard's documents."""
    return {info["image_name"] for d in docs for info in d["image_info"]}


def write_shards(
    web: ImageWeb, directory: Path, shards: list[str], docs_each: int, seed: int, faults: float
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """One shard file of small images per name in `shards` (seeds `seed`, `seed` + 1, …):
    the documents by shard, and the files' paths."""
    docs = {
        s: make_docs(web, docs_each, seed=seed + i, sizes="small", faults=faults)
        for i, s in enumerate(shards)
    }
    paths = [str(directory / f"{shard}.jsonl") for shard in shards]
    for path, shard in zip(paths, shards, strict=True):
        write_shard(path, docs[shard])
    return docs, paths


def children(pid: int) -> list[int]:
    """The child process ids of `pid` (none once it has exited)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Whether `pid` is alive (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def heartbeats(client: redis.Redis, namespace: str) -> int:
    """How many workers of `namespace` have a heartbeat (a worker writes its first once it has
    started: its signal handlers in place, its metrics port, if any, bound)."""
    return sum(1 for _ in client.scan_iter(match=Keys(namespace).worker_pattern, count=1000))


def first_bytes(listener: socket.socket, keep: contextlib.ExitStack, timeout: float = 60) -> bytes:
    """Accept one connection on `listener` and read the first bytes sent on it (a request
    under way); the connection stays open, never answered, until `keep` closes."""
    listener.settimeout(timeout)
    conn = keep.enter_context(listener.accept()[0])
    conn.settimeout(timeout)
    data = conn.recv(4096)
    assert data, "the connection closed before anything was sent"
    return data


def signalled_after(
    args: list[str],
    wait_s: float,
    sig: int,
    timeout: float,
    env: dict[str, str],
    ready: Callable[[], object] | None = None,
    ready_line: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Start `args`, check it is still running `wait_s` after it is ready (once `ready()`
    returns, and once it has written a line containing `ready_line` to stderr), send it `sig`
    and wait up to `timeout` for it to exit (killed after that, and the wait fails)."""
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    said: list[str] = []
    try:
        if ready is not None:
            ready()
        while ready_line is not None and proc.stderr is not None:
            said.append(line := proc.stderr.readline())
            assert line, f"it ended without saying {ready_line!r}: {''.join(said)}"
            if ready_line in line:
                break
        time.sleep(wait_s)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(said) + err)
