"""`run`: everything on one machine until done — Redis, ingest, workers, assignment, progress.

Workers are separate processes (``python -m crawler worker``) supervised here: one that dies
is restarted, and its leased items are reclaimed by the fleet after the lease timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crawler import monitor
from crawler.config import Config
from crawler.connection import connect
from crawler.embedded import EmbeddedRedis, where
from crawler.ingest import Ingest, expand_sources
from crawler.keys import Keys
from crawler.queue import WorkQueue
from crawler.shards import ReportWriteError, Shards

log = logging.getLogger(__name__)


def worker_command(config_args: Sequence[str]) -> list[str]:
    """A worker that stops when this process dies (a killed `run` leaves no workers behind)."""
    return [
        sys.executable, "-m", "crawler", *config_args, "worker", "--parent-pid", str(os.getpid())
    ]  # fmt: skip


class Supervisor:
    """Keeps N worker processes alive; stops them with SIGTERM (graceful)."""

    def __init__(self, n: int, command: list[str], env: dict[str, str]) -> None:
        self.n = n
        self.command = command
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def start(self) -> None:
        while len(self.procs) < self.n:
            self.procs.append(subprocess.Popen(self.command, env=self.env))

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                log.warning("worker pid %d exited with %s; restarting", proc.pid, proc.returncode)
                self.restarts += 1
                self.procs[i] = subprocess.Popen(self.command, env=self.env)

    def stop(self, timeout: float) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def finished(keys: Keys, client: Any) -> bool:
    """Nothing queued, leased or deferred, and every shard finalized: two round trips, not a
    full `monitor.snapshot`."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.queue)
    pipe.zcard(keys.deferred)
    pipe.scard(keys.shards_open)
    pipe.scard(keys.shards_complete)
    if any(int(n) for n in await pipe.execute()):
        return False
    return await monitor.leased(client, keys) == 0


async def run_all(
    cfg: Config,
    config_args: Sequence[str],
    *,
    progress: bool = True,
    with_assign: bool = True,
) -> int:
    """Crawl cfg.ingest.shards to the end. Returns a process exit code."""
    embedded: EmbeddedRedis | None = None
    if not cfg.redis.url:
        embedded = EmbeddedRedis(Path(cfg.paths.data_dir))
        cfg.redis.url = embedded.start()
        log.info("embedded Redis at %s (AOF in %s)", where(cfg.redis.url), embedded.dir)
    env = dict(os.environ, MMC4_REDIS__URL=cfg.redis.url)
    sources = expand_sources(cfg.ingest.shards)
    if not sources:
        log.error("no shards given (ingest.shards or arguments)")
        return 2
    keys = Keys(cfg.redis.namespace)
    client = connect(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(cfg.worker.processes, worker_command(config_args), env)
    assign_task: asyncio.Task[None] | None = None
    assign_stop = asyncio.Event()
    try:
        await WorkQueue(client, keys, cfg.queue).ensure_group()
        done_before = (await monitor.snapshot(client, keys, history=2)).done
        supervisor.start()
        if with_assign:
            assign_task = _start_assign(cfg, assign_stop)
        ingest = Ingest(cfg, client)
        ingest_task = asyncio.create_task(ingest.run(sources, stop))
        bar = tqdm(total=0, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
        shards = Shards(client, keys, WorkQueue(client, keys, cfg.queue), cfg.output_dir)
        try:
            while not stop.is_set():
                await asyncio.sleep(0.5)
                supervisor.check()
                if progress:
                    _show(bar, await monitor.snapshot(client, keys, history=2))
                if ingest_task.done():
                    ingest_task.result()  # re-raise a crash of ingest
                    try:
                        await shards.finalize_all()
                    except ReportWriteError as exc:  # the workers pause until it can be written
                        log.warning("%s; retrying", exc)
                    if await finished(keys, client):
                        break
        finally:
            bar.close()
            if not ingest_task.done():
                ingest_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingest_task
        interrupted = stop.is_set()
        supervisor.stop(cfg.worker.grace_period_s + 10)
        if assign_task is not None:
            await _finish_assign(assign_task, assign_stop, client, keys, interrupted)
        snap = await monitor.snapshot(client, keys, history=2)
        print(monitor.render_text(snap), file=sys.stderr)
        st = ingest.stats
        print(
            f"ingest: {st.shards} shards, {st.shards_skipped} skipped, {st.shards_missing} "
            f"missing, {st.lines} lines ({st.bad_lines} bad), {st.items} items, "
            f"{st.bad_entries} bad entries, {st.duplicate_names} duplicate names",
            file=sys.stderr,
        )
        if not interrupted and st.items == 0 and st.shards_skipped and snap.done == done_before:
            print(
                f"nothing to do: the {st.shards_skipped} shards given are already reported in "
                f"{cfg.output_dir / '_status'} (`retry --status ...` fetches failures again; "
                "another --output starts a new corpus)",
                file=sys.stderr,
            )
        return 130 if interrupted else 0
    finally:
        supervisor.stop(5)
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def _show(bar: Any, snap: monitor.Snapshot) -> None:
    bar.total = snap.done + snap.remaining
    bar.n = snap.done
    bar.set_postfix(
        queued=snap.queued, leased=snap.leased, ok=snap.by_status.get("ok", 0),
        failed=snap.done - snap.by_status.get("ok", 0), refresh=False,
    )  # fmt: skip
    bar.refresh()


def _start_assign(cfg: Config, stop: asyncio.Event) -> asyncio.Task[None] | None:
    try:
        from assign.worker import run_assign_worker
    except ImportError:
        return None
    return asyncio.create_task(run_assign_worker(cfg, stop=stop))


async def _finish_assign(
    task: asyncio.Task[None], stop: asyncio.Event, client: Any, keys: Keys, interrupted: bool
) -> None:
    """Let the assignment worker finish the announced shards, then stop it."""
    deadline = time.monotonic() + 600
    while not interrupted and not task.done() and time.monotonic() < deadline:
        if await _assign_caught_up(client, keys):
            break
        await asyncio.sleep(0.5)
    stop.set()
    try:
        await asyncio.wait_for(task, timeout=60)
    except TimeoutError:
        task.cancel()


async def _assign_caught_up(client: Any, keys: Keys) -> bool:
    from redis.exceptions import ResponseError

    from crawler.keys import ASSIGN_GROUP

    try:
        groups = await client.xinfo_groups(keys.shards_done)
    except ResponseError:
        return True  # no shard was announced
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == ASSIGN_GROUP:
            return int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0
    return False
