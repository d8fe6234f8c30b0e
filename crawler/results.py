"""The crawl worker's results on their way to Redis.

A finished item's `Result` waits in memory until Redis has taken it: one RECORD call per
batch of `worker.flush_batch`, at least every `worker.flush_interval_s`, so a Redis restart
loses nothing. A shard that a batch completes gets its report (`crawler.shards`). Items the
output refused go back to the queue with the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import RedisError

from core.config import WorkerConfig
from core.connection import RedisRetry
from crawler.entries import Item, Result
from crawler.output import Output
from crawler.queue import WorkQueue
from crawler.shards import ReportWriteError, Shards

log = logging.getLogger(__name__)


class Results:
    """The results and handed-back items of one worker, until Redis has taken them.

    `settled(ids)` is told of every item Redis has taken (recorded or handed back): the
    worker holds it no more; `on_redis_call` of every RECORD round trip."""

    def __init__(
        self,
        cfg: WorkerConfig,
        queue: WorkQueue,
        shards: Shards,
        output: Output,
        *,
        settled: Callable[[Iterable[str]], None],
        on_redis_call: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.shards = shards
        self.output = output
        self.settled = settled
        self.on_redis_call = on_redis_call
        self.waiting: list[Result] = []
        self.to_hand_back: list[Item] = []  # fetched, but the output refused them
        self.due = asyncio.Event()  # a batch is full, or items wait to be handed back

    def add(self, result: Result) -> None:
        self.waiting.append(result)
        if len(self.waiting) >= self.cfg.flush_batch:
            self.due.set()

    def hand_back(self, item: Item) -> None:
        """Return `item` to the queue with the next flush (the output refused it)."""
        self.to_hand_back.append(item)
        self.due.set()

    async def flush_once(self) -> None:
        """One iteration of the flush loop: wait until a batch is due, then flush."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.due.wait(), self.cfg.flush_interval_s)
        self.due.clear()
        await self.flush()

    async def flush(self) -> None:
        """Hand back what the output refused, record every waiting result (raises while
        Redis is away: what it has not taken stays here)."""
        if self.to_hand_back:
            back = list(self.to_hand_back)
            await self.queue.hand_back(back)
            del self.to_hand_back[: len(back)]
            self.settled(item.id for item in back)
            log.warning("handed back %d items: the output cannot be written", len(back))
        while self.waiting:
            batch = self.waiting[: self.cfg.flush_batch]
            completed = await self.queue.record(batch)
            self.on_redis_call()
            del self.waiting[: len(batch)]
            self.settled(item_id for item_id, *_ in batch)
            for shard in completed:
                task = asyncio.ensure_future(self._finalize(shard))
                task.add_done_callback(_log_task_error)

    async def final_flush(self, within_s: float, stop: asyncio.Event) -> None:
        """Flush what waits, riding out a Redis outage for at most `within_s` (or until
        `stop`); what Redis did not take is logged, and its items are redelivered."""
        if self.waiting:
            retry = RedisRetry("final flush", base_s=0.5, cap_s=0.5, give_up_after_s=within_s)
            with contextlib.suppress(RedisError, OSError):
                await retry.call(self.flush, stop=stop)
        if self.waiting:
            log.error("%d results not recorded (Redis unreachable); items will be redelivered",
                      len(self.waiting))  # fmt: skip

    async def _finalize(self, shard: str) -> None:
        try:
            await self.shards.finalize(shard)
        except ReportWriteError as exc:
            self.output.block(str(exc))  # the shard stays complete: written once it can be


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("background task failed: %s", "".join(traceback.format_exception(exc)[-3:]))
