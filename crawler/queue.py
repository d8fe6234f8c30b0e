"""The work queue: a Redis stream with one consumer group, leases, reclaim and dead letters.

At-least-once: an item stays in the stream's pending list until its result is recorded. A
worker renews the leases of what it holds (XCLAIM JUSTID, which does not count as a delivery);
an item whose lease is older than ``lease_timeout_s`` is claimed by another worker; an item
delivered ``max_deliveries`` times without a result becomes a dead letter with a terminal
``dead_letter`` record. An image's record replaces the placeholder its enqueue left in the
shard's records hash, once: an item processed twice still gets exactly one record, and an
item that is not one of its shard's images never gets into that shard.

Nothing read from Redis is trusted: every entry taken from the stream (read, reclaimed,
buried) goes through :func:`parse_entry`, which gives either an :class:`Item` or a
:class:`Poison` naming why it cannot be worked on. Poison is settled at once, never retried:
a ``bad_url``/``bad_name`` record when the entry names an image of a known shard, else an
entry on the dead-letter stream naming the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from core import status
from core.config import QueueConfig
from core.connection import text
from core.keys import CRAWL_GROUP, Keys
from core.scripts import Scripts
from crawler.entries import Item, Poison, Result, dead_letter, encode_result, parse_entry, printable

log = logging.getLogger(__name__)

_s = text
_STRAY = "not an image of shard {shard!r} (unknown shard, stray entry, or shard already reported)"


class WorkQueue:
    def __init__(self, client: aioredis.Redis, keys: Keys, cfg: QueueConfig) -> None:
        self.client = client
        self.keys = keys
        self.cfg = cfg
        self.scripts = Scripts(client)
        self.poisoned = 0  # poison entries settled by this queue object

    # ---- producing -------------------------------------------------------------------
    async def add_to(self, pipe: Pipeline, shard: str, items: Sequence[tuple[str, str]]) -> None:
        """Queue one ENQUEUE call in a pipeline: a stream entry for each (image_name, raw_url)
        of a shard, in order (nothing for no items)."""
        if not items:
            return
        args = [shard]
        for name, url in items:
            args += (name, url)
        keys = [self.keys.queue, self.keys.shard_records(shard), self.keys.shard_meta(shard)]
        await self.scripts.enqueue(keys=keys, args=args, client=pipe)

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
        keys = [self.keys.queue, self.keys.counts, self.keys.errors, self.keys.shards_complete,
                self.keys.dead]  # fmt: skip
        args: list[Any] = [CRAWL_GROUP, self.cfg.dead_letter_maxlen, status.DEAD_LETTER]
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
        """Lease up to `count` new items; poison among them is settled, not returned."""
        reply: Any = await self.client.xreadgroup(
            CRAWL_GROUP, consumer, {self.keys.queue: ">"}, count=count, block=block_ms
        )
        entries = [e for _stream, batch in reply or [] for e in batch]
        return await self._sort(entries)

    async def _sort(self, entries: Sequence[Any]) -> list[Item]:
        """Items of leased entries; poison is settled (or left pending, to be settled when it
        is reclaimed, if Redis fails meanwhile); emptied entries are dropped."""
        items: list[Item] = []
        poison: list[Poison] = []
        empty: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # an entry deleted while pending comes back empty
                empty.append(_s(entry_id))
                continue
            parsed = parse_entry(entry_id, fields)
            if isinstance(parsed, Item):
                items.append(parsed)
            else:
                poison.append(parsed)
        if empty:
            await self._drop(empty)
        if items:
            items, strays = await self._own_images(items)
            poison += strays
        if poison:
            try:
                await self.settle(poison)
            except (RedisError, OSError) as exc:
                log.warning("%d poison entries left pending (%s)", len(poison), exc)
        return items

    async def _own_images(self, items: list[Item]) -> tuple[list[Item], list[Poison]]:
        """Split items into images of their shards still waiting for a record (returned), and
        strays (returned as poison: never fetched, never counted into a shard); an item whose
        image is recorded already (a duplicate entry) is dropped."""
        pipe = self.client.pipeline(transaction=False)
        for it in items:
            pipe.hget(self.keys.shard_records(it.shard), it.name)
        marks = await pipe.execute(raise_on_error=False)
        own: list[Item] = []
        strays: list[Item] = []
        unreadable: list[Poison] = []
        duplicates: list[str] = []
        for it, mark in zip(items, marks, strict=True):
            if isinstance(mark, ResponseError):  # not a hash (WRONGTYPE): nowhere to record
                reason = f"the records of shard {it.shard!r} cannot be read: {mark}"
                unreadable.append(dead_letter(it, reason))
            elif isinstance(mark, Exception):
                raise mark
            elif mark == b"":
                own.append(it)
            elif mark is None:
                strays.append(it)
            else:
                duplicates.append(it.id)
        if duplicates:
            await self._drop(duplicates)
        if strays:  # unless their shard was enqueued without placeholders (see RECORD)
            pipe = self.client.pipeline(transaction=False)
            for it in strays:
                pipe.exists(self.keys.shard_meta(it.shard))
                pipe.hexists(self.keys.shard_meta(it.shard), "pending")
            found = await pipe.execute(raise_on_error=False)
            for i, it in enumerate(strays):
                if found[2 * i] == 1 and found[2 * i + 1] == 0:
                    own.append(it)
                else:
                    unreadable.append(dead_letter(it, _STRAY.format(shard=it.shard)))
        return own, unreadable

    async def settle(self, poison: Sequence[Poison]) -> None:
        """Give poison its end, in one transaction: a bad_url/bad_name record for an image of
        its shard (RECORD leaves a dead-letter entry for an image its shard does not have),
        else a dead-letter entry naming the reason; either way it leaves the queue.

        Should Redis refuse the record of one (an error reply, not an outage), each is
        settled alone, and one whose record is refused gets a dead-letter entry instead: no
        entry can keep poison in the queue, or the reclaim that meets it from working."""
        try:
            await self._settle(poison)
        except ResponseError:
            for p in poison:
                try:
                    await self._settle([p])
                except ResponseError as exc:
                    why = f"{p.reason} (its record was refused: {exc})"
                    await self._settle([Poison(p.id, status.DEAD_LETTER, why, p.fields)])

    async def _settle(self, poison: Sequence[Poison]) -> None:
        results: list[Result] = []
        dead: list[Poison] = []
        for p in poison:
            log.warning("poison queue entry %s (%s): %s %s", p.id, p.status, p.reason, p.fields)
            if p.status == status.DEAD_LETTER:
                dead.append(p)
            else:
                rec = status.make_record(p.name, p.url, p.status, error=p.reason)
                results.append(encode_result(p.id, p.shard, p.name, rec))
        pipe = self.client.pipeline(transaction=True)
        if results:
            await self.record_to(pipe, results)
        for p in dead:
            entry: dict[Any, Any] = {
                "s": p.fields.get("s", ""), "n": p.fields.get("n", ""),
                "u": p.fields.get("u", ""), "reason": f"poison entry: {p.reason}",
                "t": time.time(),
            }  # fmt: skip
            pipe.xadd(self.keys.dead, entry, maxlen=self.cfg.dead_letter_maxlen, approximate=True)
        if dead:
            ids = [p.id for p in dead]
            pipe.xack(self.keys.queue, CRAWL_GROUP, *ids)
            pipe.xdel(self.keys.queue, *ids)
            pipe.hdel(self.keys.errors, *ids)
        await pipe.execute()
        self.poisoned += len(poison)

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
            claimed = await self._sort(entries)
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
        poison: list[Poison] = []
        errors = await self.client.hmget(self.keys.errors, list(deliveries))
        for (item_id, times), err in zip(deliveries.items(), errors, strict=True):
            entries: Any = await self.client.xrange(self.keys.queue, item_id, item_id)
            if not entries or not entries[0][1]:
                await self._drop([item_id])
                continue
            item = parse_entry(*entries[0])
            if isinstance(item, Poison):
                poison.append(item)
                continue
            reason = printable(err) if err else "lease expired (worker died or hung)"
            text = f"dead letter after {times} deliveries: {reason}"
            rec = status.make_record(
                item.name, item.url, status.DEAD_LETTER, error=text, attempts=times
            )
            results.append(encode_result(item_id, item.shard, item.name, rec))
            dead_entries.append(
                {"s": item.shard, "n": item.name, "u": item.url, "reason": text, "t": time.time()}
            )
        if poison:
            await self.settle(poison)
        if not results:
            return len(poison)
        pipe = self.client.pipeline(transaction=True)
        await self.record_to(pipe, results)
        for entry in dead_entries:
            pipe.xadd(self.keys.dead, entry, maxlen=self.cfg.dead_letter_maxlen, approximate=True)
        await pipe.execute()
        return len(results) + len(poison)

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
