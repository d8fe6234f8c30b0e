"""A decoded image written as bytes: its mode normalized to one the encoders take (L, LA, RGB,
RGBA) and encoded as JPEG, PNG, WebP or GIF with the crawl's codec settings, no metadata
but the ICC profile. Used by `crawler.images`, in the image processes."""

from __future__ import annotations

import io
import zlib

from PIL import Image

_PNG_COMPRESS_LEVEL = 1  # zlib level 1: ~9% less CPU per image than 3, ~4% larger PNGs
# zlib's run-length strategy, meant for filtered PNG rows: 10-30% less CPU than the default
# strategy at level 1, and smaller files on photographic content (larger on flat gradients).
_PNG_STRATEGY = zlib.Z_RLE
_WEBP_METHOD = 2  # libwebp effort 0-6: 2 is ~2× faster than the default 4, same size here


def normalize_mode(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert to L, LA, RGB or RGBA; also say whether the colour space is unchanged."""
    mode = img.mode
    has_trns = "transparency" in img.info
    if mode in ("RGB", "RGBA", "L", "LA") and not (has_trns and mode in ("RGB", "L")):
        return img, True
    if mode in ("RGB", "L", "P", "PA", "1") and (has_trns or mode == "PA"):
        return img.convert("RGBA"), True
    if mode == "P":
        palette_mode = img.palette.mode if img.palette is not None else "RGB"
        return img.convert("RGBA" if "A" in palette_mode else "RGB"), True
    if mode == "1":
        return img.convert("L"), True
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit grey: scale 0..65535 onto 0..255 (Pillow's convert("L") would clip at 255).
        # numpy is imported here, by the first such image: every process that imports this
        # module (the crawl worker, `run`, the CLI) would otherwise pay ~0.1 s of CPU for it.
        import numpy as np

        arr = np.asarray(img)
        if arr.dtype.itemsize == 2:  # keep the high byte, as libpng's strip_16 does
            return Image.fromarray((arr >> 8).astype(np.uint8)), False
        scaled = np.clip(arr.astype(np.float32) / 257.0 + 0.5, 0, 255)  # "I" holding 16-bit
        return Image.fromarray(scaled.astype(np.uint8)), False
    if mode in ("La", "RGBa"):
        return img.convert(mode.upper()), True
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), False
    return img.convert("RGBA" if "A" in mode else "RGB"), False


def encode(img: Image.Image, fmt: str, icc: object, jpeg_quality: int, webp_quality: int) -> bytes:
    """`img` as `fmt` (JPEG, PNG, WEBP or GIF) bytes, with its ICC profile `icc` (bytes) and
    no other metadata."""
    img.info = {}  # no EXIF (orientation!), comments, durations... leak into the output
    params: dict[str, object] = {}
    if isinstance(icc, bytes) and icc:
        params["icc_profile"] = icc
    buf = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img.save(buf, "JPEG", quality=jpeg_quality, optimize=False, progressive=False, **params)
    elif fmt == "PNG":
        img.save(
            buf, "PNG", compress_level=_PNG_COMPRESS_LEVEL, compress_type=_PNG_STRATEGY, **params
        )
    elif fmt == "WEBP":
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if img.mode == "LA" else "RGB")
        img.save(buf, "WEBP", quality=webp_quality, method=_WEBP_METHOD, **params)
    else:  # GIF
        pal, transparency = _to_palette(img)
        if transparency is not None:
            params["transparency"] = transparency
        params.pop("icc_profile", None)
        pal.save(buf, "GIF", optimize=False, **params)
    return buf.getvalue()


def _to_palette(img: Image.Image) -> tuple[Image.Image, int | None]:
    """A palette image for GIF: 256 colours, or 255 plus a transparent index 255."""
    if img.mode == "L":
        return img, None
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA") if img.mode == "LA" else img
        mask = rgba.getchannel("A").point(lambda a: 255 if a < 128 else 0)
        if mask.getextrema()[1] == 0:  # nothing transparent
            return rgba.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE), None
        pal = rgba.convert("RGB").quantize(255, method=Image.Quantize.FASTOCTREE)
        pal.paste(255, mask=mask)
        return pal, 255
    return img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE), None
