"""MMC4-shaped shards whose images live on the test web, with a weighted mix of faults."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

import orjson

from testweb.images import seed_of
from testweb.server import ImageWeb


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
    fault_rates = _fault_rates(faults)
    lo, hi = (images_per_doc, images_per_doc) if isinstance(images_per_doc, int) else images_per_doc
    rng = random.Random(seed_of("docs", seed))
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
            other = bases[(host + 1) % len(bases)]
            path = _fault_or_image_path(rng, name, fault_rates, other, sizes, variants)
            info, row = _image_entry(rng, bases[host] + path, n_text)
            image_info.append(info)
            sim_matrix.append(row)
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


def _fault_rates(faults: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per-image probability of each fault kind."""
    if isinstance(faults, Mapping):
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        return {k: float(v) for k, v in faults.items() if v > 0}
    if faults:
        total = sum(FAULT_KINDS.values())
        return {k: float(faults) * w / total for k, w in FAULT_KINDS.items() if w > 0}
    return {}


def _fault_or_image_path(
    rng: random.Random,
    name: str,
    fault_rates: Mapping[str, float],
    other_host: str,
    sizes: Literal["realistic", "small"],
    variants: bool,
) -> str:
    """A fault's path (drawn by ``fault_rates``), else an image's."""
    u = rng.random()
    for kind, p in fault_rates.items():
        if u < p:
            return fault_path(kind, rng, name, other_host)
        u -= p
    return _pick_image_path(rng, name, sizes, variants)


def _image_entry(
    rng: random.Random, raw_url: str, n_text: int
) -> tuple[dict[str, Any], list[float]]:
    """An ``image_info`` entry for ``raw_url`` and its row of the similarity matrix."""
    matched = rng.randrange(n_text)
    matched_sim = round(rng.uniform(0.22, 0.36), 6)
    row = [round(rng.uniform(0.08, matched_sim - 0.01), 6) for _ in range(n_text)]
    row[matched] = matched_sim
    info = {
        "image_name": hashlib.sha256(raw_url.encode()).hexdigest()[:12] + ".jpg",
        "raw_url": raw_url,
        "matched_text_index": matched,
        "matched_sim": matched_sim,
        "face_detections": None,
    }
    return info, row


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
