"""One item, from its URL to its status record: already stored? -> fetch within the host's
limits, with retries -> image job (decode, shrink, encode, write) -> record.

`Pipeline.handle` returns the record (see core.status). It raises `OutputUnwritable` when
the output refused the image's file: nothing is wrong with the item, which goes back to the
queue. The worker decides what happens to the record (crawler.worker).
"""

from __future__ import annotations

import asyncio
import time

from yarl import URL

from core import status
from core.budget import BodyBudget
from core.config import FetchConfig
from core.fetch import OTHER_HOST, Fetcher, FetchResult
from crawler.entries import Item
from crawler.images import ImageSettings
from crawler.limits import HostGate
from crawler.metrics import Metrics
from crawler.pool import ImageJobTimeout, ImagePool
from crawler.retries import Retries
from crawler.store import OUTPUT_UNWRITABLE, Store, verify_bytes, verify_stored


class OutputUnwritable(Exception):
    """The output refused a file for a reason of its own (full, read-only, not permitted)."""


class Pipeline:
    def __init__(
        self,
        cfg: FetchConfig,
        *,
        gate: HostGate,
        fetcher: Fetcher,
        bodies: BodyBudget,
        pool: ImagePool,
        store: Store,
        settings: ImageSettings,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.gate = gate
        self.fetcher = fetcher
        self.bodies = bodies
        self.pool = pool
        self.store = store
        self.settings = settings
        self.metrics = metrics

    async def handle(self, item: Item, host: str, on_disk: bool) -> status.Record:
        """The item's record; `on_disk`: a file of that name may be there from an earlier run."""
        if on_disk:
            existing = await self._existing(item)
            if existing is not None:
                return existing
        retries = Retries(self.cfg)
        while True:
            res, answered_by = await self._fetch_politely(item.target, host)
            if res.retry_after is not None:
                self.metrics.retry_after.inc()
                self.gate.penalize(answered_by, min(res.retry_after, self.cfg.retry_after_max_s))
            delay = retries.after(res)
            if delay is None:
                break
            self.metrics.retries.inc()
            await asyncio.sleep(delay)
        attempts = retries.attempts
        if not res.ok:
            return status.make_record(
                item.name,
                item.url,
                res.status,
                http_code=res.http_code,
                error=res.error,
                attempts=attempts,
            )
        return await self._store_image(item, res.body, res.http_code, attempts)

    async def _fetch_politely(self, url: URL, host: str) -> tuple[FetchResult, str]:
        """Fetch within `host`'s limits; a redirect to another host waits for that host's
        limits before it is followed. Returns the result and the host that gave it."""
        m = self.metrics
        waiting = time.monotonic()
        async with self.gate.slot(host):
            await self.bodies.room()  # while the image pool has its fill of bodies
            started = time.monotonic()
            m.host_wait_seconds.observe(started - waiting)
            res = await self.fetcher.fetch(url)
            m.fetch_seconds.observe(time.monotonic() - started)
        while res.status == OTHER_HOST:
            nxt = URL(res.final_url, encoded=False)
            host = nxt.host or ""
            waiting = time.monotonic()
            async with self.gate.slot(host):
                started = time.monotonic()
                m.host_wait_seconds.observe(started - waiting)
                res = await self.fetcher.fetch(nxt, res.hops)
                m.fetch_seconds.observe(time.monotonic() - started)
        return res, host

    async def _store_image(
        self, item: Item, body: bytes, http_code: int, attempts: int
    ) -> status.Record:
        final = self.store.target(item.shard, item.name)
        started = time.monotonic()
        try:
            img = await self.pool.run(self.store.image_job, self.settings, final, data=body)
        except ImageJobTimeout as exc:
            return status.make_record(
                item.name, item.url, status.IMAGE_TIMEOUT, error=str(exc), http_code=http_code,
                attempts=attempts, source_bytes=len(body),
            )  # fmt: skip
        finally:
            self.metrics.image_seconds.observe(time.monotonic() - started)
            self.bodies.give_back(len(body))  # taken while it arrived (Fetcher)
        img = await self.store.finish(item.shard, item.name, img, body)
        if img.status == OUTPUT_UNWRITABLE:
            raise OutputUnwritable(img.error)
        common = {
            "http_code": http_code,
            "attempts": attempts,
            "source_mimetype": img.mimetype,
            "source_bytes": len(body),
            "orig_width": img.orig_width,
            "orig_height": img.orig_height,
        }
        if img.status != status.OK:
            return status.make_record(item.name, item.url, img.status, error=img.error, **common)
        return status.make_record(
            item.name, item.url, status.OK,
            mimetype=img.stored_mimetype, bytes=img.stored_bytes, width=img.width,
            height=img.height, sha256=img.sha256, path=self.store.relative(item.shard, item.name),
            **common,
        )  # fmt: skip

    async def _existing(self, item: Item) -> status.Record | None:
        """A complete file from an earlier run: record it without fetching again."""
        try:
            if self.store.remote:
                data = await self.store.stored_bytes(item.shard, item.name)
                img = None if data is None else (
                    await self.pool.run(verify_bytes, self.settings, data=data)
                )  # fmt: skip
            else:
                final = self.store.target(item.shard, item.name)
                img = await self.pool.run(verify_stored, final, self.settings)
        except ImageJobTimeout:
            return None  # fetched again, and then recorded as what it is
        if img is None:
            return None  # gone, or not a valid image after all: fetch again
        return status.make_record(
            item.name, item.url, status.OK,
            mimetype=img.stored_mimetype, bytes=img.stored_bytes, width=img.width,
            height=img.height, orig_width=img.orig_width, orig_height=img.orig_height,
            sha256=img.sha256, path=self.store.relative(item.shard, item.name),
            error="already on disk", source_mimetype=img.mimetype, source_bytes=img.stored_bytes,
        )  # fmt: skip
