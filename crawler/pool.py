# size: both ends of the image processes' socket protocol (loop and child) share its framing
"""The image processes: CPU-heavy jobs run off the event loop, fed by the loop itself.

`ImagePool` keeps one socket pair per child process. The event loop writes each job (a
module-level function and its arguments, pickled, then the response body as raw bytes) to a
child's socket and reads the results through a protocol on the same socket, so no thread
stands between the loop and the children. (`concurrent.futures.ProcessPoolExecutor` moves
every job through a feeder thread, a shared queue under a lock and a manager thread; on the
crawl's hot path those threads cost more of the worker's CPU than its HTTP.)

* Each child holds at most `depth` jobs (one running, the next already in its socket), so a
  child never waits for the loop and one slow image delays at most one other job.
* Jobs wait in FIFO order for a child. Cancelling the awaiting task drops a job that has not
  been sent; a job already sent runs to its end and its result is discarded.
* A child that dies (killed, out of memory, a crash in a decoder) fails the jobs it held with
  `ImageProcessDied` and is replaced; the other children and the waiting jobs carry on.
* A child whose parent dies sees its socket close and exits.
* With `job_timeout_s`, a job that runs longer (a hung or runaway decoder) fails with
  `ImageJobTimeout`; its process is killed and replaced, and the jobs queued behind it in
  that process go back to the front of the waiting line (they had not started).

Children come from a fork server that has imported `preload` once, and run `initializer`
before their first job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import pickle
import signal
import socket
import struct
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from core.config import Config
from crawler import images

log = logging.getLogger(__name__)
_R = TypeVar("_R")
_HEAD = struct.Struct("!I")  # a result: its pickle's length
_JOB_HEAD = struct.Struct("!IQ")  # a job: its pickle's length, then its data's
_SOCKET_BUFFER = 1 << 20  # a whole typical body per send: fewer wake-ups on both sides
_READY = -1  # the job number of a child's first message: initialised, or why not
_START_TIMEOUT_S = 60.0  # a process that has not initialised by then is killed (and retried)


class ImageProcessDied(RuntimeError):
    """The process running a job exited before answering."""


class ImageJobError(RuntimeError):
    """A job raised in its process; the message names the exception."""


class ImageJobTimeout(RuntimeError):
    """A job ran longer than the pool's job_timeout_s; its process was killed."""


_Job = tuple[int, Callable[..., Any], tuple[Any, ...], "bytes | None", "asyncio.Future[Any]"]


class _Child:
    """One image process (replaced when it dies) and the jobs it holds."""

    def __init__(self, pool: ImagePool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.transport: asyncio.Transport | None = None
        # Jobs sent and not answered, in the order the process runs them.
        self.held: dict[int, _Job] = {}
        self.since = 0.0  # when the first held job started (time.monotonic)
        self.alive = False  # connected and initialised: jobs may be sent
        self.ready: asyncio.Future[None] | None = None

    def answer(self, message: tuple[int, bool, Any]) -> None:
        job, ok, value = message
        if job == _READY:
            assert self.ready is not None
            if ok:
                self.alive = True
                self.ready.set_result(None)
            else:
                self.ready.set_exception(ImageJobError(f"image process could not start: {value}"))
            return
        sent = self.held.pop(job, None)
        self.since = time.monotonic()  # the next held job starts now
        if sent is not None and not sent[4].done():
            if ok:
                sent[4].set_result(value)
            else:
                sent[4].set_exception(ImageJobError(value))
        self.pool._dispatch(self)

    def lost(self) -> None:
        self.alive = False
        self.transport = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ImageProcessDied("image process exited while starting"))
            return  # the one starting it reports this
        self.pool._child_lost(self)


class _Link(asyncio.Protocol):
    """The worker's end of one process's socket: framed results in, `lost` when it closes.
    A full socket needs no pausing: `depth` bounds what the transport buffers per child."""

    def __init__(self, child: _Child) -> None:
        self.child: _Child | None = child
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.child is not None:  # uvloop's transports do not subclass asyncio.Transport
            self.child.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start = 0
        while self.child is not None and len(buf) - start >= _HEAD.size:
            (size,) = _HEAD.unpack_from(buf, start)
            end = start + _HEAD.size + size
            if len(buf) < end:
                break
            self.child.answer(pickle.loads(buf[start + _HEAD.size : end]))
            start = end
        del buf[:start]

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.child is not None:
            self.child.lost()
            self.child = None


class ImagePool:
    """`size` image processes fed by the running event loop (see the module docstring)."""

    def __init__(
        self,
        size: int,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[object] = (),
        preload: Sequence[str] = (),
        depth: int = 2,
        cpus: Sequence[int] = (),
        job_timeout_s: float = 0.0,
    ) -> None:
        """`cpus`: pin process i to CPU cpus[i % len(cpus)] (none given: no pinning).
        `job_timeout_s` > 0: the longest one job may run (see the module docstring)."""
        if size < 1 or depth < 1:
            raise ValueError("an image pool needs at least one process and a depth of one")
        self.size = size
        self.depth = depth
        self.restarts = 0
        self.timeouts = 0  # jobs failed with ImageJobTimeout
        self.job_timeout_s = job_timeout_s
        self._watchdog: asyncio.Task[None] | None = None
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._cpus = tuple(cpus)
        self._ctx = multiprocessing.get_context("forkserver")
        if preload:
            self._ctx.set_forkserver_preload(list(preload))
        self._children: list[_Child] = []
        # Jobs not yet sent: pickled only when sent, so a waiting body exists once in memory.
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs = itertools.count()
        self._closing = False
        self._restarting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every process and wait until each has run the initializer; raises
        ImageJobError (or ImageProcessDied) when one cannot start."""
        for index in range(self.size):
            child = _Child(self, index)
            self._children.append(child)
            await self._spawn(child)
        if self.job_timeout_s > 0:
            self._watchdog = asyncio.ensure_future(self._watch())

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None and c.proc.pid]

    async def run(self, fn: Callable[..., _R], *args: Any, data: bytes | None = None) -> _R:
        """Run fn(*args) in an image process, or fn(data, *args) when `data` is given (sent as
        raw bytes, not pickled: the way for a response body). fn must be importable by module
        and name."""
        if self._closing:
            raise RuntimeError("the image pool is closed")
        fut: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((next(self._jobs), fn, args, data, fut))
        child = min(self._children, key=lambda c: len(c.held) if c.alive else self.depth)
        self._dispatch(child)
        return await fut

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every process now: jobs still held or waiting fail with ImageProcessDied."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._restarting):
            task.cancel()
        for child in self._children:
            if child.transport is not None:
                child.transport.close()
            if child.proc is not None and child.proc.is_alive():
                child.proc.terminate()
        procs = [c.proc for c in self._children if c.proc is not None]
        await asyncio.to_thread(_reap, procs, timeout_s)
        self._fail_waiting()

    # ---- internals ---------------------------------------------------------------------------
    def _dispatch(self, child: _Child) -> None:
        """Send waiting jobs to `child` while it has room."""
        while child.alive and len(child.held) < self.depth and self._waiting:
            sent = self._waiting.popleft()
            job, fn, args, data, fut = sent
            if fut.done():  # cancelled while waiting
                continue
            try:
                meta = pickle.dumps((job, fn, args, data is not None), pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # an argument that cannot cross processes
                fut.set_exception(ImageJobError(f"cannot send the job: {exc}"))
                continue
            if not child.held:
                child.since = time.monotonic()
            child.held[job] = sent
            assert child.transport is not None
            size = 0 if data is None else len(data)
            child.transport.writelines((_JOB_HEAD.pack(len(meta), size), meta, data or b""))

    async def _spawn(self, child: _Child) -> None:
        parent_end, child_end = socket.socketpair()
        for end in (parent_end, child_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        proc = self._ctx.Process(
            target=_child_main,
            args=(child_end, self._initializer, self._initargs, self._cpu_of(child)),
            name=f"image-{child.index}",
            daemon=True,
        )
        try:
            await asyncio.to_thread(proc.start)
        finally:
            child_end.close()
        child.proc = proc
        parent_end.setblocking(False)
        loop = asyncio.get_running_loop()
        child.ready = loop.create_future()
        link = _Link(child)
        await loop.create_unix_connection(lambda: link, sock=parent_end)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await child.ready
        except BaseException:
            link.child = None  # this start failed: the caller decides what comes next
            if child.transport is not None:
                child.transport.close()
                child.transport = None
            await asyncio.to_thread(_reap, [proc], 5.0)
            raise
        self._dispatch(child)

    def _cpu_of(self, child: _Child) -> int | None:
        return self._cpus[child.index % len(self._cpus)] if self._cpus else None

    def _child_lost(self, child: _Child) -> None:
        held, child.held = child.held, {}
        code = child.proc.exitcode if child.proc is not None else None
        why = "the image pool closed" if self._closing else f"image process {child.index} died"
        for *_job, fut in held.values():
            if not fut.done():
                fut.set_exception(ImageProcessDied(f"{why} (exit code {code})"))
        if self._closing:
            return
        log.warning("image process %d exited (code %s); starting another", child.index, code)
        task = asyncio.ensure_future(self._replace(child))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _watch(self) -> None:
        """Kill the process of any job that has run longer than job_timeout_s."""
        tick = min(1.0, self.job_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for child in self._children:
                if child.alive and child.held and now - child.since > self.job_timeout_s:
                    self._overrun(child)

    def _overrun(self, child: _Child) -> None:
        held, child.held = list(child.held.values()), {}
        child.alive = False  # nothing more is sent to it; `lost` follows the kill
        running, queued = held[0], held[1:]
        self.timeouts += 1
        log.warning(
            "image job ran longer than %.1fs: killing image process %d",
            self.job_timeout_s, child.index,
        )  # fmt: skip
        if not running[4].done():
            running[4].set_exception(
                ImageJobTimeout(f"image work took longer than {self.job_timeout_s:g}s")
            )
        self._waiting.extendleft(reversed(queued))  # not started: first in line again
        if child.proc is not None and child.proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)
        for other in self._children:
            self._dispatch(other)

    async def _replace(self, child: _Child) -> None:
        if child.proc is not None:
            await asyncio.to_thread(_reap, [child.proc], 5.0)
        delay = 0.1
        while not self._closing:
            try:
                await self._spawn(child)
            except (OSError, ImageJobError, ImageProcessDied) as exc:  # retry, slower each time
                # (TimeoutError, from a process that never initialised, is an OSError)
                log.error("cannot start an image process (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.restarts += 1
            return

    def _fail_waiting(self) -> None:
        while self._waiting:
            *_job, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(ImageProcessDied("the image pool closed"))


def available_cpus(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container started with --cpus=2 on a 64-core host gets 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = Path(cgroup_cpu_max).read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return cpus


def pinned_cpus(processes: int, allowed: set[int], quota_cpus: int) -> list[int]:
    """CPUs to pin image processes to, round robin: the allowed ones, when the processes cover
    them all and no CPU quota narrower than the mask applies; else none (no pinning)."""
    if processes < len(allowed) or quota_cpus < len(allowed):
        return []
    return sorted(allowed)


def image_pool(cfg: Config) -> ImagePool:
    """The crawl worker's image processes: `worker.image_processes` of them (0: one per CPU
    this process may use), pinned as `pinned_cpus` says when `worker.pin_image_processes`."""
    usable = available_cpus()
    size = cfg.worker.image_processes or usable
    cpus: list[int] = []
    if cfg.worker.pin_image_processes and hasattr(os, "sched_getaffinity"):
        cpus = pinned_cpus(size, os.sched_getaffinity(0), usable)
    # The fork server imports Pillow and libmagic once; every image process forked from it
    # starts with them loaded instead of importing them itself.
    return ImagePool(
        size,
        initializer=images.init_worker,
        initargs=images.init_args(cfg),
        preload=["crawler.store"],
        cpus=cpus,
        job_timeout_s=cfg.images.job_timeout_s,
    )


def _reap(procs: list[multiprocessing.process.BaseProcess], timeout_s: float) -> None:
    """Join processes (blocking): after timeout_s, kill what is left."""
    for proc in procs:
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def _child_main(
    sock: socket.socket,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    cpu: int | None,
) -> None:
    """An image process: answer jobs from `sock` until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if initializer is not None:
            initializer(*initargs)
    except Exception as exc:
        _send(sock, (_READY, False, f"{type(exc).__name__}: {exc}"[:500]))
        return
    _send(sock, (_READY, True, None))
    reader = sock.makefile("rb", buffering=_SOCKET_BUFFER)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while True:
            head = reader.read(_JOB_HEAD.size)
            if len(head) < _JOB_HEAD.size:
                return  # the worker closed the pool, or died
            meta_size, data_size = _JOB_HEAD.unpack(head)
            job, fn, args, with_data = pickle.loads(reader.read(meta_size))
            if with_data:
                args = (reader.read(data_size), *args)
            try:
                answer = (job, True, fn(*args))
            except Exception as exc:
                answer = (job, False, f"{type(exc).__name__}: {exc}"[:500])
            _send(sock, answer)


def _send(sock: socket.socket, message: tuple[int, bool, Any]) -> None:
    out = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEAD.pack(len(out)) + out)
