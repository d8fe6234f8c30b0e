"""The work queue: a Redis stream with one consumer group, leases, reclaim and dead letters.

At-least-once: an item stays in the stream's pending list until its result is recorded. A
worker renews the leases of what it holds (XCLAIM JUSTID, which does not count as a delivery);
an item whose lease is older than ``lease_timeout_s`` is claimed by another worker; an item
delivered ``max_deliveries`` times without a result becomes a dead letter with a terminal
``dead_letter`` record. Results are recorded with HSETNX, so an item processed twice still
gets exactly one record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from crawler import status
from crawler.config import QueueConfig
from crawler.keys import CRAWL_GROUP, Keys
from crawler.scripts import Scripts

# (stream id, shard, image_name, record JSON, status, stored bytes)
Result = tuple[str, str, str, bytes, str, int]


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    shard: str
    name: str
    url: str


def encode_result(item_id: str, shard: str, name: str, rec: dict[str, Any]) -> Result:
    return (item_id, shard, name, status.encode(rec), str(rec["status"]), int(rec["bytes"]))


def text(value: Any) -> str:
    """A Redis reply value as str (replies are bytes: the clients do not decode)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


_s = text


def _item(entry_id: Any, fields: dict[Any, Any]) -> Item:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return Item(_s(entry_id), f.get("s", ""), f.get("n", ""), f.get("u", ""))


class WorkQueue:
    def __init__(self, client: aioredis.Redis, keys: Keys, cfg: QueueConfig) -> None:
        self.client = client
        self.keys = keys
        self.cfg = cfg
        self.scripts = Scripts(client)

    # ---- producing -------------------------------------------------------------------
    async def add_to(self, pipe: Pipeline, shard: str, items: Sequence[tuple[str, str]]) -> None:
        """Queue one ENQUEUE call in a pipeline: a stream entry for each (image_name, raw_url)
        of a shard, in order (nothing for no items)."""
        if not items:
            return
        args = [shard]
        for name, url in items:
            args += (name, url)
        await self.scripts.enqueue(keys=[self.keys.queue], args=args, client=pipe)

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.keys.queue, CRAWL_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def depth(self) -> int:
        """Items waiting or leased (stream length) plus deferred ones."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.keys.queue)
        pipe.zcard(self.keys.deferred)
        queued, deferred = await pipe.execute()
        return int(queued) + int(deferred)

    async def seal(self, shard: str, total: int) -> bool:
        done = await self.scripts.seal(
            keys=[self.keys.shard_meta(shard), self.keys.shards_complete], args=[shard, total]
        )
        return bool(done)

    # ---- results ---------------------------------------------------------------------
    def _record_call(self, results: Sequence[Result]) -> tuple[list[str], list[Any]]:
        keys = [self.keys.queue, self.keys.counts, self.keys.errors, self.keys.shards_complete]
        args: list[Any] = [CRAWL_GROUP]
        for item_id, shard, name, rec, st, nbytes in results:
            keys += [self.keys.shard_meta(shard), self.keys.shard_records(shard)]
            args += [item_id, shard, name, rec, st, nbytes]
        return keys, args

    async def record(self, results: Sequence[Result]) -> list[str]:
        """Record results in one round trip; returns the shards this completed."""
        if not results:
            return []
        keys, args = self._record_call(results)
        done = await self.scripts.record(keys=keys, args=args)
        return [_s(s) for s in done or []]

    async def record_to(self, pipe: Pipeline, results: Sequence[Result]) -> None:
        """Queue a RECORD call in a pipeline (executed with it)."""
        keys, args = self._record_call(results)
        await self.scripts.record(keys=keys, args=args, client=pipe)

    # ---- consuming -------------------------------------------------------------------
    async def read(self, consumer: str, count: int, block_ms: int) -> list[Item]:
        reply: Any = await self.client.xreadgroup(
            CRAWL_GROUP, consumer, {self.keys.queue: ">"}, count=count, block=block_ms
        )
        items: list[Item] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields:  # an entry deleted while pending comes back empty
                    items.append(_item(entry_id, fields))
        return items

    async def renew(self, consumer: str, ids: Sequence[str]) -> None:
        """Reset the lease clock of held items (JUSTID: not counted as a delivery)."""
        for start in range(0, len(ids), 1000):
            await self.client.xclaim(
                self.keys.queue,
                CRAWL_GROUP,
                consumer,
                0,
                list(ids[start : start + 1000]),
                justid=True,
            )

    async def note_error(self, item_id: str, error: str) -> None:
        await self.client.hset(self.keys.errors, item_id, error[:500])

    async def reclaim(self, consumer: str, limit: int) -> tuple[list[Item], int]:
        """Claim items whose lease expired; dead-letter those delivered too often.

        Returns (claimed items, number dead-lettered).
        """
        idle_ms = int(self.cfg.lease_timeout_s * 1000)
        pending: Any = await self.client.xpending_range(
            self.keys.queue, CRAWL_GROUP, min="-", max="+", count=limit, idle=idle_ms
        )
        if not pending:
            return [], 0
        to_claim = [
            p["message_id"] for p in pending if p["times_delivered"] < self.cfg.max_deliveries
        ]
        to_bury = {
            _s(p["message_id"]): int(p["times_delivered"])
            for p in pending
            if p["times_delivered"] >= self.cfg.max_deliveries
        }
        claimed: list[Item] = []
        if to_claim:
            entries: Any = await self.client.xclaim(
                self.keys.queue, CRAWL_GROUP, consumer, idle_ms, to_claim
            )
            claimed = [_item(i, f) for i, f in entries if f]
            empty = [_s(i) for i, f in entries if not f]
            if empty:  # deleted entries: nothing left to do for them
                await self._drop(empty)
        buried = await self._bury(to_bury) if to_bury else 0
        return claimed, buried

    async def _drop(self, ids: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.queue, CRAWL_GROUP, *ids)
        pipe.xdel(self.keys.queue, *ids)
        await pipe.execute()

    async def _bury(self, deliveries: dict[str, int]) -> int:
        results: list[Result] = []
        dead_entries: list[dict[Any, Any]] = []
        errors = await self.client.hmget(self.keys.errors, list(deliveries))
        for (item_id, times), err in zip(deliveries.items(), errors, strict=True):
            entries: Any = await self.client.xrange(self.keys.queue, item_id, item_id)
            if not entries:
                await self._drop([item_id])
                continue
            item = _item(*entries[0])
            reason = _s(err) if err else "lease expired (worker died or hung)"
            text = f"dead letter after {times} deliveries: {reason}"
            rec = status.make_record(
                item.name, item.url, status.DEAD_LETTER, error=text, attempts=times
            )
            results.append(encode_result(item_id, item.shard, item.name, rec))
            dead_entries.append(
                {"s": item.shard, "n": item.name, "u": item.url, "reason": text, "t": time.time()}
            )
        if not results:
            return 0
        pipe = self.client.pipeline(transaction=True)
        await self.record_to(pipe, results)
        for entry in dead_entries:
            pipe.xadd(self.keys.dead, entry, maxlen=self.cfg.dead_letter_maxlen, approximate=True)
        await pipe.execute()
        return len(results)

    # ---- handing back ----------------------------------------------------------------
    async def hand_back(self, items: Sequence[Item]) -> None:
        """Return held items to the queue at once (graceful shutdown)."""
        for start in range(0, len(items), 500):
            args: list[Any] = [CRAWL_GROUP]
            for it in items[start : start + 500]:
                args += [it.id, it.shard, it.name, it.url]
            await self.scripts.hand_back(keys=[self.keys.queue], args=args)

    async def defer(self, items: Sequence[Item], due_s: float) -> None:
        """Move items out of the stream until due_s seconds from now (busy host)."""
        if not items:
            return
        args: list[Any] = [CRAWL_GROUP, int(due_s * 1000)]
        for i in items:
            args += [i.id, f"{i.shard}\n{i.name}\n{i.url}"]
        await self.scripts.defer(keys=[self.keys.deferred, self.keys.queue], args=args)

    async def promote(self, limit: int = 1000) -> int:
        moved = await self.scripts.promote(keys=[self.keys.deferred, self.keys.queue], args=[limit])
        return int(moved)
