"""What goes into an image job (`ImageSettings`, from the ``[images]`` settings) and what comes
out of it (`ImageResult`); `crawler.images` does the job and exports both."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.config import Config
from core.status import Status


@dataclass(frozen=True, slots=True)
class ImageSettings:
    max_side: int = 800
    max_pixels: int = 100_000_000  # decompression-bomb guard
    max_frames: int = 1000  # an animation with more frames is too_many_frames
    jpeg_quality: int = 90
    webp_quality: int = 90
    # Filter of the final shrinking step: "bilinear", "box", "bicubic" or "lanczos".
    resample: str = "bilinear"
    # "keep" (the rules above), or "jpeg" / "webp": every stored image in that format.
    format: str = "keep"

    def __reduce__(self) -> tuple[type[ImageSettings], tuple[object, ...]]:
        # Sent with every pool job: positional, as ImageResult (see there).
        return ImageSettings, tuple(getattr(self, name) for name in _SETTINGS_FIELDS)


@dataclass(frozen=True, slots=True)
class ImageResult:
    # OK, NOT_AN_IMAGE, DECODE_ERROR, TOO_MANY_PIXELS, TOO_MANY_FRAMES, UNSUPPORTED_IMAGE
    # (core.status), and WRITE_ERROR or store.OUTPUT_UNWRITABLE from the pool job that stores it
    status: Status
    # Detected by libmagic from the input bytes (never the HTTP header).
    mimetype: str
    # Short human-readable reason when status is not OK.
    error: str = ""
    # Bytes to store when re-encoded; None when the input is stored as is, or on failure.
    data: bytes | None = None
    # True: store the input bytes unchanged.
    keep_original: bool = False
    # Mimetype of what is stored.
    stored_mimetype: str = ""
    # Stored dimensions.
    width: int = 0
    height: int = 0
    # Original dimensions, as displayed (after EXIF orientation).
    orig_width: int = 0
    orig_height: int = 0
    # Hex sha256 of the stored bytes.
    sha256: str = ""
    # Frames in the original (animated GIF/WebP/PNG).
    frames: int = 1
    # Size of what was written to disk (set by the pool job that stores it).
    stored_bytes: int = 0

    def __reduce__(self) -> tuple[type[ImageResult], tuple[object, ...]]:
        # Crosses from the image process once per image: positional fields pickle and load
        # several times faster than the dataclass default (__getstate__/__setstate__ walking
        # dataclasses.fields() on each side).
        return ImageResult, tuple(getattr(self, name) for name in _RESULT_FIELDS)


_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(ImageResult))
_SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(ImageSettings))


def settings_from(cfg: Config) -> ImageSettings:
    return ImageSettings(
        max_side=cfg.images.max_side,
        max_pixels=cfg.images.max_pixels,
        max_frames=cfg.images.max_frames,
        jpeg_quality=cfg.images.jpeg_quality,
        webp_quality=cfg.images.webp_quality,
        resample=cfg.images.resample,
        format=cfg.images.format,
    )


def init_args(cfg: Config) -> tuple[ImageSettings, int]:
    """`init_worker`'s arguments under `cfg`: how every image process of a crawl starts (and
    the benchmarks' bare cost, so that it runs the same code path)."""
    return settings_from(cfg), cfg.worker.image_process_heap_mb
