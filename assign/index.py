"""The dataset index: every document of every rewritten shard, reachable in constant time.

Built once per shard, when its rewrite completes (``index_shard``), into ``OUTPUT/_dataset/``:

| file | contents |
|---|---|
| ``<shard>.docs.jsonl`` | one dataset-API document per line (JSON, images with status and URL) |
| ``<shard>.idx`` | one fixed-size record (``RECORD``) per document, in line order |
| ``<shard>.meta.json`` | counts, a histogram of (images, stored, duplicate flag), file sizes |

The meta file is written last: a shard without one is not part of the dataset yet. A
document's id is ``<shard>:<line>``, its 0-based line in the rewritten shard, so ids survive
restarts and re-indexing. Readers (``DatasetIndex``) find a page at any offset from per-shard
counts (a binary search over shards, then a slice of one shard's records), never by scanning
the documents before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from assign.shardio import atomic_writer, discard_leftovers, read_object, write_atomically
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
    output: Path
    shard: str

    @property
    def directory(self) -> Path:
        return self.output / INDEX_DIR

    @property
    def docs(self) -> Path:
        return self.directory / f"{self.shard}.docs.jsonl"

    @property
    def records(self) -> Path:
        return self.directory / f"{self.shard}.idx"

    @property
    def meta(self) -> Path:
        return self.directory / f"{self.shard}.meta.json"


def image_url(shard: str, image_name: str) -> str:
    return f"{IMAGE_ROUTE}/{shard}/{urllib.parse.quote(image_name, safe='')}"


def _stat_key(path: Path) -> list[int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [0, 0]
    return [st.st_size, st.st_mtime_ns]


def index_shard(output: Path, shard: str, shard_file: Path, *, force: bool = False) -> Path:
    """Index ``shard_file`` (the rewritten shard) with the images of the shard's status
    report; returns the meta file. An index already made from the same two files is kept."""
    paths = IndexPaths(output, shard)
    if not SHARD_ID.fullmatch(shard):
        raise ValueError(f"shard id {shard!r} cannot be served (letters, digits, . _ - only)")
    report = status.ReportPaths(output, shard).report
    sources = {"shard_file": str(shard_file), "shard_stat": _stat_key(shard_file)}
    sources["report_stat"] = _stat_key(report)
    if not force and _current(paths, sources):
        return paths.meta
    for leftover in (paths.docs, paths.records, paths.meta):
        discard_leftovers(leftover)
    images = _load_images(report)
    with contextlib.suppress(FileNotFoundError):
        paths.meta.unlink()  # a meta on disk always describes the files beside it
    counts: dict[tuple[int, int, int], int] = {}
    bad_lines = 0
    chunks: list[Records] = []
    pending: list[tuple[int, int, int, int, int, int, int, int]] = []
    with (
        open(shard_file, "rb") as src,
        atomic_writer(paths.docs, durable=False) as docs_out,
        atomic_writer(paths.records, durable=False) as rec_out,
    ):
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
        records = np.concatenate(chunks)
        rec_out.write(records.tobytes())
        docs_bytes = doc_offset
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
    write_atomically(paths.meta, orjson.dumps(meta, option=orjson.OPT_APPEND_NEWLINE))
    return paths.meta


def _current(paths: IndexPaths, sources: dict[str, Any]) -> bool:
    meta = read_meta(paths.meta)
    return meta is not None and all(meta.get(k) == v for k, v in sources.items())


def read_meta(path: Path) -> dict[str, Any] | None:
    """A shard's meta, if it is whole and its files are the sizes it names."""
    meta = read_object(path)
    if meta is None or meta.get("version") != VERSION:
        return None
    paths = IndexPaths(path.parent.parent, str(meta.get("shard")))
    if _stat_key(paths.docs)[0] != meta.get("docs_bytes"):
        return None
    if _stat_key(paths.records)[0] != meta.get("records_bytes"):
        return None
    return meta


def _load_images(report: Path) -> dict[str, dict[str, Any]]:
    """image_name -> its status record's fields the API shows."""
    out: dict[str, dict[str, Any]] = {}
    if not report.is_file():
        return out
    for rec in status.read_report(report):
        name = rec.get("image_name")
        if isinstance(name, str):
            out[name] = rec
    return out


def _document(
    raw: bytes, shard: str, line: int, images: dict[str, dict[str, Any]]
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
        state = rec.get("status", NOT_RECORDED) if rec is not None else NOT_RECORDED
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
                "width": rec.get("width") if ok and rec else None,
                "height": rec.get("height") if ok and rec else None,
                "mimetype": rec.get("mimetype") if ok and rec else None,
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


def shard_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """(shard, rewritten shard) for every complete rewrite in ``directory``."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.jsonl"), key=lambda p: shard_sort_key(p.name)):
        if path.name.startswith("."):
            continue
        yield path.name[: -len(".jsonl")], path


# ---------------------------------------------------------------------------------------------
# Reading


class ShardChanged(RuntimeError):
    """A shard's files no longer match its meta (it is being re-indexed): ask again soon."""


@dataclass(frozen=True)
class Filter:
    """Which documents a request wants."""

    min_images: int = 0
    min_stored: int = 0
    all_stored: bool = False
    shard: str | None = None
    skip_url_duplicates: bool = False

    @property
    def plain(self) -> bool:
        return self == Filter(shard=self.shard)

    def mask(self, n_images: Any, n_stored: Any, dup: Any) -> Any:
        """Boolean array: which rows (records or histogram rows) match."""
        ok = (n_images >= self.min_images) & (n_stored >= self.min_stored)
        if self.all_stored:
            ok &= n_stored == n_images
        if self.skip_url_duplicates:
            ok &= dup == 0
        return ok


@dataclass(frozen=True)
class Hit:
    shard: str
    record: Any  # one RECORD row


@dataclass(frozen=True)
class Page:
    hits: list[Hit]
    offset: int
    total: int
    next: str | None  # id of the first document of the next page


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, size: int, evict: Any = None) -> None:
        super().__init__()
        self.size = size
        self.evict = evict

    def get_or(self, key: Any, make: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.size:
            _, old = self.popitem(last=False)
            if self.evict is not None:
                self.evict(old)
        return value


class DatasetIndex:
    """Every indexed shard of one output directory, refreshed on demand (``refresh``)."""

    def __init__(self, output: Path, *, cache_shards: int = 64) -> None:
        self.output = output
        self.directory = output / INDEX_DIR
        self.metas: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, int] = {}  # meta file -> mtime_ns
        self.shards: list[str] = []
        self._position: dict[str, int] = {}
        self._hist = np.zeros((0, 5), dtype=np.int64)  # shard index, images, stored, dup, n
        self._totals = _Lru(256)  # filter -> cumulative counts per shard
        self._records = _Lru(cache_shards)
        self._matches = _Lru(cache_shards * 4)
        self._fds = _Lru(cache_shards, evict=os.close)

    # -- discovery --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Pick up shards indexed (or re-indexed) since the last call; True if any changed."""
        changed = False
        found: set[str] = set()
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not entry.name.endswith(".meta.json") or entry.name.startswith("."):
                continue
            shard = entry.name[: -len(".meta.json")]
            found.add(shard)
            try:
                mtime = entry.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._seen.get(shard) == mtime:
                continue
            meta = read_meta(Path(entry.path))
            if meta is None or meta.get("shard") != shard:
                continue
            self._seen[shard] = mtime
            meta["_histogram"] = np.array(meta.get("histogram", []), dtype=np.int64).reshape(-1, 4)
            self.metas[shard] = meta
            self._forget(shard)
            changed = True
        for gone in set(self.metas) - found:
            del self.metas[gone]
            self._seen.pop(gone, None)
            self._forget(gone)
            changed = True
        if changed:
            self._rebuild()
        return changed

    def _forget(self, shard: str) -> None:
        self._records.pop(shard, None)
        for key in [k for k in self._matches if k[0] == shard]:
            del self._matches[key]
        fd = self._fds.pop(shard, None)
        if fd is not None:
            os.close(fd)

    def _rebuild(self) -> None:
        self.shards = sorted(self.metas, key=shard_sort_key)
        self._position = {s: i for i, s in enumerate(self.shards)}
        hists = [self.metas[s]["_histogram"] for s in self.shards]
        rows = np.concatenate([np.zeros((0, 4), dtype=np.int64), *hists])
        owner = np.repeat(np.arange(len(hists), dtype=np.int64), [len(h) for h in hists])
        self._hist = np.column_stack((owner, rows))
        self._totals.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- counting ---------------------------------------------------------------------------

    def _cumulative(self, flt: Filter) -> npt.NDArray[np.int64]:
        """Matching documents up to and including each shard (in shard order)."""
        key = Filter(**{**flt.__dict__, "shard": None})

        def count() -> npt.NDArray[np.int64]:
            h = self._hist
            ok = key.mask(h[:, 1], h[:, 2], h[:, 3])
            per_shard = np.bincount(h[ok, 0], weights=h[ok, 4], minlength=len(self.shards))
            return np.cumsum(per_shard.astype(np.int64))

        cum: npt.NDArray[np.int64] = self._totals.get_or(key, count)
        return cum

    def _shard_range(self, flt: Filter) -> tuple[int, int, int]:
        """(first shard index, end shard index, documents before the first)."""
        if flt.shard is None:
            return 0, len(self.shards), 0
        i = self._position[flt.shard]
        cum = self._cumulative(flt)
        return i, i + 1, int(cum[i - 1]) if i else 0

    def total(self, flt: Filter) -> int:
        if not self.shards:
            return 0
        _, end, before = self._shard_range(flt)
        return int(self._cumulative(flt)[end - 1]) - before

    def has_shard(self, shard: str) -> bool:
        return shard in self._position

    # -- records ----------------------------------------------------------------------------

    def records(self, shard: str) -> Records:
        def load() -> Records:
            try:
                recs = np.fromfile(IndexPaths(self.output, shard).records, dtype=RECORD)
            except FileNotFoundError:
                raise ShardChanged(shard) from None
            if recs.nbytes != self.metas[shard]["records_bytes"]:
                raise ShardChanged(shard)
            return recs

        out: Records = self._records.get_or(shard, load)
        return out

    def _matching(self, shard: str, flt: Filter) -> npt.NDArray[np.intp] | None:
        """Positions of the matching records of a shard; None: all of them."""
        key = Filter(**{**flt.__dict__, "shard": None})
        if key.plain:
            return None

        def make() -> npt.NDArray[np.intp]:
            r = self.records(shard)
            return np.flatnonzero(key.mask(r["n_images"], r["n_stored"], r["dup"]))

        out: npt.NDArray[np.intp] = self._matches.get_or((shard, key), make)
        return out

    def _take(self, shard: str, flt: Filter, start: int, count: int) -> list[Hit]:
        recs = self.records(shard)
        positions = self._matching(shard, flt)
        chosen = (
            recs[start : start + count]
            if positions is None
            else recs[positions[start : start + count]]
        )
        return [Hit(shard, r) for r in chosen]

    def _collect(
        self, flt: Filter, shard_i: int, start: int, end: int, limit: int
    ) -> tuple[list[Hit], str | None]:
        """Up to ``limit`` hits from position ``start`` of shard ``shard_i`` on, and the id
        of the document after them."""
        hits: list[Hit] = []
        i = shard_i
        while i < end and len(hits) <= limit:
            shard = self.shards[i]
            hits += self._take(shard, flt, start, limit + 1 - len(hits))
            i, start = i + 1, 0
        nxt = None
        if len(hits) > limit:
            last = hits.pop()
            nxt = f"{last.shard}:{int(last.record['line'])}"
        return hits, nxt

    def page(self, flt: Filter, offset: int, limit: int) -> Page:
        total = self.total(flt)
        if not self.shards or offset >= total:
            return Page([], offset, total, None)
        first, end, before = self._shard_range(flt)
        cum = self._cumulative(flt)
        target = before + offset
        i = int(np.searchsorted(cum[first:end], target, side="right")) + first
        start = target - (int(cum[i - 1]) if i else 0)
        hits, nxt = self._collect(flt, i, start, end, limit)
        return Page(hits, offset, total, nxt)

    def page_from(self, flt: Filter, shard: str, line: int, limit: int) -> Page:
        """The page starting at the first matching document at or after ``shard:line``."""
        total = self.total(flt)
        i = self._position[shard]
        first, end, before = self._shard_range(flt)
        if not first <= i < end:
            return Page([], total, total, None)
        recs = self.records(shard)
        pos = int(np.searchsorted(recs["line"], line, side="left"))
        positions = self._matching(shard, flt)
        start = pos if positions is None else int(np.searchsorted(positions, pos, side="left"))
        cum = self._cumulative(flt)
        offset = (int(cum[i - 1]) if i else 0) - before + start
        hits, nxt = self._collect(flt, i, start, end, limit)
        return Page(hits, offset, total, nxt)

    def find(self, shard: str, line: int) -> Hit | None:
        if shard not in self._position:
            return None
        recs = self.records(shard)
        pos = int(np.searchsorted(recs["line"], line, side="left"))
        if pos >= len(recs) or int(recs[pos]["line"]) != line:
            return None
        return Hit(shard, recs[pos])

    # -- documents --------------------------------------------------------------------------

    def _fd(self, shard: str) -> int:
        def open_docs() -> int:
            try:
                fd = os.open(IndexPaths(self.output, shard).docs, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardChanged(shard) from None
            if os.fstat(fd).st_size != self.metas[shard]["docs_bytes"]:
                os.close(fd)
                raise ShardChanged(shard)
            return fd

        fd: int = self._fds.get_or(shard, open_docs)
        return fd

    def document(self, hit: Hit) -> bytes:
        """The document's JSON, as stored."""
        offset, length = int(hit.record["doc_offset"]), int(hit.record["doc_length"])
        return os.pread(self._fd(hit.shard), length, offset)

    def documents(self, hits: list[Hit]) -> list[bytes]:
        """Documents of a page: one read per run of consecutive records of a shard."""
        out: list[bytes] = []
        i = 0
        while i < len(hits):
            j = i + 1
            shard = hits[i].shard
            while (
                j < len(hits)
                and hits[j].shard == shard
                and int(hits[j].record["doc_offset"])
                == int(hits[j - 1].record["doc_offset"]) + int(hits[j - 1].record["doc_length"]) + 1
            ):
                j += 1
            base = int(hits[i].record["doc_offset"])
            end = int(hits[j - 1].record["doc_offset"]) + int(hits[j - 1].record["doc_length"])
            blob = os.pread(self._fd(shard), end - base, base)
            for h in hits[i:j]:
                start = int(h.record["doc_offset"]) - base
                out.append(blob[start : start + int(h.record["doc_length"])])
            i = j
        return out
