"""Specifications of crawler.images: what is stored for each kind of downloaded image."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import magic
import numpy as np
import pytest
from PIL import Image, ImageFile

from core.config import load as load_config
from crawler.images import (
    ImageResult,
    ImageSettings,
    init_args,
    init_worker,
    process_image,
    target_size,
)

SETTINGS = ImageSettings()
STATUSES = {"ok", "not_an_image", "decode_error", "too_many_pixels", "unsupported_image"}
_MAGIC = magic.Magic(mime=True)


# ---------------------------------------------------------------- helpers


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    r = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    b = 128 + 100 * np.sin(8 * x + 5 * y)
    rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray((255 * (x * np.ones_like(y) > 0.5)).astype(np.uint8))
        img.putalpha(alpha)
        return img
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def stored_bytes(result: ImageResult, original: bytes) -> bytes:
    if result.keep_original:
        assert result.data is None
        return original
    assert result.data is not None
    return result.data


def check_ok(result: ImageResult, original: bytes, max_side: int = 800) -> Image.Image:
    """Everything an "ok" result promises, checked on the bytes that would be stored."""
    assert result.status == "ok", result.error
    assert result.error == ""
    stored = stored_bytes(result, original)
    assert result.sha256 == hashlib.sha256(stored).hexdigest()
    assert _MAGIC.from_buffer(stored[:4096]) == result.stored_mimetype
    img = Image.open(io.BytesIO(stored))
    img.load()
    assert img.size == (result.width, result.height)
    assert max(result.width, result.height) <= max_side
    assert result.width <= result.orig_width and result.height <= result.orig_height
    if max(result.orig_width, result.orig_height) > max_side:
        assert max(result.width, result.height) == max_side
    # aspect ratio kept to within a pixel
    if result.orig_width >= result.orig_height:
        expected = result.orig_height * result.width / result.orig_width
        assert abs(result.height - expected) <= 1
    else:
        expected = result.orig_width * result.height / result.orig_height
        assert abs(result.width - expected) <= 1
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height, with a tiny (wrong) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- target_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1600, 1200), (800, 600)),
        ((1200, 1600), (600, 800)),
        ((800, 800), (800, 800)),
        ((801, 800), (800, 799)),
        ((640, 480), (640, 480)),
        ((1, 1), (1, 1)),
        ((5000, 10), (800, 2)),
        ((10, 5000), (2, 800)),
        ((100_000, 1), (800, 1)),
        ((4000, 3000), (800, 600)),
    ],
)
def test_target_size_caps_longer_side_keeps_aspect_and_never_enlarges(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert target_size(*size, 800) == expected


def test_target_size_rejects_empty_dimensions() -> None:
    with pytest.raises(ValueError):
        target_size(0, 10, 800)


# ---------------------------------------------------------------- JPEG


@pytest.mark.parametrize(
    "size",
    [(1, 1), (7, 3), (120, 80), (640, 480), (800, 800), (800, 200)],
)
def test_small_valid_jpeg_is_kept_as_downloaded(size: tuple[int, int]) -> None:
    data = encode(picture(*size), "JPEG", quality=85)
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original
    assert result.mimetype == result.stored_mimetype == "image/jpeg"
    assert (result.width, result.height) == (result.orig_width, result.orig_height) == size
    assert result.frames == 1


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((801, 600), (800, 599)),
        ((1600, 1200), (800, 600)),
        ((4000, 3000), (800, 600)),
        ((1000, 3000), (267, 800)),
        ((5000, 10), (800, 2)),
        ((10, 5000), (2, 800)),
        ((2049, 1537), (800, 600)),
    ],
)
def test_large_jpeg_is_shrunk_to_max_side_as_jpeg(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = encode(picture(*size), "JPEG", quality=90)
    result = process_image(data, SETTINGS)
    img = check_ok(result, data)
    assert not result.keep_original
    assert result.stored_mimetype == "image/jpeg"
    assert (result.orig_width, result.orig_height) == size
    assert (result.width, result.height) == expected
    assert img.mode == "RGB"


@pytest.mark.parametrize("resample", ["bilinear", "box", "bicubic", "lanczos"])
@pytest.mark.parametrize("size", [(3000, 2000), (1000, 750)])
def test_shrunk_jpeg_looks_like_the_original(resample: str, size: tuple[int, int]) -> None:
    original = picture(*size)
    data = encode(original, "JPEG", quality=95)
    result = process_image(data, ImageSettings(resample=resample))
    out = check_ok(result, data)
    assert out.size == target_size(*size, 800)
    reference = original.resize(out.size, Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 4


def test_progressive_large_jpeg_is_shrunk() -> None:
    data = encode(picture(2400, 1600), "JPEG", quality=80, progressive=True)
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert (result.width, result.height) == (800, 533)


def test_resample_filter_decides_the_shrunk_pixels() -> None:
    data = encode(picture(1000, 750), "PNG")
    pixels = {
        resample: np.asarray(check_ok(process_image(data, ImageSettings(resample=resample)), data))
        for resample in ("bilinear", "box", "bicubic")
    }
    expected = np.asarray(Image.open(io.BytesIO(data)).resize((800, 600), Image.Resampling.BOX))
    assert np.array_equal(pixels["box"], expected)  # lossless PNG: exactly Pillow's filter
    assert not np.array_equal(pixels["box"], pixels["bilinear"])
    assert not np.array_equal(pixels["bilinear"], pixels["bicubic"])


def test_custom_max_side_is_honoured() -> None:
    data = encode(picture(640, 480), "JPEG")
    result = process_image(data, ImageSettings(max_side=256))
    check_ok(result, data, max_side=256)
    assert (result.width, result.height) == (256, 192)


def test_grayscale_jpeg_stays_grayscale() -> None:
    data = encode(picture(2000, 1000, "L"), "JPEG")
    result = process_image(data, SETTINGS)
    img = check_ok(result, data)
    assert img.mode == "L"
    assert (result.width, result.height) == (800, 400)


@pytest.mark.parametrize("size", [(300, 200), (2000, 1000)])
def test_cmyk_jpeg_is_always_reencoded_as_rgb(size: tuple[int, int]) -> None:
    cmyk = Image.new("CMYK", size, (0, 255, 255, 0))  # pure red in CMYK terms
    data = encode(cmyk, "JPEG", quality=95)
    result = process_image(data, SETTINGS)
    img = check_ok(result, data)
    assert not result.keep_original
    assert img.mode == "RGB"
    r, g, b = img.convert("RGB").getpixel((img.width // 2, img.height // 2))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def _rotated_jpeg(width: int, height: int, orientation: int) -> bytes:
    img = picture(width, height)
    img.paste((255, 0, 0), (0, 0, width // 10, height // 10))  # red mark, stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("stored", "displayed", "expected"),
    [((1200, 800), (800, 1200), (533, 800)), ((300, 200), (200, 300), (200, 300))],
)
def test_exif_rotated_jpeg_is_stored_upright_with_displayed_dimensions(
    stored: tuple[int, int], displayed: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = _rotated_jpeg(*stored, orientation=6)
    result = process_image(data, SETTINGS)
    img = check_ok(result, data)
    assert not result.keep_original  # always re-encoded, even when small
    assert (result.orig_width, result.orig_height) == displayed
    assert (result.width, result.height) == expected
    assert img.getexif().get(0x0112, 1) == 1
    # orientation 6 means "rotate 90° clockwise to display": the mark ends top-right
    r, g, b = img.convert("RGB").getpixel((img.width - 3, 3))  # type: ignore[misc]
    assert r > 200 and g < 80 and b < 80


def test_jpeg_with_orientation_one_is_kept() -> None:
    data = _rotated_jpeg(300, 200, orientation=1)
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original


# ---------------------------------------------------------------- truncated and corrupt


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("size", [(600, 400), (2000, 1500)])
@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.999])
def test_truncated_jpeg_is_a_decode_error_even_when_small_enough_to_keep(
    progressive: bool, size: tuple[int, int], fraction: float
) -> None:
    data = encode(picture(*size), "JPEG", quality=90, progressive=progressive)
    result = process_image(_cut(data, fraction), SETTINGS)
    assert result.status == "decode_error"
    assert result.data is None and not result.keep_original
    assert "truncated" in result.error


def test_jpeg_missing_only_its_end_marker_is_a_decode_error() -> None:
    data = encode(picture(300, 200), "JPEG")
    assert data.endswith(b"\xff\xd9")
    assert process_image(data[:-2], SETTINGS).status == "decode_error"


def test_truncated_images_are_rejected_even_if_someone_enabled_load_truncated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(picture(300, 200), "JPEG")
    assert process_image(_cut(data, 0.7), SETTINGS).status == "decode_error"


@pytest.mark.parametrize(
    ("fmt", "size"),
    [
        ("PNG", (300, 200)),
        ("PNG", (1600, 1000)),
        ("WEBP", (300, 200)),
        ("WEBP", (1600, 1000)),
        ("GIF", (300, 200)),
        ("GIF", (1600, 1000)),
    ],
)
def test_truncated_png_webp_gif_are_decode_errors(fmt: str, size: tuple[int, int]) -> None:
    data = encode(picture(*size), fmt)
    result = process_image(_cut(data, 0.6), SETTINGS)
    assert result.status == "decode_error", result


def test_jpeg_header_followed_by_garbage_is_a_decode_error() -> None:
    data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8
    result = process_image(data, SETTINGS)
    assert result.mimetype == "image/jpeg"
    assert result.status == "decode_error"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_random_corruption_never_raises_and_anything_ok_decodes(fmt: str) -> None:
    rng = np.random.default_rng(42)
    base = bytearray(encode(picture(200, 150), fmt))
    for _ in range(40):
        data = bytearray(base)
        for pos in rng.integers(0, len(data), size=8):
            data[int(pos)] = int(rng.integers(0, 256))
        result = process_image(bytes(data), SETTINGS)
        assert result.status in STATUSES
        if result.status == "ok":
            check_ok(result, bytes(data))
        else:
            assert result.error and result.data is None and not result.keep_original


# ---------------------------------------------------------------- not images


@pytest.mark.parametrize(
    ("data", "mimetype"),
    [
        (b"", "application/x-empty"),
        (b"<!DOCTYPE html><html><body><h1>Not found</h1></body></html>", "text/html"),
        (
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10"/></svg>',
            "image/svg+xml",
        ),
        (b"just some plain text and nothing to see here\n" * 4, "text/plain"),
        (b'{"error": "forbidden"}', "application/json"),
    ],
)
def test_non_images_are_not_decoded(data: bytes, mimetype: str) -> None:
    result = process_image(data, SETTINGS)
    assert result.status == "not_an_image"
    assert result.mimetype == mimetype
    assert result.data is None and not result.keep_original and result.error


def test_image_type_pillow_may_not_read_is_unsupported() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    result = process_image(heic, SETTINGS)
    assert result.mimetype == "image/heic"
    assert result.status == "unsupported_image"


# ---------------------------------------------------------------- decompression bombs


def test_png_header_claiming_50000x50000_is_refused_before_decoding() -> None:
    result = process_image(png_header_only(50_000, 50_000), SETTINGS)
    assert result.status == "too_many_pixels"
    assert result.mimetype == "image/png"


def test_pixel_limit_comes_from_settings() -> None:
    data = encode(picture(200, 100), "PNG")
    assert process_image(data, ImageSettings(max_pixels=19_999)).status == "too_many_pixels"
    assert process_image(data, ImageSettings(max_pixels=20_000)).status == "ok"


def test_pillow_bomb_warning_never_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow warns between 1× and 2× MAX_IMAGE_PIXELS; the tests turn warnings into errors.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    data = encode(picture(200, 100), "PNG")
    result = process_image(data, SETTINGS)
    assert result.status == "ok"


def test_pillow_bomb_error_is_too_many_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    data = encode(picture(200, 100), "JPEG")
    assert process_image(data, SETTINGS).status == "too_many_pixels"


def test_init_worker_sets_pillow_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    init_worker(ImageSettings(max_pixels=1234))
    assert Image.MAX_IMAGE_PIXELS == 1234
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- PNG


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
def test_small_valid_png_is_kept_whatever_its_mode(mode: str) -> None:
    img = picture(300, 200, "RGBA" if mode in ("RGBA", "LA") else "RGB")
    img = (
        img.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.full((200, 300), 40000, dtype=np.uint16))
    )
    data = encode(img, "PNG")
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original and result.stored_mimetype == "image/png"


@pytest.mark.parametrize(
    ("mode", "stored_mode"),
    [("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "L"), ("LA", "LA"), ("P", "RGB"), ("1", "L")],
)
def test_large_png_is_shrunk_to_png_keeping_alpha(mode: str, stored_mode: str) -> None:
    img = picture(2000, 1000, "RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode)
    data = encode(img, "PNG")
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert result.stored_mimetype == "image/png"
    assert (result.width, result.height) == (800, 400)
    assert out.mode == stored_mode
    if "A" in stored_mode:  # left half transparent, right half opaque
        alpha = out.getchannel("A")
        assert alpha.getpixel((10, 200)) == 0 and alpha.getpixel((790, 200)) == 255


def test_large_palette_png_with_transparency_becomes_rgba() -> None:
    img = Image.new("P", (1600, 1600), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (800, 0, 1600, 1600))
    data = encode(img, "PNG", transparency=0)
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert out.mode == "RGBA"
    assert out.getpixel((10, 10))[3] == 0  # type: ignore[index]
    assert out.getpixel((790, 10)) == (255, 0, 0, 255)


def test_large_16bit_grayscale_png_is_scaled_to_8bit_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (1000, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert out.mode == "L"
    values = np.asarray(out)
    assert values[:, :5].mean() < 3 and values[:, -5:].mean() > 252
    assert abs(int(values[500 // 2, 400]) - 128) <= 3  # the middle is mid-grey, not white


def test_png_rotated_by_exif_is_stored_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(picture(300, 200), "PNG", exif=exif.tobytes())
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert not result.keep_original
    assert (result.width, result.height) == (200, 300)


def test_animated_png_within_bounds_is_kept_with_its_frame_count() -> None:
    frames = [picture(200, 100, seed=i) for i in range(3)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original and result.frames == 3


# ---------------------------------------------------------------- WebP


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_small_webp_is_kept(mode: str) -> None:
    data = encode(picture(400, 300, mode), "WEBP", quality=80)
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original and result.stored_mimetype == "image/webp"


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_large_webp_is_shrunk_to_webp_keeping_alpha(mode: str) -> None:
    data = encode(picture(1800, 1200, mode), "WEBP", quality=80)
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert result.stored_mimetype == "image/webp"
    assert (result.width, result.height) == (800, 533)
    assert out.mode == mode


def test_animated_webp_larger_than_max_side_becomes_a_still_first_frame() -> None:
    frames = [Image.new("RGB", (1000, 500), c) for c in ("red", "green", "blue")]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert result.frames == 3
    assert getattr(out, "n_frames", 1) == 1
    r, g, b = out.convert("RGB").getpixel((10, 10))  # type: ignore[misc]
    assert r > 200 and g < 40 and b < 40


# ---------------------------------------------------------------- GIF


def test_small_static_gif_is_kept() -> None:
    data = encode(picture(300, 200).convert("P"), "GIF")
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original and result.stored_mimetype == "image/gif"


def test_large_static_gif_is_shrunk_to_gif() -> None:
    data = encode(picture(1600, 900), "GIF")
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert result.stored_mimetype == "image/gif"
    assert (result.width, result.height) == (800, 450)
    assert out.mode == "P"


def test_large_gif_with_transparency_keeps_transparent_pixels() -> None:
    img = Image.new("P", (1200, 600), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (600, 0, 1200, 600))
    data = encode(img, "GIF", transparency=0)
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert out.convert("RGBA").getpixel((10, 10))[3] == 0  # type: ignore[index]
    assert out.convert("RGBA").getpixel((790, 10)) == (0, 0, 255, 255)


def _animated_gif(size: tuple[int, int], count: int = 3) -> bytes:
    colours = ["red", "green", "blue", "yellow", "white"]
    frames = [Image.new("RGB", size, colours[i % 5]).convert("P") for i in range(count)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def test_animated_gif_within_bounds_is_kept_when_every_frame_decodes() -> None:
    data = _animated_gif((320, 240))
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.keep_original and result.frames == 3


def test_animated_gif_with_a_truncated_last_frame_is_a_decode_error() -> None:
    frames = [picture(320, 240, seed=i).convert("P") for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    result = process_image(data[: len(data) - 2000], SETTINGS)
    assert result.status == "decode_error"


def test_large_animated_gif_becomes_a_still_of_its_first_frame() -> None:
    data = _animated_gif((1600, 800))
    result = process_image(data, SETTINGS)
    out = check_ok(result, data)
    assert result.frames == 3 and result.stored_mimetype == "image/gif"
    assert getattr(out, "n_frames", 1) == 1
    assert (result.width, result.height) == (800, 400)
    assert out.convert("RGB").getpixel((400, 200)) == (255, 0, 0)


# ---------------------------------------------------------------- other formats


@pytest.mark.parametrize(
    ("fmt", "size", "mode", "stored"),
    [
        ("BMP", (300, 200), "RGB", "image/jpeg"),
        ("BMP", (1600, 1200), "RGB", "image/jpeg"),
        ("TIFF", (1000, 2000), "RGB", "image/jpeg"),
        ("TIFF", (300, 200), "RGBA", "image/png"),
        ("TIFF", (300, 200), "CMYK", "image/jpeg"),
        ("ICO", (64, 64), "RGBA", "image/png"),
    ],
)
def test_other_formats_are_always_reencoded_jpeg_or_png_with_alpha(
    fmt: str, size: tuple[int, int], mode: str, stored: str
) -> None:
    img = picture(*size, "RGBA" if mode == "RGBA" else "RGB").convert(mode)
    data = encode(img, fmt)
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert not result.keep_original
    assert result.stored_mimetype == stored


def test_other_format_with_fully_opaque_alpha_is_stored_as_jpeg() -> None:
    data = encode(picture(300, 200).convert("RGBA"), "TIFF")
    result = process_image(data, SETTINGS)
    check_ok(result, data)
    assert result.stored_mimetype == "image/jpeg"


# ---------------------------------------------------------------- process pool


def test_results_and_settings_cross_a_process_pool() -> None:
    settings = ImageSettings(max_side=300, max_pixels=10_000_000)
    inputs = [encode(picture(900, 600), "JPEG"), b"<html></html>", png_header_only(9000, 9000)]
    with ProcessPoolExecutor(
        2, mp_context=get_context("fork"), initializer=init_worker, initargs=(settings,)
    ) as pool:
        results = list(pool.map(process_image, inputs, [settings] * len(inputs)))
    assert [r.status for r in results] == ["ok", "not_an_image", "too_many_pixels"]
    assert (results[0].width, results[0].height) == (300, 200)
    assert pickle.loads(pickle.dumps(results[0])) == results[0]
    odd = ImageSettings(
        max_side=640, max_pixels=5, jpeg_quality=70, webp_quality=60, resample="box"
    )
    assert pickle.loads(pickle.dumps(odd)) == odd


def test_jpeg_frame_header_claiming_a_huge_size_is_refused_before_decoding() -> None:
    data = bytearray(encode(picture(64, 48), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    result = process_image(bytes(data), SETTINGS)
    assert result.status == "too_many_pixels"


def test_animation_too_big_to_validate_frame_by_frame_is_stored_as_first_frame_still() -> None:
    data = _animated_gif((320, 240), count=3)  # 3 × 76 800 pixels
    result = process_image(data, ImageSettings(max_pixels=200_000))
    out = check_ok(result, data)
    assert not result.keep_original and result.frames == 3
    assert getattr(out, "n_frames", 1) == 1
    assert (result.width, result.height) == (320, 240)


def test_image_processes_start_from_the_crawl_configuration() -> None:
    cfg = load_config(
        None,
        environ={},
        overrides=["images.max_side=512", "images.resample=box", "worker.image_process_heap_mb=0"],
    )
    assert init_args(cfg) == (ImageSettings(max_side=512, resample="box"), 0)
    assert init_args(load_config(None, environ={}))[1] == 256
