"""CPU cost of crawler.images.process_image on a realistic mix of web images.

Builds a deterministic mix (most images a few hundred px, ~20% large photos of 1600-4000 px;
JPEG dominant, with PNG, WebP and GIF), then times, in this one process:

* ``process_image`` (draft-mode JPEG decoding, small valid files kept as they came), and
* a naive path: full decode, EXIF transpose, Lanczos resize without draft, always re-encode
  (JPEG, or PNG when there is alpha) - roughly what a simple downloader does.

Usage: .venv/bin/python bench/image_bench.py [--count 300] [--seed 1] [--profile]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config
from crawler.images import (
    ImageSettings,
    init_args,
    init_worker,
    library_versions,
    process_image,
    target_size,
)

SETTINGS, HEAP_MB = init_args(Config())  # as a crawl's image processes start
ASPECTS = [(4, 3), (3, 2), (1, 1), (16, 9), (3, 4), (2, 3), (21, 9)]


def _content(width: int, height: int, rng: np.random.Generator, noise: float) -> Image.Image:
    """Gradients and blobs plus sensor-like noise: compresses like a photo, not like flat fill."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    fx, fy, phase = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(0, 6)
    base = np.stack(
        [
            255 * x * np.ones_like(y),
            128 + 120 * np.sin(fx * x + fy * y + phase),
            255 * y * np.ones_like(x),
        ],
        axis=-1,
    )
    if noise:
        base = base + rng.normal(0, noise, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def build_mix(count: int, seed: int) -> list[tuple[str, bytes]]:
    """(label, bytes) pairs; label: format and small (<= max_side), mid (up to ~1100) or large."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    mix: list[tuple[str, bytes]] = []
    for _ in range(count):
        large = rnd.random() < 0.2
        longer = rnd.randint(1600, 4000) if large else int(np.exp(rnd.uniform(np.log(80), 7.0)))
        aw, ah = rnd.choice(ASPECTS)
        w, h = (longer, max(1, longer * ah // aw)) if aw >= ah else (longer * aw // ah, longer)
        fmt = rnd.choices(["JPEG", "PNG", "WEBP", "GIF"], weights=[70, 15, 10, 5])[0]
        img = _content(w, h, rng, noise=8 if fmt in ("JPEG", "WEBP") else 0)
        buf = io.BytesIO()
        if fmt == "JPEG":
            img.save(buf, "JPEG", quality=rnd.choice([75, 85, 92]), progressive=rnd.random() < 0.3)
        elif fmt == "PNG":
            if rnd.random() < 0.4:
                img.putalpha(Image.linear_gradient("L").resize(img.size))
            img.save(buf, "PNG", compress_level=6)
        elif fmt == "WEBP":
            img.save(buf, "WEBP", quality=80)
        else:
            img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
        kind = "large" if large else ("small" if max(w, h) <= SETTINGS.max_side else "mid")
        mix.append((f"{fmt.lower()}-{kind}", buf.getvalue()))
    return mix


def naive(data: bytes, settings: ImageSettings) -> bytes:
    """Full decode, no draft, always re-encode."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    size = target_size(img.width, img.height, settings.max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if img.mode == "RGBA":
        img.save(buf, "PNG", compress_level=3)
    else:
        img.save(buf, "JPEG", quality=settings.jpeg_quality)
    return buf.getvalue()


def run_interleaved(
    mix: list[tuple[str, bytes]],
) -> tuple[dict[str, list[float]], dict[str, list[float]], float, float]:
    """CPU seconds per image for both paths, alternating which goes first (fair caches)."""
    ours: dict[str, list[float]] = defaultdict(list)
    base: dict[str, list[float]] = defaultdict(list)
    wall_ours = wall_base = 0.0
    for i, (label, data) in enumerate(mix):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            fn: Callable[[bytes, ImageSettings], object] = process_image if which == 0 else naive
            w, c = time.perf_counter(), time.process_time()
            fn(data, SETTINGS)
            c, w = time.process_time() - c, time.perf_counter() - w
            if which == 0:
                ours[label].append(c)
                wall_ours += w
            else:
                base[label].append(c)
                wall_base += w
    return ours, base, wall_ours, wall_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="pyinstrument process_image")
    args = parser.parse_args()

    init_worker(SETTINGS, HEAP_MB)
    t = time.perf_counter()
    mix = build_mix(args.count, args.seed)
    total_mb = sum(len(d) for _, d in mix) / 1e6
    print(f"mix: {len(mix)} images, {total_mb:.1f} MB, built in {time.perf_counter() - t:.1f} s")
    print(library_versions())
    counts: dict[str, int] = defaultdict(int)
    for label, _ in mix:
        counts[label] += 1
    print("     " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    kept = sum(process_image(d, SETTINGS).keep_original for _, d in mix)  # also a warm-up
    print(f"kept as downloaded: {kept}/{len(mix)}")
    naive(mix[0][1], SETTINGS)

    ours, base, wall_ours, wall_base = run_interleaved(mix)
    n = len(mix)
    cpu_ours = sum(sum(v) for v in ours.values())
    cpu_base = sum(sum(v) for v in base.values())
    for name, cpu, wall in (("process_image", cpu_ours, wall_ours), ("naive", cpu_base, wall_base)):
        print(
            f"{name:>14}: {n / wall:7.1f} images/s, {1000 * cpu / n:6.2f} CPU ms/image "
            f"({wall:.2f} s wall, one process)"
        )
    print(f"naive / process_image CPU ratio: {cpu_base / cpu_ours:.2f}x")
    print(f"\n{'kind':<12} {'n':>4} {'ours ms':>8} {'naive ms':>9} {'ratio':>6}")
    for label in sorted(ours):
        a = 1000 * sum(ours[label]) / len(ours[label])
        b = 1000 * sum(base[label]) / len(base[label])
        print(f"{label:<12} {len(ours[label]):>4} {a:8.2f} {b:9.2f} {b / a:6.2f}")

    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        for _, data in mix:
            process_image(data, SETTINGS)
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))


if __name__ == "__main__":
    main()
