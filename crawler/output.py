"""Whether the crawl worker's output can be written now, and its leftover temporary files.

When the output refuses an image file or a shard report for a reason of its own (full,
read-only, not permitted), the worker is paused: it takes no work until a probe (a file
written and removed in the report directory, every few seconds) finds the output writable
again. Readiness, the heartbeat and `status` say why it is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path

from core import status
from core.storage import Storage
from crawler.store import Store, output_problem, sweep_temporary

log = logging.getLogger(__name__)
PROBE_EVERY_S = 5.0  # while the output cannot be written: seconds between probes
SWEEP_EVERY_S = 600.0


class Output:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.blocked = ""  # why the output cannot be written ("" when it can)
        self._writable = asyncio.Event()
        self._writable.set()
        self._probed = False
        self._last_sweep = -math.inf  # sweep on the first pass: monotonic time starts at boot

    @property
    def storage(self) -> Storage:
        return self.store.storage

    def block(self, reason: str) -> None:
        if not self.blocked:
            log.error("output cannot be written (%s): taking no work until it can", reason)
        self.blocked = reason
        self._writable.clear()

    async def probe(self) -> bool:
        """While the output is blocked (and once at start): is it writable again? True when
        it has just become writable again."""
        if not self.blocked and self._probed:
            return False
        self._probed = True
        problem = await asyncio.to_thread(output_problem, self.storage)
        if problem:
            self.block(problem)
            return False
        if not self.blocked:
            return False
        log.warning("output can be written again: taking work")
        self.blocked = ""
        self._writable.set()
        return True

    async def wait_writable(self, timeout_s: float) -> None:
        """Until the output is writable, or at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._writable.wait(), timeout_s)

    async def sweep_when_due(self) -> None:
        """Every SWEEP_EVERY_S: remove temporary files that killed or failed writers left."""
        if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            await asyncio.to_thread(self._sweep)

    def _sweep(self) -> None:
        if self.store.remote:
            return  # (an object is one PUT: no temporary files)
        out = Path(self.store.output)
        if out.is_dir():
            for shard_dir in out.iterdir():
                if (
                    shard_dir.is_dir()
                    and not shard_dir.is_symlink()
                    and shard_dir.name[:1] not in "_."
                ):
                    sweep_temporary(shard_dir)
            # temporary reports and summaries of writers that were killed or failed
            # (`.tmp-*` and `.<name>.<pid>.tmp` files)
            sweep_temporary(out / status.STATUS_DIR)
            sweep_temporary(out / status.STATUS_DIR, pattern=".*.tmp")
