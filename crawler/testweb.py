"""A web of our own on loopback: real images and real faults for tests, the demo and the benchmark.

The network is closed, so the crawler is exercised against :class:`ImageWeb`: ``hosts`` HTTP
servers on ``127.0.0.<first_host>``, ``127.0.0.<first_host + 1>``, … all on ONE port (on Linux all
of 127.0.0.0/8 routes to ``lo``; one aiohttp ``TCPSite`` is bound per address, never 0.0.0.0).
Every host serves every path; every response is generated from the URL alone (same URL, same
bytes), nothing is read from disk. Every request is logged as an :class:`Arrival` so tests can
assert per-host rate (:func:`check_rate`) and concurrency (:func:`max_concurrency`) limits.

URL scheme (``<tail>`` is an optional image spec: ``<w>x<h>/<name>.<fmt>``, ``<w>x<h>.<fmt>``,
``img/<w>x<h>/<name>.<fmt>``, or ``<name>[.<fmt>]`` for a 64×64 image (JPEG without extension);
empty means a 64×64 JPEG named after the fault; image query options apply to it too)::

    /img/<w>x<h>/<name>.<fmt>            fmt: jpg|jpeg|png|webp|gif; a real image of w×h
        ?mode=cmyk|RGB|RGBA|L|LA|P|1|I;16  pixel mode (cmyk: JPEG only; I;16: PNG only)
        ?transparency=1                    with mode=P: palette index 0 is transparent
        ?exif=6                            EXIF orientation tag (stored pixels stay w×h)
        ?frames=5                          animated (gif, webp, png)
        ?q=85                              JPEG/WebP quality
        ?ctype=text/html                   any Content-Type header (a wrong one)
    /fault/status/<code>[/...]           that status with a short text body
    /fault/retry-after/<code>/<value>    e.g. 429 or 503 with ``Retry-After: <value>``
    /fault/flaky/<k>/<id>[/<tail>]       503 (``?status=``, ``?retry_after=``) for the first k
                                         requests of (k, id), then the image
    /fault/slow/<ms>[/<tail>]            waits ms before the headers, then the image
    /fault/trickle/<bytes_per_s>[/<tail>]  the image's bytes, sent slowly
    /fault/huge/<bytes>                  JPEG header + junk, that many bytes (``?cl=0``: chunked,
                                         no Content-Length)
    /fault/redirect/<n>[/<tail>]         n redirect hops (``?code=301|302|303|307|308``), then image
    /fault/redirect-loop                 302 -> /fault/redirect-loop/b -> 302 -> back, for ever
    /fault/redirect-to/<quoted url>      302 to that URL (loopback targets only; or ``?to=``)
        ?wait_ms=500                       (any redirect) waits that long before answering
    /fault/html[/...], /fault/svg[/...]  an HTML page / an SVG document, status 200
    /fault/truncated/<w>x<h>.<fmt>       the first half of a valid image (``?keep=0.5``)
    /fault/corrupt[/...]                 random bytes behind a JPEG magic number (``?bytes=8192``)
    /fault/bomb[/...]                    a tiny 1-bit PNG whose header claims 30000×30000
                                         (``?size=WxH``; ``?full=1``: complete zlib bomb, ~110 KB)
    /fault/empty[/...]                   200, Content-Type image/jpeg, empty body
    /fault/optout/<directive>[/<tail>]   the image with ``X-Robots-Tag: <directive>`` (url-decoded,
                                         e.g. ``noai``, ``noimageai``, ``googlebot:%20noai``;
                                         ``?tag=`` overrides, ``?header=`` names another header)
    /fault/reset[/<tail>]                Content-Length of the image, half the body, then a TCP RST
    /fault/flaky-reset/<k>/<id>[/<tail>]  /fault/reset for the first k requests of (k, id), then
                                         the image
    /fault/hang[/...]                    never answers: no status line, the connection held open
                                         until the client leaves
    /fault/drop[/...]                    closes the connection without any response
    /fault/gzip[/<tail>]                 the image with ``Content-Encoding: gzip``
    /fault/frames/<n>                    an animated GIF of n 1x1 frames (23 bytes each)
    /fault/zip-bomb/<bytes>              that many zero bytes, gzip-compressed (``?enc=deflate``:
                                         zlib), served with the matching ``Content-Encoding``

Times are ``time.monotonic()`` of the server process (CLOCK_MONOTONIC on Linux, so comparable
with other processes on the same machine).

CLI: ``python -m crawler.testweb serve --hosts 8 --port 18650 [--log arrivals.jsonl]`` and
``python -m crawler.testweb shard OUT.jsonl --port 18650 --hosts 8 --docs 200 --seed 1 --faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gzip
import hashlib
import io
import ipaddress
import itertools
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal
from urllib.parse import quote, unquote, urlsplit

import click
import numpy as np
import orjson
from aiohttp import web
from PIL import Image, ImageChops, ImageOps

from core.guard import literal_address

__all__ = [
    "FAULT_KINDS",
    "Arrival",
    "ImageSpec",
    "ImageWeb",
    "Latency",
    "SpecError",
    "WebProcess",
    "check_concurrency",
    "check_rate",
    "fault_path",
    "make_docs",
    "max_concurrency",
    "min_interval",
    "read_arrivals",
    "render_image",
    "start_subprocess",
    "write_shard",
]

# --------------------------------------------------------------------------------------------
# Images


class SpecError(ValueError):
    """A request asks for something that cannot be produced (answered with 400)."""


FORMATS: dict[str, tuple[str, str]] = {
    "jpg": ("JPEG", "image/jpeg"),
    "jpeg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
    "gif": ("GIF", "image/gif"),
}
_MODES = {"RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"}
MAX_SIDE = 12_000
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ImageSpec:
    """What an image URL asks for; :func:`render_image` turns it into bytes."""

    width: int
    height: int
    name: str = "img"
    fmt: str = "jpg"
    mode: str | None = None
    transparency: bool = False
    exif_orientation: int | None = None
    frames: int = 1
    quality: int = 85

    @classmethod
    def from_query(
        cls, width: int, height: int, name: str, fmt: str, query: Mapping[str, str]
    ) -> ImageSpec:
        mode = query.get("mode")
        if mode is not None:
            mode = "CMYK" if mode.lower() == "cmyk" else mode
            if mode not in _MODES:
                raise SpecError(f"unknown mode {mode!r}")
        try:
            exif = int(query["exif"]) if "exif" in query else None
            frames = int(query.get("frames", "1"))
            quality = int(query.get("q", "85"))
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        spec = cls(
            width=width,
            height=height,
            name=name,
            fmt=fmt.lower(),
            mode=mode,
            transparency=query.get("transparency", "0") not in ("0", "", "false"),
            exif_orientation=exif,
            frames=frames,
            quality=quality,
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.fmt not in FORMATS:
            raise SpecError(f"unknown format {self.fmt!r}")
        if not (1 <= self.width <= MAX_SIDE and 1 <= self.height <= MAX_SIDE):
            raise SpecError(f"size {self.width}x{self.height} out of range")
        if self.width * self.height * max(1, self.frames) > MAX_PIXELS:
            raise SpecError("too many pixels")
        if not 1 <= self.frames <= 64:
            raise SpecError("frames must be 1..64")
        if self.frames > 1 and self.fmt in ("jpg", "jpeg"):
            raise SpecError("JPEG cannot be animated")
        if not 1 <= self.quality <= 100:
            raise SpecError("q must be 1..100")
        if self.exif_orientation is not None and not 1 <= self.exif_orientation <= 8:
            raise SpecError("exif orientation must be 1..8")

    @property
    def content_type(self) -> str:
        return FORMATS[self.fmt][1]


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _pattern(width: int, height: int, seed: int, graphic: bool) -> Image.Image:
    """A deterministic RGB picture: a gradient with smooth blobs and (for photos) fine noise.

    Built at 1/48 scale and upscaled in C, so even 4000×3000 takes well under 100 ms. The noise
    makes JPEGs realistic-sized (~1.3 bits/pixel at q=85); ``graphic`` (PNG, GIF) drops it and
    posterizes instead, like web graphics, so PNGs stay reasonable.
    """
    rng = np.random.default_rng(seed)
    low_w, low_h = max(2, width // 48 + 2), max(2, height // 48 + 2)
    ys = np.linspace(0.0, 1.0, low_h, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, low_w, dtype=np.float32)[None, :, None]
    a = rng.uniform(40, 215, 3).astype(np.float32)
    b = rng.uniform(-100, 100, 3).astype(np.float32)
    c = rng.uniform(-100, 100, 3).astype(np.float32)
    blobs = rng.integers(0, 256, (low_h, low_w, 3)).astype(np.float32)
    low = np.clip((a + b * xs + c * ys) * 0.55 + blobs * 0.45, 0, 255).astype(np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    if graphic:
        return ImageOps.posterize(img, 3)
    tile = rng.integers(0, 21, (128, 128, 3), dtype=np.uint8)
    reps = ((height + 127) // 128, (width + 127) // 128, 1)
    noise = Image.fromarray(np.ascontiguousarray(np.tile(tile, reps)[:height, :width]))
    return ImageChops.add(img, noise, scale=1.0, offset=-10)


def _to_mode(rgb: Image.Image, spec: ImageSpec) -> Image.Image:
    mode = spec.mode
    if mode is None:
        return rgb
    w, h = rgb.size
    if mode in ("RGBA", "LA"):
        alpha = np.tile(np.linspace(255, 48, w, dtype=np.float32)[None, :], (h, 1))
        alpha[: max(1, h // 8), : max(1, w // 8)] = 0  # a fully transparent corner
        base = rgb.convert(mode[:-1])
        base.putalpha(Image.fromarray(alpha.astype(np.uint8)))
        return base
    if mode == "P":
        return rgb.quantize(colors=64, dither=Image.Dither.NONE)
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        ramp = np.linspace(0, 256, w, dtype=np.float32).astype(np.uint16)[None, :]
        return Image.fromarray(np.minimum(gray + ramp, 65535).astype(np.uint16))
    return rgb.convert(mode)


def render_image(spec: ImageSpec) -> bytes:
    """Encode the image ``spec`` asks for. Pure and deterministic (slow for big images)."""
    spec.validate()
    pil_format = FORMATS[spec.fmt][0]
    graphic = pil_format in ("PNG", "GIF")
    base = _pattern(spec.width, spec.height, _seed_of(spec.name, spec.width, spec.height), graphic)
    if pil_format == "GIF" and spec.mode is None:
        base = base.quantize(64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    frames = []
    for i in range(spec.frames):
        shifted = base if i == 0 else ImageChops.offset(base, i * max(1, spec.width // 10), 0)
        frames.append(_to_mode(shifted, spec))
    kwargs: dict[str, Any] = {}
    if pil_format in ("JPEG", "WEBP"):
        kwargs["quality"] = spec.quality
    if pil_format == "WEBP" and spec.width * spec.height > 1_000_000:
        kwargs["method"] = 0  # the default (4) takes about a second for 12 MP
    if pil_format == "PNG":
        kwargs["compress_level"] = 6 if spec.width * spec.height <= 1_000_000 else 1
    if spec.transparency and frames[0].mode == "P":
        kwargs["transparency"] = 0
    if spec.exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = spec.exif_orientation
        kwargs["exif"] = exif
    if spec.frames > 1:
        kwargs.update(save_all=True, append_images=frames[1:], duration=100, loop=0)
    buf = io.BytesIO()
    try:
        frames[0].save(buf, pil_format, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"cannot write mode {frames[0].mode} as {pil_format}: {exc}") from None
    return buf.getvalue()


_GIF_HEAD = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
_GIF_FRAME = (
    b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control extension: 0.1 s
    b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00"  # image descriptor: 1x1 at 0,0
    b"\x02\x02\x44\x01\x00"  # LZW: clear, pixel 0, end
)


def gif_of_frames(count: int) -> bytes:
    """An animated GIF of `count` 1x1 frames, 23 bytes each (a frame bomb when large)."""
    return _GIF_HEAD + _GIF_FRAME * count + b"\x3b"


def _zeros_compressed(size: int, enc: str) -> bytes:
    """`size` zero bytes after a JPEG magic number, gzip- or zlib-compressed (a body that
    inflates ~1000-fold: the decompression bomb of `/fault/zip-bomb`)."""
    wbits = 31 if enc == "gzip" else 15
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [comp.compress(b"\xff\xd8\xff\xe0")]
    block = bytes(1 << 20)
    left = size - 4
    while left > 0:
        out.append(comp.compress(block[: min(left, len(block))]))
        left -= len(block)
    out.append(comp.flush())
    return b"".join(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_bomb_png(width: int = 30_000, height: int = 30_000, full: bool = False) -> bytes:
    """A 1-bit grayscale PNG whose header claims ``width``×``height``.

    Not ``full``: the IDAT holds only a few rows (under 200 bytes in all). ``full``: complete,
    valid zlib data of all-zero rows (a real decompression bomb, ~1000:1).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    if full:
        per_block = max(1, (1 << 20) // len(row))
        block = row * per_block
        parts = []
        left = height
        while left > 0:
            n = min(left, per_block)
            parts.append(comp.compress(block if n == per_block else row * n))
            left -= n
        parts.append(comp.flush())
        idat = b"".join(parts)
    else:
        idat = comp.compress(row * min(height, 8)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


_JPEG_HEAD = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    b"\xff\xdb\x00\x43\x00" + bytes(range(1, 65))
)

# --------------------------------------------------------------------------------------------
# Arrivals and checkers


@dataclass(frozen=True)
class Arrival:
    """One request as the server saw it.

    ``host``: the loopback address it arrived on (``"127.0.0.3"``; all hosts share one port).
    ``path``: the request target as sent (path and query, percent-encoded).
    ``start``/``end``: ``time.monotonic()`` when the request was handed to the server / when the
    response was fully written or the connection broke. ``status``: the response status, 0 when
    no complete response was sent (drop, reset, client went away).
    """

    host: str
    path: str
    start: float
    end: float
    status: int = 0


def read_arrivals(path: str | os.PathLike[str]) -> list[Arrival]:
    """Read a JSONL arrival log written by ``ImageWeb(log_path=...)`` (partial lines skipped)."""
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            out.append(Arrival(**orjson.loads(line)))
    return out


def _by_host(arrivals: Iterable[Arrival]) -> dict[str, list[Arrival]]:
    groups: dict[str, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        groups[a.host].append(a)
    return dict(groups)


def max_concurrency(arrivals: Iterable[Arrival]) -> dict[str, int]:
    """Host -> the largest number of requests in flight at the same moment.

    Intervals are ``[start, end)``: a request that starts exactly when another ends does not
    overlap it.
    """
    result: dict[str, int] = {}
    for host, items in _by_host(arrivals).items():
        events = sorted([(a.start, 1) for a in items] + [(a.end, -1) for a in items])
        level = peak = 0
        for _, delta in events:  # at equal times -1 sorts before +1
            level += delta
            peak = max(peak, level)
        result[host] = peak
    return result


def check_concurrency(arrivals: Iterable[Arrival], limit: int) -> list[str]:
    """Violations (one line per host) of "at most ``limit`` requests in flight per host"."""
    return [
        f"{host}: {peak} requests in flight at once, limit {limit}"
        for host, peak in sorted(max_concurrency(arrivals).items())
        if peak > limit
    ]


def min_interval(arrivals: Iterable[Arrival]) -> dict[str, float]:
    """Host -> the shortest gap between consecutive request starts (inf with one request)."""
    result: dict[str, float] = {}
    for host, items in _by_host(arrivals).items():
        starts = sorted(a.start for a in items)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        result[host] = min(gaps) if gaps else math.inf
    return result


def check_rate(
    arrivals: Iterable[Arrival],
    rate: float,
    burst: int = 1,
    *,
    tolerance: float = 0.01,
    max_reports: int = 10,
) -> list[str]:
    """Violations of a per-host token-bucket limit of ``rate`` requests/s with bucket ``burst``.

    The limiter is a token bucket (equivalently GCRA with emission interval ``T = 1/rate`` and
    burst tolerance ``(burst - 1)·T``) that starts full. A host's request starts
    ``t_0 <= t_1 <= …`` conform iff every closed window holds at most ``burst + rate·width``
    requests, i.e. for all ``i <= j``::

        j - i + 1  <=  burst + rate · (t_j - t_i + tolerance)

    (for ``i = 0`` this is GCRA's "request n starts no earlier than t_0 + (n - burst + 1)/rate").
    ``tolerance`` (seconds) widens every window to absorb jitter between the client's send and
    the server's arrival timestamp. Checked in O(n) per host: with ``g_k = k - rate·t_k`` the
    worst window ending at ``j`` starts at the ``i <= j`` minimising ``g_i``. Every arrival
    counts (a real server sees them all), so after an over-full burst each later request is
    reported too until the bucket would have refilled.
    Returns human-readable violations, at most ``max_reports`` per host (plus a count line);
    an empty list means compliant.
    """
    if rate <= 0 or burst < 1:
        raise ValueError("rate must be > 0 and burst >= 1")
    limit = burst + rate * tolerance + 1e-9
    out: list[str] = []
    for host, items in sorted(_by_host(arrivals).items()):
        starts = sorted(a.start for a in items)
        best_g, best_i = math.inf, 0
        reported = extra = 0
        for j, t in enumerate(starts):
            g = j - rate * t
            if g <= best_g:  # ties: the latest start, so reports name the shortest window
                best_g, best_i = g, j
            if g - best_g + 1 > limit:
                if reported < max_reports:
                    i = best_i
                    width = t - starts[i]
                    out.append(
                        f"{host}: {j - i + 1} requests in {width:.4f}s (#{i}..#{j}); allowed "
                        f"{burst} + {rate:g}/s x ({width:.4f}s + {tolerance:g}s) = "
                        f"{burst + rate * (width + tolerance):.2f}"
                    )
                    reported += 1
                else:
                    extra += 1
        if extra:
            out.append(f"{host}: ... and {extra} more violating requests")
    return out


# --------------------------------------------------------------------------------------------
# Latency model


@dataclass(frozen=True)
class Latency:
    """Per-response delay for the benchmark: lognormal before the headers, plus slow hosts.

    Delay = ``median_ms · exp(sigma · N(0, 1))``, capped at ``max_ms``. Slow hosts (the indices
    in ``slow_hosts``, or else a seeded ``slow_host_share`` of all hosts, at least one when the
    share is > 0) add ``slow_delay_ms`` ("delay") or send image bodies at ``slow_bytes_per_s``
    ("trickle").
    """

    median_ms: float = 150.0
    sigma: float = 0.5
    max_ms: float = 10_000.0
    slow_host_share: float = 0.0
    slow_hosts: tuple[int, ...] | None = None
    slow_mode: Literal["delay", "trickle"] = "delay"
    slow_delay_ms: float = 5_000.0
    slow_bytes_per_s: int = 20_000
    seed: int | None = None

    def pick_slow_hosts(self, n_hosts: int, seed: int) -> frozenset[int]:
        if self.slow_hosts is not None:
            return frozenset(self.slow_hosts)
        if self.slow_host_share <= 0:
            return frozenset()
        k = min(n_hosts, max(1, round(self.slow_host_share * n_hosts)))
        return frozenset(random.Random(_seed_of("slow", seed)).sample(range(n_hosts), k))

    def sample_s(self, rng: random.Random) -> float:
        if self.median_ms <= 0:
            return 0.0
        ms = self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return min(ms, self.max_ms) / 1000.0


# --------------------------------------------------------------------------------------------
# The server


@dataclass
class _ReqState:
    host: str
    broken: bool = False
    trickle_bps: int | None = None


_REQ: contextvars.ContextVar[_ReqState] = contextvars.ContextVar("testweb_request")


class _BytesCache:
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


class ImageWeb:
    """``hosts`` loopback HTTP hosts ``127.0.0.<first_host>…`` on one port; see the module doc.

    Use ``async with ImageWeb() as web:``, ``await web.start()``/``await web.stop()``, or
    ``with ImageWeb().running_in_thread() as web:`` (own loop in a daemon thread). ``port=0``
    picks a port free on every host address.
    """

    def __init__(
        self,
        hosts: int = 8,
        port: int = 0,
        *,
        first_host: int = 2,
        latency: Latency | None = None,
        seed: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        cache_bytes: int = 512 * 1024 * 1024,
        workers: int | None = None,
    ) -> None:
        if hosts < 1:
            raise ValueError("hosts must be >= 1")
        base = int(ipaddress.IPv4Address("127.0.0.0"))
        if first_host < 1 or first_host + hosts - 1 > 0xFFFFFE:
            raise ValueError("host addresses must stay inside 127.0.0.0/8")
        self.host_addrs: list[str] = [
            str(ipaddress.IPv4Address(base + first_host + i)) for i in range(hosts)
        ]
        self.requested_port = port
        self.port = port
        self.latency = latency
        self.seed = seed
        self.log_path = Path(log_path) if log_path is not None else None
        lat_seed = seed if latency is None or latency.seed is None else latency.seed
        self.slow_hosts: frozenset[int] = (
            latency.pick_slow_hosts(hosts, lat_seed) if latency else frozenset()
        )
        self._slow_addrs = {self.host_addrs[i] for i in self.slow_hosts if i < hosts}
        self._rng = random.Random(_seed_of("latency", lat_seed))
        self._cache = _BytesCache(cache_bytes)
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._log: IO[bytes] | None = None
        self._flaky: dict[tuple[int, str], int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.peak_in_flight: dict[str, int] = defaultdict(int)

    # -- addresses ----------------------------------------------------------------------------

    @property
    def host_urls(self) -> list[str]:
        """Base URLs, ``http://127.0.0.2:PORT`` …, one per host (valid once started)."""
        return [f"http://{addr}:{self.port}" for addr in self.host_addrs]

    def url(self, host_index: int, path: str) -> str:
        """The URL of ``path`` on host ``host_index`` (0-based: 0 is ``127.0.0.<first_host>``)."""
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.host_addrs[host_index]}:{self.port}{path}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="testweb-gen")
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        attempts = 20 if self.requested_port == 0 else 1
        for attempt in range(attempts):
            sites: list[web.TCPSite] = []
            port = self.requested_port
            try:
                for addr in self.host_addrs:
                    site = web.TCPSite(runner, addr, port, backlog=1024)
                    await site.start()
                    sites.append(site)
                    if port == 0:
                        port = int(runner.addresses[-1][1])
                self.port = port
                break
            except OSError:
                for site in sites:
                    await site.stop()
                if attempt == attempts - 1:
                    await runner.cleanup()
                    self._executor.shutdown(wait=False)
                    raise
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    async def __aenter__(self) -> ImageWeb:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[ImageWeb]:
        """Serve on a private event loop in a daemon thread for the duration of the block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="testweb", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=60)
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=60)
                # Handlers still running (a slow or trickling response whose client left)
                # end here, not as "Task was destroyed but it is pending" at loop.close().
                asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                if not thread.is_alive():
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.close()

    # -- arrivals -----------------------------------------------------------------------------

    @property
    def arrivals(self) -> list[Arrival]:
        """A copy of the arrival log (thread-safe)."""
        with self._lock:
            return list(self._arrivals)

    def clear_arrivals(self) -> None:
        with self._lock:
            self._arrivals.clear()
        self.peak_in_flight.clear()

    def reset_flaky(self) -> None:
        """Forget how often each flaky id was requested."""
        self._flaky.clear()

    def max_concurrency_per_host(self) -> dict[str, int]:
        return max_concurrency(self.arrivals)

    def min_interval_per_host(self) -> dict[str, float]:
        return min_interval(self.arrivals)

    def check_rate(self, rate: float, burst: int = 1, *, tolerance: float = 0.01) -> list[str]:
        return check_rate(self.arrivals, rate, burst, tolerance=tolerance)

    def wait_for_arrivals(
        self,
        count: int,
        timeout: float = 5.0,
        *,
        where: Callable[[Arrival], bool] | None = None,
    ) -> list[Arrival]:
        """Block until at least ``count`` arrivals (matching ``where``) are logged or ``timeout``
        passes; returns the (matching) arrivals.

        An arrival is logged just after its response was written, so a client that has read
        the response may briefly be ahead of the log (thread and process modes). Blocks: do
        not call it from the loop the web itself runs on.
        """
        deadline = time.monotonic() + timeout
        while True:
            arrivals = self.arrivals
            if where is not None:
                arrivals = [a for a in arrivals if where(a)]
            if len(arrivals) >= count or time.monotonic() >= deadline:
                return arrivals
            time.sleep(0.005)

    def _record(self, arrival: Arrival) -> None:
        line = orjson.dumps(asdict(arrival)) + b"\n"
        with self._lock:
            self._arrivals.append(arrival)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()

    # -- request handling ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.monotonic()
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = str(sockname[0]) if sockname else (request.host.rsplit(":", 1)[0])
        state = _ReqState(host=host)
        _REQ.set(state)
        self.in_flight[host] += 1
        self.peak_in_flight[host] = max(self.peak_in_flight[host], self.in_flight[host])
        status = 0
        resp: web.StreamResponse | None = None
        try:
            if self.latency is not None:
                delay = self.latency.sample_s(self._rng)
                if host in self._slow_addrs:
                    if self.latency.slow_mode == "delay":
                        delay += self.latency.slow_delay_ms / 1000.0
                    else:
                        state.trickle_bps = self.latency.slow_bytes_per_s
                if delay > 0:
                    await asyncio.sleep(delay)
            resp = await handler(request)
            if not state.broken:
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write_eof()
                status = resp.status
            return resp
        except ConnectionError:
            # The peer went away while we wrote; aiohttp closes quietly on ConnectionError.
            return resp if resp is not None else web.Response(status=500)
        finally:
            self.in_flight[host] -= 1
            self._record(Arrival(host, request.raw_path, start, time.monotonic(), status))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        parts = [unquote(p) for p in raw_path.split("/") if p]
        try:
            if not parts:
                return web.Response(text=__doc__ or "", content_type="text/plain")
            if parts[0] == "img":
                return await self._serve_image(request, parts[1:], default_name="img")
            if parts[0] == "fault" and len(parts) > 1:
                return await self._fault(request, parts[1], parts[2:], raw_path)
            return web.Response(status=404, text="no such path\n")
        except SpecError as exc:
            return web.Response(status=400, text=f"bad request: {exc}\n")

    def _spec_from_tail(
        self, request: web.Request, tail: Sequence[str], default_name: str
    ) -> ImageSpec:
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

    async def _image_bytes(self, spec: ImageSpec) -> bytes:
        return await self._cache.get(spec, lambda: render_image(spec), self._executor)

    async def _serve_image(
        self,
        request: web.Request,
        tail: Sequence[str],
        default_name: str,
        *,
        headers: Mapping[str, str] | None = None,
        trickle_bps: int | None = None,
    ) -> web.StreamResponse:
        spec = self._spec_from_tail(request, tail, default_name)
        body = await self._image_bytes(spec)
        return await self._send(
            request,
            body,
            request.query.get("ctype", spec.content_type),
            headers=headers,
            trickle_bps=trickle_bps,
        )

    async def _send(
        self,
        request: web.Request,
        body: bytes,
        ctype: str,
        *,
        headers: Mapping[str, str] | None = None,
        trickle_bps: int | None = None,
    ) -> web.StreamResponse:
        hdrs = {"Content-Type": ctype, **(headers or {})}
        bps = trickle_bps or _REQ.get().trickle_bps
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

    async def _fault(
        self, request: web.Request, kind: str, args: list[str], raw_path: str
    ) -> web.StreamResponse:
        q = request.query
        name = f"{kind}-" + "-".join(args) if args else kind

        def arg_int(i: int, what: str) -> int:
            try:
                return int(args[i])
            except (IndexError, ValueError):
                raise SpecError(f"/fault/{kind} needs an integer {what}") from None

        if kind == "status":
            code = arg_int(0, "status code")
            if not 200 <= code <= 599:
                raise SpecError("status must be 200..599")
            text = None if code in _NO_BODY else f"status {code}\n"
            return web.Response(status=code, text=text)
        if kind == "retry-after":
            code = arg_int(0, "status code")
            if len(args) < 2:
                raise SpecError("/fault/retry-after/<code>/<seconds>")
            return web.Response(
                status=code, text=f"status {code}\n", headers={"Retry-After": args[1]}
            )
        if kind == "flaky":
            k = arg_int(0, "failure count")
            if len(args) < 2:
                raise SpecError("/fault/flaky/<k>/<id>")
            key = (k, args[1])
            seen = self._flaky[key]
            self._flaky[key] = seen + 1
            if seen < k:
                status = int(q.get("status", "503"))
                extra = {"Retry-After": q["retry_after"]} if "retry_after" in q else {}
                return web.Response(status=status, text=f"flaky {seen + 1}/{k}\n", headers=extra)
            return await self._serve_image(request, args[2:], f"flaky-{args[1]}")
        if kind == "slow":
            await asyncio.sleep(arg_int(0, "delay in ms") / 1000.0)
            return await self._serve_image(request, args[1:], name)
        if kind == "trickle":
            bps = arg_int(0, "bytes per second")
            if bps < 1:
                raise SpecError("bytes per second must be >= 1")
            return await self._serve_image(request, args[1:], name, trickle_bps=bps)
        if kind == "huge":
            return await self._huge(request, arg_int(0, "size in bytes"), q.get("cl", "1"))
        if kind == "redirect":
            n = arg_int(0, "hop count")
            if n <= 0:
                return await self._serve_image(request, args[1:], "redirect")
            rest = raw_path.split("/")[4:]  # ['', 'fault', 'redirect', '<n>', ...]
            location = "/".join(["/fault/redirect", str(n - 1), *rest])
            await self._redirect_wait(request)
            return self._redirect(request, location)
        if kind == "redirect-loop":
            location = "/fault/redirect-loop" if args else "/fault/redirect-loop/b"
            return self._redirect(request, location)
        if kind == "redirect-to":
            prefix = "/fault/redirect-to/"
            target = q.get("to") or unquote(raw_path[len(prefix) :])
            if not _is_loopback_target(target):
                raise SpecError("redirect-to only leads to loopback addresses")
            await self._redirect_wait(request)
            return self._redirect(request, target, keep_query=False)
        if kind == "html":
            return web.Response(text=_HTML, content_type="text/html")
        if kind == "svg":
            return web.Response(text=_SVG, content_type="image/svg+xml")
        if kind == "truncated":
            body = await self._image_bytes(self._spec_from_tail(request, args, "truncated"))
            keep = float(q.get("keep", "0.5"))
            return web.Response(
                body=body[: int(len(body) * keep)],
                headers={"Content-Type": q.get("ctype", self._ctype_of(args))},
            )
        if kind == "corrupt":
            size = int(q.get("bytes", "8192"))
            junk = random.Random(_seed_of(raw_path)).randbytes(max(0, size - 4))
            return await self._send(request, b"\xff\xd8\xff\xe0" + junk, "image/jpeg")
        if kind == "bomb":
            w_s, _, h_s = q.get("size", "30000x30000").partition("x")
            full = q.get("full", "0") not in ("0", "")
            w, h = int(w_s), int(h_s)
            body = await self._cache.get(
                ("bomb", w, h, full), lambda: make_bomb_png(w, h, full), self._executor
            )
            return await self._send(request, body, "image/png")
        if kind == "empty":
            return web.Response(body=b"", headers={"Content-Type": q.get("ctype", "image/jpeg")})
        if kind == "optout":
            directive = q.get("tag") or (args[0] if args else "noai")
            header = q.get("header", "X-Robots-Tag")
            return await self._serve_image(request, args[1:], "optout", headers={header: directive})
        if kind == "gzip":
            spec = self._spec_from_tail(request, args, "gzip")
            body = gzip.compress(await self._image_bytes(spec), mtime=0)
            ctype = q.get("ctype", spec.content_type)
            return await self._send(request, body, ctype, headers={"Content-Encoding": "gzip"})
        if kind == "frames":
            count = arg_int(0, "frame count")
            if not 1 <= count <= 10_000_000:
                raise SpecError("frames must be in 1..10000000")
            return await self._send(request, gif_of_frames(count), "image/gif")
        if kind == "zip-bomb":
            size = arg_int(0, "decompressed size in bytes")
            if not 0 < size <= 1 << 31:
                raise SpecError("zip-bomb size must be in 1..2**31")
            enc = q.get("enc", "gzip")
            if enc not in ("gzip", "deflate"):
                raise SpecError("zip-bomb enc must be gzip or deflate")
            body = await asyncio.to_thread(_zeros_compressed, size, enc)
            headers = {"Content-Encoding": enc}
            return await self._send(request, body, "image/jpeg", headers=headers)
        if kind == "reset":
            return await self._reset(request, args)
        if kind == "flaky-reset":
            k = arg_int(0, "failure count")
            if len(args) < 2:
                raise SpecError("/fault/flaky-reset/<k>/<id>")
            key = (-k, args[1])
            seen = self._flaky[key]
            self._flaky[key] = seen + 1
            if seen < k:
                return await self._reset(request, args[2:])
            return await self._serve_image(request, args[2:], f"flaky-reset-{args[1]}")
        if kind == "hang":
            return await self._hang(request)
        if kind == "drop":
            state = _REQ.get()
            state.broken = True
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        return web.Response(status=404, text=f"no such fault {kind!r}\n")

    @staticmethod
    def _ctype_of(args: Sequence[str]) -> str:
        ext = args[-1].rpartition(".")[2].lower() if args else "jpg"
        return FORMATS.get(ext, FORMATS["jpg"])[1]

    @staticmethod
    async def _redirect_wait(request: web.Request) -> None:
        try:
            wait_ms = float(request.query.get("wait_ms", "0"))
        except ValueError:
            raise SpecError("wait_ms must be a number") from None
        if wait_ms > 0:
            await asyncio.sleep(wait_ms / 1000.0)

    def _redirect(
        self, request: web.Request, location: str, *, keep_query: bool = True
    ) -> web.Response:
        code = int(request.query.get("code", "302"))
        if code not in (301, 302, 303, 307, 308):
            raise SpecError("redirect code must be 301, 302, 303, 307 or 308")
        qs = request.rel_url.raw_query_string
        if keep_query and qs:
            location = f"{location}?{qs}"
        return web.Response(status=code, headers={"Location": location}, text="redirect\n")

    async def _huge(self, request: web.Request, size: int, cl: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if cl not in ("0", "false"):
            resp.content_length = size
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = random.Random(size).randbytes(1 << 16)
        head = _JPEG_HEAD[:size]
        await resp.write(head)
        left = size - len(head)
        while left > 0:
            n = min(left, len(block))
            await resp.write(block[:n])
            left -= n
        return resp

    @staticmethod
    async def _hang(request: web.Request) -> web.StreamResponse:
        _REQ.get().broken = True
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.5)
        return web.Response()

    async def _reset(self, request: web.Request, args: Sequence[str]) -> web.StreamResponse:
        body = await self._image_bytes(self._spec_from_tail(request, args, "reset"))
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.02)
        _REQ.get().broken = True
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return resp


# --------------------------------------------------------------------------------------------
# Subprocess mode


@dataclass
class WebProcess:
    """A ``python -m crawler.testweb serve`` child process, ready to serve."""

    proc: subprocess.Popen[str]
    urls: list[str]  # one base URL per host
    slow_hosts: list[int]  # indexes into urls

    def __enter__(self) -> WebProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_subprocess(
    hosts: int = 8,
    port: int = 0,
    *,
    first_host: int = 2,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> WebProcess:
    """Start ``python -m crawler.testweb serve`` in a child process and wait until it serves
    (``with start_subprocess(...) as web:`` stops it at the end of the block)."""
    cmd = [sys.executable, "-m", "crawler.testweb", "serve", "--hosts", str(hosts)]
    cmd += ["--port", str(port), "--first-host", str(first_host)]
    if log_path is not None:
        cmd += ["--log", os.fspath(log_path)]
    cmd += list(extra_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env)
    web = WebProcess(proc, [], [])
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"testweb serve did not become ready: {cmd}")
            line = line.strip()
            if line == "READY":
                return web
            if line.startswith("http://"):
                web.urls.append(line)
            elif line.startswith("slow hosts:"):
                web.slow_hosts = json.loads(line.split(":", 1)[1])
    except BaseException:
        web.stop()
        raise


# --------------------------------------------------------------------------------------------
# MMC4-shaped shards


async def _cancel_others() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def fault_path(kind: str, rng: random.Random, name: str, other_base: str) -> str:
    """The path of a ``kind`` fault (see :data:`FAULT_KINDS`) named ``name``; ``other_base`` is
    the host a cross-host redirect leads to."""
    w, h = rng.choice([(320, 240), (480, 360), (640, 480), (500, 500)])
    img_tail = f"{w}x{h}/{name}.jpg"
    simple = {
        "404": f"/fault/status/404/{name}",
        "403": f"/fault/status/403/{name}",
        "410": f"/fault/status/410/{name}",
        "500": f"/fault/status/500/{name}",
        "502": f"/fault/status/502/{name}",
        "503": f"/fault/status/503/{name}",
        "429": f"/fault/retry-after/429/1/{name}",
        "503-retry": f"/fault/retry-after/503/2/{name}",
        "html": f"/fault/html/{name}.jpg",
        "svg": f"/fault/svg/{name}.svg",
        "truncated-jpg": f"/fault/truncated/{w}x{h}/{name}.jpg",
        "truncated-png": f"/fault/truncated/{w}x{h}/{name}.png",
        "corrupt": f"/fault/corrupt/{name}.jpg",
        "empty": f"/fault/empty/{name}.jpg",
        "bomb": f"/fault/bomb/{name}.png",
        "redirect": f"/fault/redirect/{rng.randint(1, 3)}/{img_tail}",
        "redirect-loop": f"/fault/redirect-loop?n={name}",
        "redirect-host": "/fault/redirect-to/" + quote(f"{other_base}/img/{img_tail}", safe=""),
        "flaky": f"/fault/flaky/{rng.randint(1, 2)}/{name}/{img_tail}",
        "slow": f"/fault/slow/{rng.randint(500, 3000)}/{img_tail}",
        "trickle": f"/fault/trickle/{rng.choice([2000, 5000, 20000])}/{img_tail}",
        "optout": "/fault/optout/"
        + quote(rng.choice(["noai", "noimageai", "noai, noimageai", "googlebot: noai"]))
        + f"/{img_tail}",
        "otherbot-optout": f"/fault/optout/{quote('otherbot: noai')}/{img_tail}",
        "wrong-ctype": f"/img/{img_tail}?ctype=text/html",
        "gzip": f"/fault/gzip/{img_tail}",
        "reset": f"/fault/reset/{img_tail}",
        "flaky-reset": f"/fault/flaky-reset/1/{name}/{img_tail}",
        "flaky-retry-after": f"/fault/flaky/1/{name}/{img_tail}?status="
        + rng.choice(["429", "503"])
        + f"&retry_after={rng.randint(1, 2)}",
        "hang": f"/fault/hang/{name}",
        "huge-chunked": f"/fault/huge/{rng.choice([50, 200]) * 1_000_000}?cl=0&n={name}",
        "drop": f"/fault/drop/{name}",
        "huge": f"/fault/huge/{rng.choice([20, 50, 200]) * 1_000_000}?n={name}",
    }
    return simple[kind]


#: Fault kinds for :func:`make_docs` and their weights in the default mix.
FAULT_KINDS: dict[str, float] = {
    "404": 0.28,
    "403": 0.05,
    "410": 0.03,
    "500": 0.04,
    "502": 0.02,
    "503": 0.02,
    "429": 0.03,
    "503-retry": 0.03,
    "html": 0.09,
    "svg": 0.02,
    "truncated-jpg": 0.05,
    "truncated-png": 0.02,
    "corrupt": 0.03,
    "empty": 0.02,
    "bomb": 0.01,
    "redirect": 0.07,
    "redirect-loop": 0.01,
    "redirect-host": 0.02,
    "flaky": 0.05,
    "slow": 0.01,
    "trickle": 0.0,
    "optout": 0.03,
    "otherbot-optout": 0.01,
    "wrong-ctype": 0.02,
    "gzip": 0.01,
    "reset": 0.01,
    "drop": 0.01,
    "huge": 0.0,
    "flaky-reset": 0.0,
    "flaky-retry-after": 0.0,
    "hang": 0.0,
    "huge-chunked": 0.0,
}

_WORDS_TEXT = (
    "the a of and to in is for on with as by at from this that it be are was were can will "
    "garden recipe travel city river mountain summer winter family house kitchen museum "
    "market history photo design color light music festival school team game street bridge "
    "coffee bread flower forest ocean beach island road car train book story painting art "
    "project community morning evening weekend beautiful small large old new local simple "
    "favorite amazing quiet bright modern classic fresh warm"
)
_WORDS = _WORDS_TEXT.split()

_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16, 1.0, 4 / 3, 3 / 2)


def _pick_size(rng: random.Random, sizes: str) -> tuple[int, int]:
    aspect = rng.choice(_ASPECTS)
    r = rng.random()
    if sizes == "small":
        long_side = rng.randint(32, 256)
    elif r < 0.12:
        long_side = rng.randint(32, 199)
        aspect = rng.choice((1.0, 1.0, 4 / 3, 3 / 4))
    elif r < 0.94:
        long_side = rng.randint(240, 1024)
    else:
        long_side = rng.randint(1600, 4000)
    if aspect >= 1:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side


def _pick_image_path(rng: random.Random, name: str, sizes: str, variants: bool) -> str:
    w, h = _pick_size(rng, sizes)
    r = rng.random()
    fmt = "jpg" if r < 0.74 else "png" if r < 0.88 else "webp" if r < 0.95 else "gif"
    query = ""
    if variants:
        v = rng.random()
        if fmt == "jpg" and v < 0.01:
            query = "?mode=cmyk"
        elif fmt == "jpg" and v < 0.03:
            query = "?exif=6"
        elif fmt == "png" and v < 0.2:
            query = "?mode=RGBA"
        elif fmt == "png" and v < 0.28:
            query = "?mode=P&transparency=1"
        elif fmt == "png" and v < 0.29:
            query = "?mode=I;16"
        elif fmt == "webp" and v < 0.1:
            query = "?mode=RGBA"
        elif fmt == "gif" and v < 0.3 and w * h <= 640 * 640:
            query = f"?frames={rng.randint(2, 6)}"
    return f"/img/{w}x{h}/{name}.{fmt}{query}"


def make_docs(
    web_or_base_urls: ImageWeb | Sequence[str],
    n_docs: int,
    *,
    seed: int = 0,
    images_per_doc: int | tuple[int, int] = (1, 6),
    sizes: Literal["realistic", "small"] = "realistic",
    faults: float | Mapping[str, float] | None = None,
    variants: bool = True,
    doc_url_prefix: str = "http://example.invalid/doc/",
) -> list[dict[str, Any]]:
    """MMC4-shaped documents whose images live on the given hosts.

    ``sizes="realistic"``: ~12% tiny (32–199 px), ~82% 240–1024 px, ~6% 1600–4000 px (long
    side); JPEG 74%, PNG 14%, WebP 7%, GIF 5%; with ``variants`` a few CMYK/EXIF-rotated JPEGs,
    RGBA/palette/16-bit PNGs and animated GIFs. ``sizes="small"``: 32–256 px (fast tests).
    ``faults``: a total per-image fault probability spread over :data:`FAULT_KINDS` by weight,
    or a mapping kind -> per-image probability. ``image_name`` is ``sha256(raw_url)[:12].jpg``.
    """
    bases = (
        web_or_base_urls.host_urls
        if isinstance(web_or_base_urls, ImageWeb)
        else [b.rstrip("/") for b in web_or_base_urls]
    )
    if not bases:
        raise ValueError("no hosts")
    if isinstance(faults, Mapping):
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        fault_rates = {k: float(v) for k, v in faults.items() if v > 0}
    elif faults:
        total = sum(FAULT_KINDS.values())
        fault_rates = {k: float(faults) * w / total for k, w in FAULT_KINDS.items() if w > 0}
    else:
        fault_rates = {}
    lo, hi = (images_per_doc, images_per_doc) if isinstance(images_per_doc, int) else images_per_doc
    rng = random.Random(_seed_of("docs", seed))
    docs: list[dict[str, Any]] = []
    for d in range(n_docs):
        n_text = rng.randint(3, 10)
        text_list = []
        for _ in range(n_text):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 20))]
            text_list.append(" ".join(words).capitalize() + ".")
        image_info = []
        sim_matrix = []
        for j in range(rng.randint(lo, hi)):
            host = rng.randrange(len(bases))
            name = f"d{seed}-{d:05d}-{j}-{rng.getrandbits(24):06x}"
            path = None
            u = rng.random()
            for kind, p in fault_rates.items():
                if u < p:
                    other = bases[(host + 1) % len(bases)]
                    path = fault_path(kind, rng, name, other)
                    break
                u -= p
            if path is None:
                path = _pick_image_path(rng, name, sizes, variants)
            raw_url = bases[host] + path
            matched = rng.randrange(n_text)
            matched_sim = round(rng.uniform(0.22, 0.36), 6)
            row = [round(rng.uniform(0.08, matched_sim - 0.01), 6) for _ in range(n_text)]
            row[matched] = matched_sim
            sim_matrix.append(row)
            image_info.append(
                {
                    "image_name": hashlib.sha256(raw_url.encode()).hexdigest()[:12] + ".jpg",
                    "raw_url": raw_url,
                    "matched_text_index": matched,
                    "matched_sim": matched_sim,
                    "face_detections": None,
                }
            )
        docs.append(
            {
                "text_list": text_list,
                "url": f"{doc_url_prefix}{d}",
                "image_info": image_info,
                "similarity_matrix": sim_matrix,
                "could_have_url_duplicate": 0,
            }
        )
    return docs


def write_shard(path: str | os.PathLike[str], docs: Iterable[Mapping[str, Any]]) -> int:
    """Write ``docs`` as JSON lines (gzip-compressed, reproducibly, when the name ends .gz)."""
    p = Path(path)
    n = 0
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | gzip.GzipFile = stack.enter_context(open(p, "wb"))
        if p.name.endswith(".gz"):
            out = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0))
        for doc in docs:
            out.write(orjson.dumps(doc) + b"\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# CLI


@click.group()
def cli() -> None:
    """A loopback image web for mmc4-crawler tests, demo and benchmark."""


@cli.command()
@click.option("--hosts", default=8, show_default=True, help="Number of loopback hosts.")
@click.option("--port", default=18650, show_default=True, help="Port for all hosts (0: any).")
@click.option("--first-host", default=2, show_default=True, help="First address 127.0.0.N.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="JSONL arrival log.")
@click.option("--seed", default=0, show_default=True)
@click.option("--latency-median-ms", type=float, default=None, help="Enable lognormal latency.")
@click.option("--latency-sigma", type=float, default=0.5, show_default=True)
@click.option("--slow-host-share", type=float, default=0.0, show_default=True)
@click.option(
    "--slow-mode", type=click.Choice(["delay", "trickle"]), default="delay", show_default=True
)
@click.option("--slow-delay-ms", type=float, default=5000.0, show_default=True)
@click.option("--slow-bytes-per-s", type=int, default=20000, show_default=True)
def serve(
    hosts: int,
    port: int,
    first_host: int,
    log_path: str | None,
    seed: int,
    latency_median_ms: float | None,
    latency_sigma: float,
    slow_host_share: float,
    slow_mode: Literal["delay", "trickle"],
    slow_delay_ms: float,
    slow_bytes_per_s: int,
) -> None:
    """Serve until SIGTERM/SIGINT; prints the base URLs, then READY."""
    latency = None
    if latency_median_ms is not None or slow_host_share > 0:
        latency = Latency(
            median_ms=latency_median_ms or 0.0,
            sigma=latency_sigma,
            slow_host_share=slow_host_share,
            slow_mode=slow_mode,
            slow_delay_ms=slow_delay_ms,
            slow_bytes_per_s=slow_bytes_per_s,
        )
    imageweb = ImageWeb(
        hosts, port, first_host=first_host, latency=latency, seed=seed, log_path=log_path
    )
    asyncio.run(_serve_until_signal(imageweb))


async def _serve_until_signal(imageweb: ImageWeb) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with imageweb:
        for url in imageweb.host_urls:
            click.echo(url)
        if imageweb.slow_hosts:
            click.echo(f"slow hosts: {sorted(imageweb.slow_hosts)}")
        click.echo("READY")
        sys.stdout.flush()
        await stop.wait()


@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--port", default=18650, show_default=True)
@click.option("--hosts", default=8, show_default=True)
@click.option("--first-host", default=2, show_default=True)
@click.option("--docs", "n_docs", default=200, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--images-per-doc", default="1-6", show_default=True, help="N or MIN-MAX.")
@click.option("--sizes", type=click.Choice(["realistic", "small"]), default="realistic")
@click.option("--faults/--no-faults", default=False, help="Mix in faults (see --fault-rate).")
@click.option("--fault-rate", type=float, default=0.04, show_default=True)
def shard(
    out: str,
    port: int,
    hosts: int,
    first_host: int,
    n_docs: int,
    seed: int,
    images_per_doc: str,
    sizes: Literal["realistic", "small"],
    faults: bool,
    fault_rate: float,
) -> None:
    """Write an MMC4-shaped shard (.jsonl or .jsonl.gz) whose images live on the test web."""
    lo_s, _, hi_s = images_per_doc.partition("-")
    per_doc = (int(lo_s), int(hi_s or lo_s))
    bases = [f"http://{addr}:{port}" for addr in ImageWeb(hosts, first_host=first_host).host_addrs]
    docs = make_docs(
        bases,
        n_docs,
        seed=seed,
        images_per_doc=per_doc,
        sizes=sizes,
        faults=fault_rate if faults else None,
    )
    n = write_shard(out, docs)
    images = sum(len(d["image_info"]) for d in docs)
    click.echo(f"wrote {n} documents, {images} images to {out}")


if __name__ == "__main__":
    cli()
