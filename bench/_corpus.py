"""A synthetic crawled corpus for the dataset benchmarks: MMC4-shaped rewritten shards,
status reports, stored images (hard links to a few real JPEGs), and the dataset index."""

from __future__ import annotations

import gzip
import io
import os
import random
from pathlib import Path
from typing import Any

import orjson
from PIL import Image

from assign.index import index_shard
from assign.tree import LocalTree
from core import status

WORDS = [
    "the",
    "a",
    "photo",
    "of",
    "street",
    "art",
    "road",
    "light",
    "island",
    "car",
    "summer",
    "forest",
    "coffee",
    "train",
]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."


def _jpegs(directory: Path, count: int, rng: random.Random) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        w, h = rng.choice([(800, 600), (640, 480), (600, 800), (512, 512)])
        # smooth noise: photo-like sizes (tens of kB at 800 px), not incompressible static
        img = Image.effect_noise((w // 16, h // 16), 60).convert("RGB").resize((w, h))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        path = directory / f"sample{i}.jpg"
        path.write_bytes(buf.getvalue())
        out.append(path)
    return out


def make_corpus(
    output: Path,
    docs: int,
    docs_per_shard: int,
    *,
    images_per_doc: tuple[int, int] = (1, 5),
    stored_share: float = 0.8,
    with_images: bool = True,
    seed: int = 5,
) -> list[str]:
    """Write the corpus under ``output`` and index it; returns the shard ids."""
    rng = random.Random(seed)
    samples = _jpegs(output / "_samples", 8, rng) if with_images else []
    shards = []
    for s in range(0, docs, docs_per_shard):
        shard = f"docs_no_face_shard_{s // docs_per_shard}_v2"
        shards.append(shard)
        lines, records = [], []
        image_dir = output / shard
        image_dir.mkdir(parents=True, exist_ok=True)
        for d in range(min(docs_per_shard, docs - s)):
            text = [_sentence(rng) for _ in range(rng.randint(5, 25))]
            n = rng.randint(*images_per_doc)
            infos = []
            for i in range(n):
                name = f"{s + d:08x}{i:02x}.jpg"
                infos.append({"image_name": name,
                              "raw_url": f"https://images.example.com/{s + d}/{i}.jpg",
                              "matched_text_index": rng.randrange(len(text)),
                              "matched_sim": round(rng.uniform(0.2, 0.4), 6),
                              "face_detections": None})  # fmt: skip
                ok = rng.random() < stored_share
                state = status.OK if ok else "http_404"
                stored: dict[str, Any] = {}
                if ok:
                    if with_images:
                        src = samples[(s + d + i) % len(samples)]
                        dst = image_dir / name
                        if not dst.exists():
                            os.link(src, dst)
                        size = src.stat().st_size
                    else:
                        size = 50_000
                    stored = dict(path=f"{shard}/{name}", mimetype="image/jpeg", bytes=size,
                                  width=800, height=600)  # fmt: skip
                rec = status.make_record(name, infos[-1]["raw_url"], state, **stored)
                records.append(status.encode(rec))
            doc = {"text_list": text, "url": f"https://www.example.com/page/{s + d}",
                   "image_info": infos,
                   "similarity_matrix": [[round(rng.uniform(0.1, 0.4), 6) for _ in text]
                                         for _ in infos],
                   "could_have_url_duplicate": int(rng.random() < 0.03)}  # fmt: skip
            lines.append(orjson.dumps(doc) + b"\n")
        shard_file = output / status.SHARDS_DIR / f"{shard}.jsonl"
        shard_file.parent.mkdir(parents=True, exist_ok=True)
        shard_file.write_bytes(b"".join(lines))
        report = status.ReportPaths(output, shard).report
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(gzip.compress(b"".join(r + b"\n" for r in sorted(records)), 1))
        index_shard(LocalTree(output), shard, str(shard_file))
    return shards
