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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError
from tqdm import tqdm

from core import logs, status
from core.config import Config
from core.connection import connected
from core.embedded import EmbeddedRedis, where
from core.errors import CommandError, redact
from core.exitcodes import ExitCode
from core.keys import Keys
from core.runtime import StopSignals, failure, unless_stopped
from core.storage import output_storage
from core.tasks import cancel_and_wait
from crawler import monitor
from crawler.ingest import Ingest
from crawler.queue import WorkQueue
from crawler.shards import ReportWriteError, Shards
from crawler.sources import expand_sources, missing_message

log = logging.getLogger(__name__)


def worker_command(config_args: Sequence[str], *extra: str) -> list[str]:
    """A worker that stops when this process dies (a killed `run` leaves no workers behind)."""
    return [
        sys.executable, "-m", "crawler", *config_args, *extra,
        "worker", "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


# Exit codes of a worker that a restart would not change: its configuration or its port.
_NOT_RESTARTED = (ExitCode.USAGE, ExitCode.ADDRESS_IN_USE)
_RESTART_PAUSE_S = 0.5  # between a worker's failure and its restart


class Supervisor:
    """Keeps N worker processes alive until `stop`, each watched by a task of its own.

    Each worker runs in a session of its own, so a Ctrl-C in the terminal reaches `run`
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
        self.procs: list[asyncio.subprocess.Process | None] = [None] * n
        self.restarts = 0
        self._slots: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._slots = [asyncio.create_task(self._keep(i)) for i in range(self.n)]

    async def _keep(self, i: int) -> None:
        """Worker i, restarted after each failure, until it exits 0 (or is cancelled)."""
        extra = ["--set", f"metrics.port={self.metrics_port + i}"] if self.metrics_port else []
        while True:
            proc = await asyncio.create_subprocess_exec(
                *worker_command(self.config_args, *extra), env=self.env, start_new_session=True
            )
            self.procs[i] = proc
            code = await proc.wait()
            if code == 0:
                log.warning("worker pid %d stopped (exit 0); not restarted", proc.pid)
                return
            if code in _NOT_RESTARTED:  # it would fail again the same way
                raise CommandError(
                    ExitCode(code),
                    f"worker {i} exited with code {code} ("
                    f"{ExitCode(code).name.lower().replace('_', ' ')}): see its error above",
                )
            log.warning("worker pid %d exited with %s; restarting", proc.pid, code)
            self.restarts += 1
            await asyncio.sleep(_RESTART_PAUSE_S)

    @property
    def alive(self) -> int:
        """Workers running or about to be restarted."""
        return sum(1 for slot in self._slots if not slot.done())

    def check(self) -> None:
        """Raise what ended a worker for good (an exit code a restart would not change)."""
        for slot in self._slots:
            exc = failure(slot)
            if exc is not None:
                raise exc

    async def stop(self, timeout: float) -> None:
        """No more restarts; one SIGTERM to each worker (a graceful drain); SIGKILL what is
        left after `timeout` seconds."""
        await cancel_and_wait(self._slots)
        running = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=timeout)
        for proc in running:
            if proc.returncode is None:
                log.error("worker pid %d did not stop within %.0f s; killing it", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


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
    """Crawl cfg.ingest.shards to the end. Returns a process exit code (`ExitCode`): OK when
    every image has a status, INTERRUPTED/TERMINATED after SIGINT/SIGTERM (the workers
    drained; rerunning resumes), TERMINATED when every worker was stopped from outside."""
    sources = expand_sources(cfg.ingest.shards)
    if not sources:
        raise CommandError(ExitCode.USAGE, "no shards given (ingest.shards or arguments)")
    missing = missing_message(sources)
    if missing:
        raise CommandError(ExitCode.NOT_FOUND, missing)
    with StopSignals() as signals:
        embedded: EmbeddedRedis | None = None
        if not cfg.redis.url:
            embedded = EmbeddedRedis(Path(cfg.paths.data_dir))
            cfg.redis.url = embedded.start()
            log.info("embedded Redis at %s (AOF in %s)", where(cfg.redis.url), embedded.dir)
        try:
            async with connected(cfg) as client:
                crawl = Crawl(cfg, client, config_args, signals.event)
                try:
                    code = await crawl.run(sources, progress=progress, with_assign=with_assign)
                finally:
                    await crawl.supervisor.stop(5)
        finally:
            if embedded is not None:
                embedded.stop()
    return code or signals.code or ExitCode.OK


class Crawl:
    """One `run` on a connected Redis: ingest, the supervised workers and the assignment
    companion, watched until the crawl is finished or `stop` is set."""

    def __init__(
        self, cfg: Config, client: Any, config_args: Sequence[str], stop: asyncio.Event
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.stop = stop
        self.keys = Keys(cfg.redis.namespace)
        self.queue = WorkQueue(client, self.keys, cfg.queue)
        self.ingest = Ingest(cfg, client)
        self.storage = output_storage(cfg)
        env = dict(os.environ, MMC4_REDIS__URL=cfg.redis.url)
        self.supervisor = Supervisor(cfg.worker.processes, config_args, env, cfg.metrics.port)

    async def run(self, sources: list[Any], *, progress: bool, with_assign: bool) -> int:
        """The crawl to its end or its stop: OK, or TERMINATED when every worker was stopped
        from outside (a stop by a signal is OK here: the caller knows the signal)."""
        start = await unless_stopped(self._snapshot(), self.stop)
        if start is None:
            return ExitCode.OK
        await unless_stopped(self.queue.ensure_group(), self.stop)
        if self.stop.is_set():
            return ExitCode.OK
        self.supervisor.start()
        assign_stop = asyncio.Event()
        assign_task = _start_assign(self.cfg, assign_stop) if with_assign else None
        ingest_task = asyncio.create_task(self.ingest.run(sources, self.stop))
        try:
            workers_gone = await self._watch(ingest_task, progress)
        finally:
            await cancel_and_wait([ingest_task])
        interrupted = self.stop.is_set() or workers_gone
        if interrupted:
            log.warning("stopping: workers drain for up to %.0f s", self.cfg.worker.grace_period_s)
        await self.supervisor.stop(self.cfg.worker.grace_period_s + 10)
        if assign_task is not None:
            await self._finish_assign(assign_task, assign_stop, interrupted)
        self._summarize(start, await self._final_snapshot(), interrupted)
        return ExitCode.TERMINATED if workers_gone else ExitCode.OK

    async def _snapshot(self) -> monitor.Snapshot:
        return await monitor.snapshot(self.client, self.keys, history=2)

    async def _watch(self, ingest_task: asyncio.Task[None], progress: bool) -> bool:
        """Look at the crawl every half second until it is finished or stopped; True when
        every worker was stopped from outside."""
        progress = progress and not logs.json_format()  # JSON logs: no bar between them
        bar = tqdm(total=0, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
        try:
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)
                self.supervisor.check()
                if self.supervisor.alive == 0 and not self.stop.is_set():
                    log.warning("every worker was stopped from outside: stopping")
                    return True
                if await unless_stopped(
                    self._step(ingest_task, bar if progress else None), self.stop
                ):
                    return False
            return False
        finally:
            bar.close()

    async def _step(self, ingest_task: asyncio.Task[None], bar: Any) -> bool:
        """One look at the crawl; True when it is finished."""
        if bar is not None:
            _show(bar, await self._snapshot())
        if not ingest_task.done():
            return False
        ingest_task.result()  # re-raise a crash of ingest
        try:
            await Shards(self.client, self.keys, self.queue, self.storage).finalize_all()
        except ReportWriteError as exc:  # the workers pause until it can be written
            log.warning("%s; retrying", exc)
        return await finished(self.keys, self.client)

    async def _final_snapshot(self) -> monitor.Snapshot | None:
        """The final status, unless Redis is unavailable."""
        try:
            async with asyncio.timeout(5.0):
                return await self._snapshot()
        except TimeoutError:  # an OSError: said before the clause below
            return None
        except (RedisError, OSError) as exc:
            log.warning("no final status: %s", redact(str(exc)))
            return None

    def _summarize(
        self, start: monitor.Snapshot, snap: monitor.Snapshot | None, interrupted: bool
    ) -> None:
        """`run`'s closing summary on stderr: the final status and what ingest did."""
        st = self.ingest.stats
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
                f"{self.storage.url(status.STATUS_DIR)} (`retry --status ...` fetches failures "
                "again; another --output starts a new corpus)"
            )

    async def _finish_assign(
        self, task: asyncio.Task[None], assign_stop: asyncio.Event, interrupted: bool
    ) -> None:
        """Let the assignment worker finish the announced shards (unless stopped), then stop
        it."""
        deadline = time.monotonic() + 600
        while not interrupted and not task.done() and time.monotonic() < deadline:
            caught_up = await unless_stopped(_assign_caught_up(self.client, self.keys), self.stop)
            if self.stop.is_set() or caught_up:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
        assign_stop.set()
        try:
            await asyncio.wait_for(task, timeout=10 if self.stop.is_set() else 60)
        except TimeoutError:
            await cancel_and_wait([task])


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
