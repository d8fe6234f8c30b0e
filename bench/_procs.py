"""Process accounting for the crawl benchmark: CPU of whole process trees, RSS sampling.

CPU: the benchmark makes itself a *child subreaper* (Linux ``PR_SET_CHILD_SUBREAPER``), so
processes orphaned inside a measured run (the crawler's forkserver image pool, whose parent
shuts it down with ``wait=False``; img2dataset's pool) are re-parented to the benchmark and
reaped by it. Their user+sys time then lands in ``getrusage(RUSAGE_CHILDREN)`` like that of
any waited-for child, so a delta around "run + reap" is the CPU of the whole tree. Long-lived
helpers (the image web, the Redis server) are not reaped during a run and so never enter
that delta; they are measured from ``/proc`` via psutil instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu_s(pid: int) -> float:
    """user+sys of a live process (all its threads; not its children)."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def reap_orphans(keep: Iterable[int], timeout: float = 30.0) -> int:
    """Wait for every child of ours except ``keep`` (orphans re-parented to us); kill laggards."""
    keep = set(keep)
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    reaped = 0
    while True:
        kids = [c.pid for c in me.children(recursive=False) if c.pid not in keep]
        if not kids:
            return reaped
        for pid in kids:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    reaped += 1
        if time.monotonic() > deadline:
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


@dataclass
class TreeSampler:
    """Samples the RSS of a process tree every ``interval`` seconds in a thread.

    ``classify(proc) -> str | None`` names the role of each descendant (None: ignore).
    Keeps the peak RSS per pid and role, and (``series``) a time series of per-role maxima.
    """

    root: int
    classify: Callable[[psutil.Process], str | None]
    interval: float = 0.5
    series_every: float = 0.0
    extra: Callable[[], dict[str, float]] | None = None
    peak: dict[tuple[str, int], int] = field(default_factory=dict)
    # user+sys CPU seconds of each process at its last sample (a process that exits between
    # samples loses at most one interval)
    cpu: dict[tuple[str, int], float] = field(default_factory=dict)
    sys_cpu: dict[tuple[str, int], float] = field(default_factory=dict)  # the kernel's part
    series: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _roles: dict[int, str | None] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def start(self) -> TreeSampler:
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def pids(self, role: str) -> list[int]:
        return [pid for pid, r in self._roles.items() if r == role]

    def _sample(self) -> dict[str, int]:
        now: dict[str, int] = {}
        try:
            procs = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return now
        for p in procs:
            try:
                if p.pid not in self._roles:
                    self._roles[p.pid] = self.classify(p)
                role = self._roles[p.pid]
                if role is None:
                    continue
                rss = p.memory_info().rss
                times = p.cpu_times()
            except psutil.Error:
                continue
            key = (role, p.pid)
            self.cpu[key] = times.user + times.system
            self.sys_cpu[key] = times.system
            self.peak[key] = max(self.peak.get(key, 0), rss)
            now[role] = max(now.get(role, 0), rss)
        return now

    def _run(self) -> None:
        last_series = -1e9
        while not self._stop.is_set():
            now = self._sample()
            t = time.monotonic() - self.t0
            if self.series_every and t - last_series >= self.series_every and now:
                last_series = t
                row: dict[str, float] = {"t": t, **{k: float(v) for k, v in now.items()}}
                if self.extra is not None:
                    with contextlib.suppress(Exception):
                        row.update(self.extra())
                self.series.append(row)
            self._stop.wait(self.interval)

    def peak_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (role, _), rss in self.peak.items():
            out[role] = max(out.get(role, 0), rss)
        return out

    def cpu_by_role(self, kernel_only: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for (role, _), seconds in (self.sys_cpu if kernel_only else self.cpu).items():
            out[role] = out.get(role, 0.0) + seconds
        return out

    def count_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for role, _ in self.peak:
            out[role] = out.get(role, 0) + 1
        return out
