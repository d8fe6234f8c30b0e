"""The dataset index: every document of every rewritten shard, reachable in constant time.

Built once per shard, when its rewrite completes (``index_shard``), into ``OUTPUT/_dataset/``:

| file | contents |
|---|---|
| ``<shard>.docs.jsonl`` | one dataset-API document per line (JSON, images with status and URL) |
| ``<shard>.idx`` | one fixed-size record (``RECORD``) per document, in line order |
| ``<shard>.meta.json`` | counts, a histogram of (images, stored, duplicate flag), file sizes |

The meta file is written last: a shard without one is not part of the dataset yet. A
document's id is ``<shard>:<line>``, its 0-based line in the rewritten shard, so ids survive
restarts and re-indexing. `assign.lookup` reads it.
"""

from __future__ import annotations

import gzip
import logging
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from assign.tree import Tree, open_file
from core import status

log = logging.getLogger("crawler.dataset")

INDEX_DIR = "_dataset"
VERSION = 1
IMAGE_ROUTE = "/datasets/mmc4/images"
NOT_RECORDED = "not_recorded"  # an image the shard names but the status report does not

RECORD = np.dtype(
    [
        ("line", "<u4"),
        ("n_images", "<u2"),
        ("n_stored", "<u2"),
        ("dup", "u1"),
        ("doc_length", "<u4"),
        ("src_length", "<u4"),
        ("doc_offset", "<u8"),
        ("src_offset", "<u8"),
    ]
)
Records = npt.NDArray[np.void]

# Shard ids as the crawler makes them (shardfiles.check_shard_id), restricted to URL-safe names.
SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGITS = re.compile(r"(\d+)")


def shard_sort_key(shard: str) -> tuple[Any, ...]:
    """Natural order: docs_shard_2 before docs_shard_10."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(shard))


@dataclass(frozen=True)
class IndexPaths:
    """The names of a shard's index files in the output tree."""

    shard: str

    @property
    def docs(self) -> str:
        return f"{INDEX_DIR}/{self.shard}.docs.jsonl"

    @property
    def records(self) -> str:
        return f"{INDEX_DIR}/{self.shard}.idx"

    @property
    def meta(self) -> str:
        return f"{INDEX_DIR}/{self.shard}.meta.json"


def image_url(shard: str, image_name: str) -> str:
    return f"{IMAGE_ROUTE}/{shard}/{urllib.parse.quote(image_name, safe='')}"


def _stat_key(tree: Tree, name: str) -> list[Any]:
    found = tree.stat(name)
    return [found.size, found.tag] if found is not None else [0, ""]


def index_shard(output: Tree, shard: str, shard_file: str, *, force: bool = False) -> str:
    """Index ``shard_file`` (the rewritten shard: a path or an s3:// URL) with the images of
    the shard's status report; returns the meta file's name. An index already made from the
    same two files is kept."""
    paths = IndexPaths(shard)
    if not SHARD_ID.fullmatch(shard):
        raise ValueError(f"shard id {shard!r} cannot be served (letters, digits, . _ - only)")
    report = f"{status.STATUS_DIR}/{shard}.jsonl.gz"
    source, source_name = open_file(shard_file, output.settings)
    sources = {"shard_file": shard_file, "shard_stat": _stat_key(source, source_name)}
    sources["report_stat"] = _stat_key(output, report)
    if not force and _current(output, paths, sources):
        return paths.meta
    for leftover in (paths.docs, paths.records, paths.meta):
        output.discard(leftover)
    images = _load_images(output, report)
    output.delete(paths.meta)  # a meta always describes the files beside it
    docs_built, records_built = output.staging(paths.docs), output.staging(paths.records)
    try:
        with source.fetch(source_name) as local:
            records, counts, bad_lines, docs_bytes = _build(
                local, shard, images, docs_built, records_built
            )
        output.publish(paths.docs, docs_built)
        output.publish(paths.records, records_built)
    finally:
        docs_built.unlink(missing_ok=True)
        records_built.unlink(missing_ok=True)
    meta = {
        "version": VERSION,
        "shard": shard,
        "docs": len(records),
        "bad_lines": bad_lines,
        "images": int(records["n_images"].sum()),
        "stored": int(records["n_stored"].sum()),
        "url_duplicates": int(records["dup"].sum()),
        "histogram": sorted([*k, v] for k, v in counts.items()),
        "docs_bytes": docs_bytes,
        "records_bytes": records.nbytes,
        **sources,
    }
    output.write(paths.meta, orjson.dumps(meta, option=orjson.OPT_APPEND_NEWLINE))
    return paths.meta


def _build(
    shard_file: Path, shard: str, images: dict[str, status.Record], docs: Path, records: Path
) -> tuple[Records, dict[tuple[int, int, int], int], int, int]:
    """Write the documents and records of a local rewritten shard; returns the records,
    the histogram, the lines that are not documents and the documents' bytes."""
    counts: dict[tuple[int, int, int], int] = {}
    bad_lines = 0
    chunks: list[Records] = []
    pending: list[tuple[int, int, int, int, int, int, int, int]] = []
    with open(shard_file, "rb") as src, open(docs, "wb") as docs_out:
        src_offset = doc_offset = 0
        for line_no, raw in enumerate(src):
            doc = _document(raw, shard, line_no, images)
            if doc is None:
                bad_lines += 1
            else:
                body, n_images, n_stored, dup = doc
                docs_out.write(body + b"\n")
                pending.append(
                    (line_no, n_images, n_stored, dup, len(body), len(raw), doc_offset, src_offset)
                )
                key = (n_images, n_stored, dup)
                counts[key] = counts.get(key, 0) + 1
                doc_offset += len(body) + 1
            src_offset += len(raw)
            if len(pending) >= 4096:
                chunks.append(np.array(pending, dtype=RECORD))
                pending.clear()
    chunks.append(np.array(pending, dtype=RECORD))
    out = np.concatenate(chunks)
    records.write_bytes(out.tobytes())
    return out, counts, bad_lines, doc_offset


def _current(output: Tree, paths: IndexPaths, sources: dict[str, Any]) -> bool:
    """Whether the shard's index is whole and was made from these sources."""
    meta = read_meta(output, paths.meta)
    if meta is None or any(meta.get(k) != v for k, v in sources.items()):
        return False
    sizes = [_stat_key(output, paths.docs)[0], _stat_key(output, paths.records)[0]]
    return bool(sizes == [meta.get("docs_bytes"), meta.get("records_bytes")])


def read_meta(output: Tree, name: str) -> dict[str, Any] | None:
    """A shard's meta, if it is whole and of this version."""
    try:
        meta = orjson.loads(output.read(name))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        return None
    return meta


def _load_images(output: Tree, report: str) -> dict[str, status.Record]:
    """image_name -> its status record."""
    try:
        text = gzip.decompress(output.read(report))
    except FileNotFoundError:
        return {}
    return {rec.image_name: rec for rec in status.records_of(text.splitlines())}


def _document(
    raw: bytes, shard: str, line: int, images: dict[str, status.Record]
) -> tuple[bytes, int, int, int] | None:
    """The API's document for one shard line, or None for a line that is not a document."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    text_list = doc.get("text_list")
    infos = doc.get("image_info")
    if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
        return None
    if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        return None
    out_images = []
    stored = 0
    for info in infos:
        name = info.get("image_name")
        rec = images.get(name) if isinstance(name, str) else None
        state = rec.status if rec is not None else NOT_RECORDED
        ok = rec is not None and state == status.OK and isinstance(name, str)
        stored += ok
        out_images.append(
            {
                "image_name": name,
                "raw_url": info.get("raw_url"),
                "url": image_url(shard, name) if ok and isinstance(name, str) else None,
                "matched_text_index": info.get("matched_text_index"),
                "matched_sim": info.get("matched_sim"),
                "status": state,
                "width": rec.width if ok and rec else None,
                "height": rec.height if ok and rec else None,
                "mimetype": rec.mimetype if ok and rec else None,
            }
        )
    dup = 1 if doc.get("could_have_url_duplicate") in (1, True) else 0
    body = orjson.dumps(
        {
            "id": f"{shard}:{line}",
            "shard": shard,
            "line": line,
            "url": doc.get("url"),
            "text": " ".join(text_list),
            "text_list": text_list,
            "could_have_url_duplicate": bool(dup),
            "images": out_images,
        }
    )
    return body, min(len(infos), 0xFFFF), min(stored, 0xFFFF), dup


def shard_files(tree: Tree, directory: str) -> Iterator[tuple[str, str]]:
    """(shard, rewritten shard's name) for every complete rewrite in ``directory``."""
    where = f"{directory}/" if directory else ""
    names = [n for n in tree.list(directory) if n.endswith(".jsonl")]
    for name in sorted(names, key=shard_sort_key):
        yield name[: -len(".jsonl")], where + name
