"""Images of the test web, generated from their spec alone (same spec, same bytes), and the
bodies of the image faults: animated GIFs, decompression bombs, compressed zeros."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps


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


def seed_of(*parts: object) -> int:
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
    base = _pattern(spec.width, spec.height, seed_of(spec.name, spec.width, spec.height), graphic)
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


def zeros_compressed(size: int, enc: str) -> bytes:
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


JPEG_HEAD = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    b"\xff\xdb\x00\x43\x00" + bytes(range(1, 65))
)
