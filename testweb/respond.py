"""How the test web answers with bodies: per-request state, the cache of generated images,
image specs from a URL's tail, and sending a body (at once or trickled)."""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from testweb.images import ImageSpec, SpecError, render_image


@dataclass
class RequestState:
    host: str
    broken: bool = False  # the handler broke the connection: nothing more is written
    trickle_bps: int | None = None  # a slow host: bodies go out at this rate


REQUEST: contextvars.ContextVar[RequestState] = contextvars.ContextVar("testweb_request")


class BytesCache:
    """LRU of generated bodies, bounded in bytes; concurrent misses share one generation."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._size = 0
        self._pending: dict[object, asyncio.Future[bytes]] = {}

    async def get(
        self, key: object, make: Callable[[], bytes], executor: ThreadPoolExecutor | None
    ) -> bytes:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.run_in_executor(executor, make)
        self._pending[key] = fut
        try:
            data = await asyncio.shield(fut)
        finally:
            self._pending.pop(key, None)
        if len(data) <= self.max_bytes:
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)
        return data


def spec_from_tail(request: web.Request, tail: Sequence[str], default_name: str) -> ImageSpec:
    """The image a URL's tail names (see the URL scheme in testweb.server)."""
    tail = list(tail)
    if tail and tail[0] == "img":
        tail = tail[1:]
    if not tail:
        return ImageSpec.from_query(64, 64, default_name, "jpg", request.query)
    if len(tail) == 1:  # <w>x<h>.<fmt>, <name>.<fmt> or <name> (64x64, jpg)
        stem, dot, fmt = tail[0].rpartition(".")
        if not dot:
            stem, fmt = tail[0], "jpg"
        w_s, x, h_s = stem.partition("x")
        if not (x and w_s.isdigit() and h_s.isdigit()):
            return ImageSpec.from_query(64, 64, stem, fmt, request.query)
        name = default_name
    else:  # <w>x<h>/<name>.<fmt>
        name, dot, fmt = "/".join(tail[1:]).rpartition(".")
        if not dot:
            raise SpecError("image name needs an extension")
        w_s, x, h_s = tail[0].partition("x")
        if not (x and w_s.isdigit() and h_s.isdigit()):
            raise SpecError(f"bad size {tail[0]!r}")
    return ImageSpec.from_query(int(w_s), int(h_s), name, fmt, request.query)


async def send(
    request: web.Request,
    body: bytes,
    ctype: str,
    *,
    headers: Mapping[str, str] | None = None,
    trickle_bps: int | None = None,
) -> web.StreamResponse:
    """`body` as the response: at once, or at `trickle_bps` (or the slow host's rate)."""
    hdrs = {"Content-Type": ctype, **(headers or {})}
    bps = trickle_bps or REQUEST.get().trickle_bps
    if not bps:
        return web.Response(body=body, headers=hdrs)
    resp = web.StreamResponse(headers=hdrs)
    resp.content_length = len(body)
    await resp.prepare(request)
    tick = 0.05
    chunk = max(1, int(bps * tick))
    for pos in range(0, len(body), chunk):
        await resp.write(body[pos : pos + chunk])
        if pos + chunk < len(body):
            await asyncio.sleep(tick)
    return resp


class Responder:
    """What every handler of the web shares: the image cache and the generator threads, and
    how often each flaky id was asked for."""

    def __init__(self, cache_bytes: int) -> None:
        self.cache = BytesCache(cache_bytes)
        self.executor: ThreadPoolExecutor | None = None
        self.flaky: dict[tuple[int, str], int] = defaultdict(int)

    def count_flaky(self, key: tuple[int, str]) -> int:
        """How often `key` was asked for before this request."""
        seen = self.flaky[key]
        self.flaky[key] = seen + 1
        return seen

    async def image_bytes(self, spec: ImageSpec) -> bytes:
        return await self.cache.get(spec, lambda: render_image(spec), self.executor)

    async def serve_image(
        self,
        request: web.Request,
        tail: Sequence[str],
        default_name: str,
        *,
        headers: Mapping[str, str] | None = None,
        trickle_bps: int | None = None,
    ) -> web.StreamResponse:
        spec = spec_from_tail(request, tail, default_name)
        body = await self.image_bytes(spec)
        ctype = request.query.get("ctype", spec.content_type)
        return await send(request, body, ctype, headers=headers, trickle_bps=trickle_bps)
