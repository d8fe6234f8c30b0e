"""The test web's faults, ``/fault/<kind>/<args...>`` (the URL scheme is in testweb.server): one
handler per kind, looked up in FAULTS."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from aiohttp import web
from multidict import MultiMapping

from core.guard import literal_address
from testweb.images import (
    FORMATS,
    JPEG_HEAD,
    SpecError,
    gif_of_frames,
    make_bomb_png,
    seed_of,
    zeros_compressed,
)
from testweb.respond import REQUEST, Responder, send, spec_from_tail

_HTML = (
    "<!doctype html><html><head><title>Not an image</title></head><body>"
    "<h1>This is a web page</h1><p>The image you asked for is somewhere else.</p>"
    '<img src="/img/320x240/inline.jpg"></body></html>'
)
_SVG = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
    'width="200" height="100"><rect width="200" height="100" fill="#48c"/>'
    '<circle cx="50" cy="50" r="40" fill="#fc3"/></svg>'
)
_NO_BODY = {204, 304}


@dataclass
class Fault:
    """One ``/fault/<kind>/<args...>`` request."""

    site: Responder
    request: web.Request
    kind: str
    args: list[str]
    raw_path: str

    @property
    def query(self) -> MultiMapping[str]:
        return self.request.query

    @property
    def name(self) -> str:
        return f"{self.kind}-" + "-".join(self.args) if self.args else self.kind

    def arg_int(self, i: int, what: str) -> int:
        try:
            return int(self.args[i])
        except (IndexError, ValueError):
            raise SpecError(f"/fault/{self.kind} needs an integer {what}") from None

    def need_args(self, n: int, usage: str) -> None:
        if len(self.args) < n:
            raise SpecError(usage)


Handler = Callable[[Fault], Awaitable[web.StreamResponse]]


async def answer(
    site: Responder, request: web.Request, kind: str, args: list[str], raw_path: str
) -> web.StreamResponse:
    handler = FAULTS.get(kind)
    if handler is None:
        return web.Response(status=404, text=f"no such fault {kind!r}\n")
    return await handler(Fault(site, request, kind, args, raw_path))


# -- statuses --------------------------------------------------------------------------------


async def _status(f: Fault) -> web.StreamResponse:
    code = f.arg_int(0, "status code")
    if not 200 <= code <= 599:
        raise SpecError("status must be 200..599")
    return web.Response(status=code, text=None if code in _NO_BODY else f"status {code}\n")


async def _retry_after(f: Fault) -> web.StreamResponse:
    code = f.arg_int(0, "status code")
    f.need_args(2, "/fault/retry-after/<code>/<seconds>")
    return web.Response(status=code, text=f"status {code}\n", headers={"Retry-After": f.args[1]})


async def _flaky(f: Fault) -> web.StreamResponse:
    k = f.arg_int(0, "failure count")
    f.need_args(2, "/fault/flaky/<k>/<id>")
    seen = f.site.count_flaky((k, f.args[1]))
    if seen < k:
        status = int(f.query.get("status", "503"))
        extra = {"Retry-After": f.query["retry_after"]} if "retry_after" in f.query else {}
        return web.Response(status=status, text=f"flaky {seen + 1}/{k}\n", headers=extra)
    return await f.site.serve_image(f.request, f.args[2:], f"flaky-{f.args[1]}")


# -- slow and big bodies ---------------------------------------------------------------------


async def _slow(f: Fault) -> web.StreamResponse:
    await asyncio.sleep(f.arg_int(0, "delay in ms") / 1000.0)
    return await f.site.serve_image(f.request, f.args[1:], f.name)


async def _trickle(f: Fault) -> web.StreamResponse:
    bps = f.arg_int(0, "bytes per second")
    if bps < 1:
        raise SpecError("bytes per second must be >= 1")
    return await f.site.serve_image(f.request, f.args[1:], f.name, trickle_bps=bps)


async def _huge(f: Fault) -> web.StreamResponse:
    size = f.arg_int(0, "size in bytes")
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    if f.query.get("cl", "1") not in ("0", "false"):
        resp.content_length = size
    else:
        resp.enable_chunked_encoding()
    await resp.prepare(f.request)
    block = random.Random(size).randbytes(1 << 16)
    head = JPEG_HEAD[:size]
    await resp.write(head)
    left = size - len(head)
    while left > 0:
        n = min(left, len(block))
        await resp.write(block[:n])
        left -= n
    return resp


# -- redirects -------------------------------------------------------------------------------


def _is_loopback_target(target: str) -> bool:
    parts = urlsplit(target)
    if not parts.scheme and not parts.netloc:
        return target.startswith("/")
    host = parts.hostname or ""
    if host == "localhost":
        return True
    addr = literal_address(host)  # any numeric spelling (the crawler's guard is tested so)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    # (0.0.0.0 and :: connect to this machine too)
    return addr is not None and (addr.is_loopback or addr.is_unspecified)


async def _redirect_wait(request: web.Request) -> None:
    try:
        wait_ms = float(request.query.get("wait_ms", "0"))
    except ValueError:
        raise SpecError("wait_ms must be a number") from None
    if wait_ms > 0:
        await asyncio.sleep(wait_ms / 1000.0)


def _redirect(request: web.Request, location: str, *, keep_query: bool = True) -> web.Response:
    code = int(request.query.get("code", "302"))
    if code not in (301, 302, 303, 307, 308):
        raise SpecError("redirect code must be 301, 302, 303, 307 or 308")
    qs = request.rel_url.raw_query_string
    if keep_query and qs:
        location = f"{location}?{qs}"
    return web.Response(status=code, headers={"Location": location}, text="redirect\n")


async def _redirect_hops(f: Fault) -> web.StreamResponse:
    n = f.arg_int(0, "hop count")
    if n <= 0:
        return await f.site.serve_image(f.request, f.args[1:], "redirect")
    rest = f.raw_path.split("/")[4:]  # ['', 'fault', 'redirect', '<n>', ...]
    await _redirect_wait(f.request)
    return _redirect(f.request, "/".join(["/fault/redirect", str(n - 1), *rest]))


async def _redirect_loop(f: Fault) -> web.StreamResponse:
    return _redirect(f.request, "/fault/redirect-loop" if f.args else "/fault/redirect-loop/b")


async def _redirect_to(f: Fault) -> web.StreamResponse:
    target = f.query.get("to") or unquote(f.raw_path[len("/fault/redirect-to/") :])
    if not _is_loopback_target(target):
        raise SpecError("redirect-to only leads to loopback addresses")
    await _redirect_wait(f.request)
    return _redirect(f.request, target, keep_query=False)


# -- bodies that are not the image they claim ------------------------------------------------


async def _html(f: Fault) -> web.StreamResponse:
    return web.Response(text=_HTML, content_type="text/html")


async def _svg(f: Fault) -> web.StreamResponse:
    return web.Response(text=_SVG, content_type="image/svg+xml")


def _ctype_of(args: Sequence[str]) -> str:
    ext = args[-1].rpartition(".")[2].lower() if args else "jpg"
    return FORMATS.get(ext, FORMATS["jpg"])[1]


async def _truncated(f: Fault) -> web.StreamResponse:
    body = await f.site.image_bytes(spec_from_tail(f.request, f.args, "truncated"))
    keep = float(f.query.get("keep", "0.5"))
    ctype = f.query.get("ctype", _ctype_of(f.args))
    return web.Response(body=body[: int(len(body) * keep)], headers={"Content-Type": ctype})


async def _corrupt(f: Fault) -> web.StreamResponse:
    size = int(f.query.get("bytes", "8192"))
    junk = random.Random(seed_of(f.raw_path)).randbytes(max(0, size - 4))
    return await send(f.request, b"\xff\xd8\xff\xe0" + junk, "image/jpeg")


async def _bomb(f: Fault) -> web.StreamResponse:
    w_s, _, h_s = f.query.get("size", "30000x30000").partition("x")
    full = f.query.get("full", "0") not in ("0", "")
    w, h = int(w_s), int(h_s)
    body = await f.site.cache.get(
        ("bomb", w, h, full), lambda: make_bomb_png(w, h, full), f.site.executor
    )
    return await send(f.request, body, "image/png")


async def _empty(f: Fault) -> web.StreamResponse:
    return web.Response(body=b"", headers={"Content-Type": f.query.get("ctype", "image/jpeg")})


async def _optout(f: Fault) -> web.StreamResponse:
    directive = f.query.get("tag") or (f.args[0] if f.args else "noai")
    headers = {f.query.get("header", "X-Robots-Tag"): directive}
    return await f.site.serve_image(f.request, f.args[1:], "optout", headers=headers)


async def _gzip(f: Fault) -> web.StreamResponse:
    spec = spec_from_tail(f.request, f.args, "gzip")
    body = gzip.compress(await f.site.image_bytes(spec), mtime=0)
    ctype = f.query.get("ctype", spec.content_type)
    return await send(f.request, body, ctype, headers={"Content-Encoding": "gzip"})


async def _frames(f: Fault) -> web.StreamResponse:
    count = f.arg_int(0, "frame count")
    if not 1 <= count <= 10_000_000:
        raise SpecError("frames must be in 1..10000000")
    return await send(f.request, gif_of_frames(count), "image/gif")


async def _zip_bomb(f: Fault) -> web.StreamResponse:
    size = f.arg_int(0, "decompressed size in bytes")
    if not 0 < size <= 1 << 31:
        raise SpecError("zip-bomb size must be in 1..2**31")
    enc = f.query.get("enc", "gzip")
    if enc not in ("gzip", "deflate"):
        raise SpecError("zip-bomb enc must be gzip or deflate")
    body = await asyncio.to_thread(zeros_compressed, size, enc)
    return await send(f.request, body, "image/jpeg", headers={"Content-Encoding": enc})


# -- broken connections ----------------------------------------------------------------------


async def _reset_after_half(f: Fault, tail: Sequence[str]) -> web.StreamResponse:
    body = await f.site.image_bytes(spec_from_tail(f.request, tail, "reset"))
    resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    resp.content_length = len(body)
    await resp.prepare(f.request)
    await resp.write(body[: len(body) // 2])
    await asyncio.sleep(0.02)
    REQUEST.get().broken = True
    transport = f.request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return resp


async def _reset(f: Fault) -> web.StreamResponse:
    return await _reset_after_half(f, f.args)


async def _flaky_reset(f: Fault) -> web.StreamResponse:
    k = f.arg_int(0, "failure count")
    f.need_args(2, "/fault/flaky-reset/<k>/<id>")
    if f.site.count_flaky((-k, f.args[1])) < k:
        return await _reset_after_half(f, f.args[2:])
    return await f.site.serve_image(f.request, f.args[2:], f"flaky-reset-{f.args[1]}")


async def _hang(f: Fault) -> web.StreamResponse:
    REQUEST.get().broken = True
    while f.request.transport is not None and not f.request.transport.is_closing():
        await asyncio.sleep(0.5)
    return web.Response()


async def _drop(f: Fault) -> web.StreamResponse:
    REQUEST.get().broken = True
    if f.request.transport is not None:
        f.request.transport.close()
    return web.Response()


FAULTS: dict[str, Handler] = {
    "status": _status,
    "retry-after": _retry_after,
    "flaky": _flaky,
    "slow": _slow,
    "trickle": _trickle,
    "huge": _huge,
    "redirect": _redirect_hops,
    "redirect-loop": _redirect_loop,
    "redirect-to": _redirect_to,
    "html": _html,
    "svg": _svg,
    "truncated": _truncated,
    "corrupt": _corrupt,
    "bomb": _bomb,
    "empty": _empty,
    "optout": _optout,
    "gzip": _gzip,
    "frames": _frames,
    "zip-bomb": _zip_bomb,
    "reset": _reset,
    "flaky-reset": _flaky_reset,
    "hang": _hang,
    "drop": _drop,
}
