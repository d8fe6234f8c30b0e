"""images.format: "keep" stores each image in its own format under the shard's image_name (the
extension may lie; the record's mimetype does not), "jpeg" and "webp" store every image in
that one format, as img2dataset's encode_format does. What a loader sees, through a crawl."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from crawling import crawl, crawl_config, image_doc, report, write_docs
from PIL import Image

from crawler.images import ImageSettings, process_image
from testweb import ImageWeb


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (64, 48), **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 0) if mode == "RGBA" else None).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("target", "pillow", "mime"), [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")]
)
@pytest.mark.parametrize(
    ("source", "mode"), [("PNG", "RGBA"), ("GIF", "P"), ("WEBP", "RGB"), ("JPEG", "RGB"),
                         ("BMP", "RGB")],
)  # fmt: skip
def test_every_image_is_stored_in_the_chosen_format(
    target: str, pillow: str, mime: str, source: str, mode: str
) -> None:
    data = _image(source, mode)
    res = process_image(data, ImageSettings(format=target))
    assert res.status == "ok", res.error
    stored = data if res.keep_original else res.data
    assert stored is not None
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == pillow
        assert img.size == (64, 48)
    assert res.stored_mimetype == mime


def test_jpeg_composites_transparency_onto_white() -> None:
    res = process_image(_image("PNG", "RGBA"), ImageSettings(format="jpeg"))
    assert res.data is not None
    with Image.open(io.BytesIO(res.data)) as img:
        r, g, b = img.convert("RGB").getpixel((5, 5))  # type: ignore[misc]
        assert min(r, g, b) > 240  # fully transparent: white, not black


def test_large_images_are_shrunk_and_animations_become_their_first_frame() -> None:
    frames = [Image.new("RGB", (1600, 1200), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    res = process_image(buf.getvalue(), ImageSettings(format="webp", max_side=800))
    assert res.status == "ok" and res.data is not None and res.frames == 2
    with Image.open(io.BytesIO(res.data)) as img:
        assert img.format == "WEBP" and img.size == (800, 600)
        assert getattr(img, "n_frames", 1) == 1


@pytest.mark.parametrize("fmt", ["keep", "jpeg"])
def test_what_a_loader_sees_after_a_crawl(
    fmt: str, web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    urls = [web.url(i % 6, f"/img/120x90/f{i}.{ext}")
            for i, ext in enumerate(["jpg", "png", "webp", "gif"])]  # fmt: skip
    names = [f"img{i}.jpg" for i in range(len(urls))]  # every name says .jpg, as in MMC4
    write_docs(tmp_path / "fmt_shard.jsonl", [image_doc(urls, names)])
    cfg = crawl_config(namespace, tmp_path)
    cfg.images.format = fmt
    asyncio.run(crawl(cfg, [str(tmp_path / "fmt_shard.jsonl")]))
    records = report(cfg, "fmt_shard")
    seen = {}
    for name in names:
        rec = records[name]
        assert rec["status"] == "ok", rec
        path = Path(cfg.paths.output) / rec["path"]
        assert path.name == name  # the key is the shard's image_name, whatever the format
        with Image.open(path) as img:
            seen[name] = img.format
            # the record's mimetype always tells the truth about the bytes
            assert rec["mimetype"] == Image.MIME[str(img.format)]
    if fmt == "jpeg":
        assert set(seen.values()) == {"JPEG"}  # a loader trusting ".jpg" reads them all
    else:
        assert set(seen.values()) == {"JPEG", "PNG", "WEBP", "GIF"}  # ".jpg" may hold others
