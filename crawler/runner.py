"""`run`: everything on one machine until done — Redis, ingest, workers, assignment, progress.

Workers are separate processes (``python -m crawler worker``) supervised here: one that dies
is restarted, and its leased items are reclaimed by the fleet after the lease timeout.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM stops ingest and sends each worker one SIGTERM
(it finishes or hands back its items within worker.grace_period_s); a second signal exits at
once. The exit code is 130 after SIGINT, 143 after SIGTERM, 0 when the crawl finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError
from tqdm import tqdm

from core import logs, status
from core.config import Config
from core.connection import connect
from core.embedded import EmbeddedRedis, where
from core.errors import CommandError, redact
from core.exitcodes import ExitCode
from core.keys import Keys
from crawler import monitor
from crawler.ingest import Ingest, expand_sources, missing_message
from crawler.queue import WorkQueue
from crawler.shards import ReportWriteError, Shards
from crawler.signals import StopSignals

log = logging.getLogger(__name__)
T = TypeVar("T")


def worker_command(config_args: Sequence[str], *extra: str) -> list[str]:
    """A worker that stops when this process dies (a killed `run` leaves no workers behind)."""
    return [
        sys.executable, "-m", "crawler", *config_args, *extra,
        "worker", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


# Exit codes of a worker that a restart would not change: its configuration or its port.
_NOT_RESTARTED = (ExitCode.USAGE, ExitCode.ADDRESS_IN_USE)


class Supervisor:
    """Keeps N worker processes alive until `stop`; never blocks the event loop.

    Each worker runs in its own process group, so a Ctrl-C in the terminal reaches `run`
    alone and each worker gets exactly one SIGTERM from `stop` (a graceful drain); a second
    Ctrl-C ends `run` at once and the workers with it (their parent-death signal is a
    second SIGTERM, which a worker honours at once). A worker that exits 0 was told to stop
    and is not restarted; one that fails or is killed is. With `metrics_port` set, worker i
    serves its metrics on `metrics_port + i`.
    """

    def __init__(
        self, n: int, config_args: Sequence[str], env: dict[str, str], metrics_port: int = 0
    ) -> None:
        self.n = n
        self.config_args = list(config_args)
        self.env = env
        self.metrics_port = metrics_port
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.restarts = 0
        self.stopping = False

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        extra = ["--set", f"metrics.port={self.metrics_port + i}"] if self.metrics_port else []
        return subprocess.Popen(
            worker_command(self.config_args, *extra), env=self.env, process_group=0
        )

    def start(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is None:
                self.procs[i] = self._spawn(i)

    @property
    def alive(self) -> int:
        return sum(1 for p in self.procs if p is not None and p.poll() is None)

    def check(self) -> None:
        """Restart workers that failed; forget those that exited 0 (told to stop)."""
        if self.stopping:
            return
        for i, proc in enumerate(self.procs):
            if proc is None or proc.poll() is None:
                continue
            if proc.returncode == 0:
                log.warning("worker pid %d stopped (exit 0); not restarted", proc.pid)
                self.procs[i] = None
                continue
            if proc.returncode in _NOT_RESTARTED:  # it would fail again the same way
                raise CommandError(
                    ExitCode(proc.returncode),
                    f"worker {i} exited with code {proc.returncode} ("
                    f"{ExitCode(proc.returncode).name.lower().replace('_', ' ')}): see its "
                    "error above",
                )
            log.warning("worker pid %d exited with %s; restarting", proc.pid, proc.returncode)
            self.restarts += 1
            self.procs[i] = self._spawn(i)

    async def stop(self, timeout: float) -> None:
        """One SIGTERM to each worker (a graceful drain); SIGKILL what is left after
        `timeout` seconds."""
        self.stopping = True
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for proc in running:
            if proc.poll() is None:
                log.error("worker pid %d did not stop within %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                await asyncio.sleep(0)
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


async def _unless_stopped(stop: asyncio.Event, coro: Awaitable[T]) -> T | None:
    """Await `coro`, or cancel it and return None as soon as `stop` is set: a stop is
    honoured at once whatever Redis is doing."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
        await task
    return None


async def run_all(
    cfg: Config,
    config_args: Sequence[str],
    *,
    progress: bool = True,
    with_assign: bool = True,
) -> int:
    """Crawl cfg.ingest.shards to the end. Returns a process exit code (`ExitCode`): OK when
    every image has a status, INTERRUPTED/TERMINATED after SIGINT/SIGTERM (the workers
    drained; rerunning resumes), TERMINATED when every worker was stopped from outside."""
    sources = expand_sources(cfg.ingest.shards)
    if not sources:
        raise CommandError(ExitCode.USAGE, "no shards given (ingest.shards or arguments)")
    missing = missing_message(sources)
    if missing:
        raise CommandError(ExitCode.NOT_FOUND, missing)
    embedded: EmbeddedRedis | None = None
    if not cfg.redis.url:
        embedded = EmbeddedRedis(Path(cfg.paths.data_dir))
        cfg.redis.url = embedded.start()
        log.info("embedded Redis at %s (AOF in %s)", where(cfg.redis.url), embedded.dir)
    env = dict(os.environ, MMC4_REDIS__URL=cfg.redis.url)
    keys = Keys(cfg.redis.namespace)
    client = connect(cfg)
    signals = StopSignals()
    signals.install()
    stop = signals.event
    supervisor = Supervisor(cfg.worker.processes, config_args, env, cfg.metrics.port)
    assign_task: asyncio.Task[None] | None = None
    assign_stop = asyncio.Event()
    workers_gone = False
    try:
        queue = WorkQueue(client, keys, cfg.queue)
        start = await _unless_stopped(stop, monitor.snapshot(client, keys, history=2))
        if start is None:
            return signals.code or ExitCode.INTERRUPTED
        await _unless_stopped(stop, queue.ensure_group())
        if stop.is_set():
            return signals.code or ExitCode.INTERRUPTED
        supervisor.start()
        if with_assign:
            assign_task = _start_assign(cfg, assign_stop)
        ingest = Ingest(cfg, client)
        ingest_task = asyncio.create_task(ingest.run(sources, stop))
        progress = progress and not logs.json_format()  # JSON logs: no bar between them
        bar = tqdm(total=0, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
        shards = Shards(client, keys, queue, cfg.output_dir)

        async def step() -> bool:
            """One look at the crawl; True when it is finished."""
            if progress:
                _show(bar, await monitor.snapshot(client, keys, history=2))
            if ingest_task.done():
                ingest_task.result()  # re-raise a crash of ingest
                try:
                    await shards.finalize_all()
                except ReportWriteError as exc:  # the workers pause until it can be written
                    log.warning("%s; retrying", exc)
                return await finished(keys, client)
            return False

        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                supervisor.check()
                if supervisor.alive == 0 and not stop.is_set():
                    log.warning("every worker was stopped from outside: stopping")
                    workers_gone = True
                    break
                if await _unless_stopped(stop, step()):
                    break
        finally:
            bar.close()
            if not ingest_task.done():
                ingest_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                    await ingest_task
        interrupted = stop.is_set() or workers_gone
        if interrupted:
            log.warning("stopping: workers drain for up to %.0f s", cfg.worker.grace_period_s)
        await supervisor.stop(cfg.worker.grace_period_s + 10)
        if assign_task is not None:
            await _finish_assign(assign_task, assign_stop, client, keys, stop, interrupted)
        snap: monitor.Snapshot | None = None
        try:  # the final status, unless Redis is unavailable
            async with asyncio.timeout(5.0):
                snap = await monitor.snapshot(client, keys, history=2)
        except TimeoutError:  # an OSError: said before the clause below
            pass
        except (RedisError, OSError) as exc:
            log.warning("no final status: %s", redact(str(exc)))
        st = ingest.stats
        if logs.json_format():  # one JSON object per line on stderr, like every log line
            status_json = snap.to_json() if snap is not None else None
            line = {"level": "INFO", "message": "run ended", "status": status_json,
                    "ingest": dataclasses.asdict(st)}  # fmt: skip
            print(orjson.dumps(line).decode(), file=sys.stderr)
        elif snap is not None:
            print(monitor.render_text(snap), file=sys.stderr)
        _say(
            f"ingest: {st.shards} shards, {st.shards_skipped} skipped, {st.shards_missing} "
            f"missing, {st.shards_known_gaps} known gaps, {st.shards_unreadable} unreadable, "
            f"{st.lines} lines ({st.bad_lines} bad), {st.items} items, "
            f"{st.bad_entries} bad entries, {st.duplicate_names} duplicate names"
        )
        nothing_new = snap is not None and snap.done == start.done
        if not interrupted and st.items == 0 and st.shards_skipped and nothing_new:
            _say(
                f"nothing to do: the {st.shards_skipped} shards given are already reported in "
                f"{cfg.output_dir / '_status'} (`retry --status ...` fetches failures again; "
                "another --output starts a new corpus)"
            )
        if workers_gone:
            return ExitCode.TERMINATED
        return signals.code or ExitCode.OK
    finally:
        await supervisor.stop(5)
        await client.aclose()
        if embedded is not None:
            embedded.stop()


def _say(text: str) -> None:
    """A line of `run`'s closing summary: plain on stderr, or a log line in JSON mode."""
    if logs.json_format():
        log.info("%s", text)
    else:
        print(text, file=sys.stderr)


def _show(bar: Any, snap: monitor.Snapshot) -> None:
    """The bar covers the whole crawl: its total is `Snapshot.total` (an estimate, marked
    ``total~`` in the bar, while shards are still unread; no total while none is read)."""
    bar.total = snap.total
    bar.n = snap.done
    postfix: dict[str, Any] = {}
    if snap.total_is_estimate:
        postfix["total~"] = snap.total if snap.total is not None else "?"
    postfix.update(
        shards=f"{snap.shards_done}/{snap.shards_total}", queued=snap.queued,
        ok=snap.by_status.get(status.OK, 0), failed=snap.done - snap.by_status.get(status.OK, 0),
    )  # fmt: skip
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()


def _start_assign(cfg: Config, stop: asyncio.Event) -> asyncio.Task[None] | None:
    try:
        from assign.worker import run_assign_worker
    except ImportError:
        return None
    return asyncio.create_task(run_assign_worker(cfg, stop=stop))


async def _finish_assign(
    task: asyncio.Task[None],
    assign_stop: asyncio.Event,
    client: Any,
    keys: Keys,
    stop: asyncio.Event,
    interrupted: bool,
) -> None:
    """Let the assignment worker finish the announced shards (unless stopped), then stop it."""
    deadline = time.monotonic() + 600
    while not interrupted and not task.done() and time.monotonic() < deadline:
        if stop.is_set() or await _unless_stopped(stop, _assign_caught_up(client, keys)):
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    assign_stop.set()
    try:
        await asyncio.wait_for(task, timeout=10 if stop.is_set() else 60)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            await task


async def _assign_caught_up(client: Any, keys: Keys) -> bool:
    from redis.exceptions import ResponseError

    from core.keys import ASSIGN_GROUP

    try:
        groups = await client.xinfo_groups(keys.shards_done)
    except ResponseError:
        return True  # no shard was announced
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == ASSIGN_GROUP:
            return int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0
    return False
