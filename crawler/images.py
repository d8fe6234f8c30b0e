"""Validate and shrink downloaded images (the CPU-heavy part of a worker).

`process_image` takes the raw bytes of a response and returns an `ImageResult` saying what to
store: the input bytes unchanged (``keep_original``) or re-encoded bytes (``data``). It runs in
the worker's image processes (`crawler.pool`), whose initializer is `init_worker`; it never
raises for bad input.

Rules
-----
* The type comes from libmagic on the first 4 KiB (never from the HTTP header). Text (HTML,
  SVG, ...), empty bodies and other non-``image/*`` types are ``not_an_image`` and are not
  decoded. ``image/*`` types Pillow is not allowed to read here (HEIC, TGA, EPS, ...) are
  ``unsupported_image``.
* More than ``max_pixels`` pixels (from the header, before any decoding) is ``too_many_pixels``.
* An animation of more than ``max_frames`` frames is ``too_many_frames`` (counted from the
  header for WebP and APNG; a GIF's frames are walked, headers only, up to ``max_frames`` + 1).
* Every image is decoded before it is accepted, so truncated or corrupt files are
  ``decode_error`` (``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off).
* The stored image has its longer side at most ``max_side``, aspect ratio kept, never enlarged
  (`target_size`). EXIF orientation is applied: an image with orientation != 1 is always
  re-encoded, upright, without the tag.
* ``orig_width``/``orig_height`` are the *displayed* dimensions of the original, that is after
  its EXIF orientation is applied (a 4000×3000 file with orientation 6 reports 3000×4000).
  ``width``/``height`` are those of the stored image.
* Re-encoded images carry no EXIF or other metadata; the ICC profile is kept unless the colour
  space changed (CMYK → RGB, 16-bit → 8-bit).

Kept or re-encoded, per format
------------------------------
"Small" means longer side <= ``max_side`` and EXIF orientation 1 (or none).

* JPEG (L, RGB): small → kept, validated by a 1/8-scale DCT decode (libjpeg still reads every
  entropy-coded byte, so truncation is caught). Larger → decoded at the smallest DCT scale
  (1/2, 1/4, 1/8) still >= the target, resized to the exact target with the ``resample``
  filter (bilinear unless configured), JPEG at ``jpeg_quality`` (baseline, not optimized).
  Grey stays L.
* JPEG CMYK/YCCK: always re-encoded, as RGB JPEG (Adobe-inverted CMYK is undone by Pillow).
* PNG: small → kept after a full decode. Larger → PNG (compress_level 1, RLE strategy): RGB,
  RGBA, L, LA kept; P → RGBA if it has transparency, else RGB; 1-bit → L; 16-bit grey →
  8-bit L (high byte, 65535 → 255; never clipped).
* WebP: small → kept after a full decode. Larger → lossy WebP at ``webp_quality`` (effort 2),
  alpha kept.
* GIF: small → kept after a full decode. Larger → GIF (FASTOCTREE 256-colour palette; alpha
  becomes 1-bit transparency at 50%).
* Animated GIF/WebP/PNG: small → kept if every frame decodes (``frames`` = frame count).
  Larger → first frame only, resized, stored as a still in the same format. An animation whose
  frames add up to more than ``max_pixels`` is treated the same way (first-frame still).
* BMP, TIFF, ICO, AVIF, JPEG 2000, PPM, PCX: always re-encoded, first frame: JPEG when there is
  no alpha (an all-opaque alpha counts as none), PNG with alpha.

``images.format`` = ``jpeg`` or ``webp`` (as img2dataset's ``encode_format``): images of any
other format are stored in that one (first frame, upright, shrunk as above; alpha composited
onto white for JPEG, kept for WebP) at ``jpeg_quality`` / ``webp_quality``; images already in
it follow the rules above. The file keeps the shard's ``image_name`` whatever its format, so
under ``keep`` the extension of a name may not match the bytes (a ``.jpg`` holding a PNG): the
record's ``mimetype`` says what the file is.

Process-global state: `init_worker` sets ``Image.MAX_IMAGE_PIXELS``; `process_image` forces
``ImageFile.LOAD_TRUNCATED_IMAGES`` off and silences Pillow's warnings for its own duration
(``warnings.catch_warnings``, so call it from one thread per process, as the pool does).
"""

from __future__ import annotations

import hashlib
import io
import warnings

import magic
import PIL
from PIL import Image, ImageFile, UnidentifiedImageError, features

from core import status
from core.config import RESAMPLE_FILTERS
from core.status import Status
from crawler.encode import encode, normalize_mode
from crawler.heap import keep_freed_memory
from crawler.imagejob import ImageResult, ImageSettings, init_args, settings_from

__all__ = [
    "ImageResult", "ImageSettings", "init_args", "init_worker", "library_versions",
    "process_image", "settings_from", "target_size",
]  # fmt: skip


# Pillow formats allowed to open each detected mimetype. Anything else that libmagic calls
# image/* is UNSUPPORTED_IMAGE (HEIC, SVG handled as text, EPS needs Ghostscript, TGA has no
# magic number so libmagic reports random binary as image/x-tga, ...).
_OPEN_FORMATS: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("JPEG",),
    "image/pjpeg": ("JPEG",),
    "image/png": ("PNG",),
    "image/apng": ("PNG",),
    "image/gif": ("GIF",),
    "image/webp": ("WEBP",),
    "image/bmp": ("BMP", "DIB"),
    "image/x-ms-bmp": ("BMP", "DIB"),
    "image/tiff": ("TIFF",),
    "image/vnd.microsoft.icon": ("ICO", "CUR"),
    "image/x-icon": ("ICO", "CUR"),
    "image/avif": ("AVIF",),
    "image/jp2": ("JPEG2000",),
    "image/jpx": ("JPEG2000",),
    "image/x-portable-bitmap": ("PPM",),
    "image/x-portable-greymap": ("PPM",),
    "image/x-portable-pixmap": ("PPM",),
    "image/x-portable-anymap": ("PPM",),
    "image/x-pcx": ("PCX",),
    "image/vnd.zbrush.pcx": ("PCX",),
}
# Formats whose files are stored unchanged when small and valid, and re-encoded to themselves.
_SAME_FORMAT = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "GIF": "GIF"}
# images.format: the one format every stored image has ("keep": none).
_UNIFORM = {"jpeg": "JPEG", "webp": "WEBP"}
_FORMAT_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}

# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
# The resize is most of the work of shrinking (see docs/performance.md): bilinear and box cost
# well under bicubic; the names are the `images.resample` setting's.
_RESAMPLE = {name: Image.Resampling[name.upper()] for name in RESAMPLE_FILTERS}
_REDUCING_GAP = 2.0  # as Image.thumbnail: box-reduce first while the ratio exceeds 2

_magic: magic.Magic | None = None


def _get_magic() -> magic.Magic:
    global _magic
    if _magic is None:
        _magic = magic.Magic(mime=True)
    return _magic


def library_versions() -> str:
    """Pillow's version and its JPEG library's (a pillow-simd build says so in its version)."""
    return f"Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')})"


def init_worker(settings: ImageSettings, keep_heap_mb: int = 0) -> None:
    """Pool initializer: Pillow's global limits, libmagic loaded once per process, and (with
    `keep_heap_mb` > 0) a C heap that keeps freed memory for the next image (`crawler.heap`)."""
    keep_freed_memory(keep_heap_mb)
    # Our own check against settings.max_pixels is authoritative; Pillow's is the backstop
    # (its warning is silenced in process_image, its error above 2× is too_many_pixels).
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.init()  # import every plugin now, not during the first image
    _get_magic()


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most max_side, aspect ratio kept, never enlarged."""
    if width <= 0 or height <= 0 or max_side <= 0:
        raise ValueError(f"bad size {width}x{height} (max_side {max_side})")
    if width <= max_side and height <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


class _Refused(Exception):
    """A non-ok outcome decided by this module (status, message)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def process_image(data: bytes, settings: ImageSettings) -> ImageResult:
    """Identify, validate and (if needed) shrink one downloaded image. Never raises."""
    try:
        mimetype = str(_get_magic().from_buffer(data[:4096])) if data else "application/x-empty"
    except Exception as exc:  # libmagic failing on odd bytes
        return ImageResult(status.NOT_AN_IMAGE, "application/octet-stream", f"libmagic: {exc}")
    if not mimetype.startswith("image/") or mimetype == "image/svg+xml":
        return ImageResult(status.NOT_AN_IMAGE, mimetype, f"not an image ({mimetype})")
    formats = _OPEN_FORMATS.get(mimetype)
    if formats is None:
        return ImageResult(status.UNSUPPORTED_IMAGE, mimetype, f"unsupported image type {mimetype}")

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a stray True elsewhere must never reach us
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd EXIF, palettes, bombs between 1× and 2× MAX_IMAGE_PIXELS...
            # none of which may escape; the pixel limit is checked here from the header.
            warnings.simplefilter("ignore")
            return _process(data, mimetype, formats, settings)
    except _Refused as exc:
        return ImageResult(exc.status, mimetype, str(exc))
    except Image.DecompressionBombError as exc:
        return ImageResult(status.TOO_MANY_PIXELS, mimetype, str(exc))
    except UnidentifiedImageError:
        return ImageResult(status.DECODE_ERROR, mimetype, f"cannot identify {mimetype} data")
    except MemoryError:
        return ImageResult(status.DECODE_ERROR, mimetype, "out of memory while decoding")
    except Exception as exc:
        return ImageResult(status.DECODE_ERROR, mimetype, f"{type(exc).__name__}: {exc}"[:300])


def _process(
    data: bytes, mimetype: str, formats: tuple[str, ...], settings: ImageSettings
) -> ImageResult:
    img = Image.open(io.BytesIO(data), formats=formats)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _Refused(status.DECODE_ERROR, f"bad dimensions {w}x{h}")
    if w * h > settings.max_pixels:
        raise _Refused(status.TOO_MANY_PIXELS, f"{w}x{h} exceeds {settings.max_pixels} pixels")
    fmt = img.format or ""
    target = _UNIFORM.get(settings.format)
    if target is not None and _SAME_FORMAT.get(fmt) != target:
        return _process_to(img, mimetype, fmt, target, settings)
    if fmt in ("JPEG", "MPO"):
        return _process_jpeg(img, data, mimetype, settings)
    return _process_other(img, data, mimetype, fmt, settings)


def _process_to(
    img: ImageFile.ImageFile, mimetype: str, fmt: str, target: str, settings: ImageSettings
) -> ImageResult:
    """Store an image of another format as `target` (``images.format``): first frame,
    upright, shrunk, alpha composited onto white for JPEG."""
    frames = _frame_count(img, fmt, settings.max_frames)
    if frames > settings.max_frames:
        raise _Refused(status.TOO_MANY_FRAMES, f"more than {settings.max_frames} frames")
    img.load()
    orientation = 1 if fmt == "GIF" else _orientation(img)
    out, icc, (disp_w, disp_h) = _upright_within(img, orientation, settings)
    if target == "JPEG" and out.mode in ("RGBA", "LA"):
        rgba = out.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        out = flat
    encoded = encode(out, target, icc, settings.jpeg_quality, settings.webp_quality)
    return _stored(encoded, target, mimetype, out.size, (disp_w, disp_h), frames)


def _upright_within(
    img: Image.Image, orientation: int, settings: ImageSettings
) -> tuple[Image.Image, bytes | None, tuple[int, int]]:
    """The decoded image upright and shrunk to `max_side`, in a mode the encoders take; its
    ICC profile when the colours were kept; and its display size before shrinking."""
    w, h = img.size
    swapped = orientation in (5, 6, 7, 8)
    disp_w, disp_h = (h, w) if swapped else (w, h)
    tw, th = target_size(disp_w, disp_h, settings.max_side)
    out, colour_kept = normalize_mode(img)
    icc = img.info.get("icc_profile") if colour_kept else None
    sw, sh = (th, tw) if swapped else (tw, th)
    if out.size != (sw, sh):
        out = out.resize((sw, sh), _RESAMPLE[settings.resample], reducing_gap=_REDUCING_GAP)
    if orientation != 1:
        out = out.transpose(_TRANSPOSE[orientation])
    return out, icc, (disp_w, disp_h)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 when absent, unreadable or out of range)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _process_jpeg(
    img: ImageFile.ImageFile, data: bytes, mimetype: str, settings: ImageSettings
) -> ImageResult:
    w, h = img.size
    orientation = _orientation(img) if "exif" in img.info else 1
    swapped = orientation in (5, 6, 7, 8)
    disp_w, disp_h = (h, w) if swapped else (w, h)
    tw, th = target_size(disp_w, disp_h, settings.max_side)
    mode = img.mode

    if orientation == 1 and (tw, th) == (w, h) and mode in ("L", "RGB"):
        # Keep as is; decode at 1/8 scale to validate (libjpeg still reads every
        # entropy-coded byte, so truncation is caught, but skips most of the IDCT work).
        img.draft(mode, (max(1, w // 8), max(1, h // 8)))
        img.load()
        return _kept(data, mimetype, w, h, 1)

    # Decode at the smallest DCT scale still at least the target, in stored orientation.
    sw, sh = (th, tw) if swapped else (tw, th)
    drafted = img.draft(mode, (sw, sh)) if (sw, sh) != (w, h) else None
    img.load()
    box = drafted[1] if drafted is not None else None
    out: Image.Image = img
    if (sw, sh) != img.size or box is not None:
        out = img.resize(
            (sw, sh), _RESAMPLE[settings.resample], box=box, reducing_gap=_REDUCING_GAP
        )
    icc = img.info.get("icc_profile")
    if out.mode not in ("L", "RGB"):
        out = out.convert("RGB")  # CMYK / YCCK (Adobe-inverted CMYK is undone by Pillow)
        icc = None  # a CMYK profile does not describe RGB data
    if orientation != 1:
        out = out.transpose(_TRANSPOSE[orientation])
    encoded = encode(out, "JPEG", icc, settings.jpeg_quality, settings.webp_quality)
    return _stored(encoded, "JPEG", mimetype, out.size, (disp_w, disp_h), 1)


def _process_other(
    img: ImageFile.ImageFile, data: bytes, mimetype: str, fmt: str, settings: ImageSettings
) -> ImageResult:
    w, h = img.size
    frames = _frame_count(img, fmt, settings.max_frames)
    if frames > settings.max_frames:
        raise _Refused(status.TOO_MANY_FRAMES, f"more than {settings.max_frames} frames")
    same = _SAME_FORMAT.get(fmt)
    within = w <= settings.max_side and h <= settings.max_side
    img.load()  # first frame, fully decoded: validation and pixels in one go
    orientation = 1 if fmt == "GIF" else _orientation(img)

    if same is not None and within and orientation == 1:
        if frames == 1:
            return _kept(data, mimetype, w, h, 1)
        if frames * w * h <= settings.max_pixels:
            for index in range(1, frames):  # every frame must decode too
                img.seek(index)
                img.load()
            return _kept(data, mimetype, w, h, frames)
        # Too much to validate frame by frame: the first frame is stored as a still.
        img.seek(0)
        img.load()

    out, icc, (disp_w, disp_h) = _upright_within(img, orientation, settings)
    if same is None:  # BMP, TIFF, ICO, AVIF, ...: JPEG, or PNG when there is real alpha
        if out.mode in ("RGBA", "LA"):
            lo, _hi = out.getchannel("A").getextrema()
            if isinstance(lo, int) and lo == 255:
                out = out.convert(out.mode[:-1])
        same = "PNG" if out.mode in ("RGBA", "LA") else "JPEG"
    encoded = encode(out, same, icc, settings.jpeg_quality, settings.webp_quality)
    return _stored(encoded, same, mimetype, out.size, (disp_w, disp_h), frames)


def _frame_count(img: ImageFile.ImageFile, fmt: str, limit: int) -> int:
    """Frames of an animation, counted up to `limit` + 1: WebP and APNG state their count,
    a GIF is walked frame by frame (headers only, nothing decoded), never further than that."""
    if fmt not in ("GIF", "WEBP", "PNG"):
        return 1
    if fmt != "GIF":
        return int(getattr(img, "n_frames", 1))
    try:
        img.seek(limit)
    except EOFError:
        count = int(getattr(img, "n_frames", 1))  # fewer than limit + 1: known now
    else:
        count = limit + 1
    img.seek(0)
    return count


def _kept(data: bytes, mimetype: str, w: int, h: int, frames: int) -> ImageResult:
    return ImageResult(
        status=status.OK,
        mimetype=mimetype,
        keep_original=True,
        stored_mimetype=mimetype,
        width=w,
        height=h,
        orig_width=w,
        orig_height=h,
        sha256=hashlib.sha256(data).hexdigest(),
        frames=frames,
    )


def _stored(
    encoded: bytes,
    fmt: str,
    mimetype: str,
    size: tuple[int, int],
    orig: tuple[int, int],
    frames: int,
) -> ImageResult:
    return ImageResult(
        status=status.OK,
        mimetype=mimetype,
        data=encoded,
        stored_mimetype=_FORMAT_MIME[fmt],
        width=size[0],
        height=size[1],
        orig_width=orig[0],
        orig_height=orig[1],
        sha256=hashlib.sha256(encoded).hexdigest(),
        frames=frames,
    )
