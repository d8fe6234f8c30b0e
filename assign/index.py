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

import gzip
import logging
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from assign.tree import Changed, Tree, open_file
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


class _Lru:
    """A bounded cache, safe to use from several threads (the API reads in threads); a value
    may be made twice when two threads miss at once, one of them is kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def drop(self, match: Callable[[Any], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if match(k)]:
                del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class Scan:
    """What ``DatasetIndex.scan`` found: the metas that are new or changed, and every shard
    with a meta."""

    changed: dict[str, tuple[str, dict[str, Any]]]  # shard -> (its meta's tag, meta)
    found: set[str]


class DatasetIndex:
    """Every indexed shard of one output tree, refreshed on demand (``refresh``, or ``scan``
    in a thread and ``apply`` where the index is used)."""

    def __init__(self, output: Tree, *, cache_shards: int = 64) -> None:
        self.output = output
        self.metas: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, str] = {}  # shard -> its meta file's tag
        self.shards: list[str] = []
        self._position: dict[str, int] = {}
        self._hist = np.zeros((0, 5), dtype=np.int64)  # shard index, images, stored, dup, n
        self._totals = _Lru(256)  # filter -> cumulative counts per shard
        self._records = _Lru(cache_shards)
        self._matches = _Lru(cache_shards * 4)

    # -- discovery --------------------------------------------------------------------------

    def scan(self) -> Scan:
        """Read the metas written (or rewritten) since the last ``apply`` (one listing of the
        index directory, one read per new meta)."""
        files = self.output.list(INDEX_DIR)
        changed: dict[str, tuple[str, dict[str, Any]]] = {}
        found: set[str] = set()
        for name, stat in files.items():
            if not name.endswith(".meta.json"):
                continue
            shard = name[: -len(".meta.json")]
            found.add(shard)
            if self._seen.get(shard) == stat.tag:
                continue
            meta = read_meta(self.output, f"{INDEX_DIR}/{name}")
            if meta is None or meta.get("shard") != shard:
                continue
            docs, records = files.get(f"{shard}.docs.jsonl"), files.get(f"{shard}.idx")
            if (docs.size if docs else None, records.size if records else None) != (
                meta.get("docs_bytes"),
                meta.get("records_bytes"),
            ):
                continue  # being re-indexed: its files are not the ones the meta names
            meta["_histogram"] = np.array(meta.get("histogram", []), dtype=np.int64).reshape(-1, 4)
            changed[shard] = (stat.tag, meta)
        return Scan(changed, found)

    def apply(self, scan: Scan) -> bool:
        """Take in what ``scan`` found; True if any shard changed."""
        for shard, (tag, meta) in scan.changed.items():
            self._seen[shard] = tag
            self.metas[shard] = meta
            self._forget(shard)
        gone = set(self.metas) - scan.found
        for shard in gone:
            del self.metas[shard]
            self._seen.pop(shard, None)
            self._forget(shard)
        changed = bool(scan.changed or gone)
        if changed:
            self._rebuild()
        return changed

    def refresh(self) -> bool:
        """Pick up shards indexed (or re-indexed) since the last call; True if any changed."""
        return self.apply(self.scan())

    def _forget(self, shard: str) -> None:
        self._records.drop(lambda k: k == shard)
        self._matches.drop(lambda k: k[0] == shard)

    def _rebuild(self) -> None:
        self.shards = sorted(self.metas, key=shard_sort_key)
        self._position = {s: i for i, s in enumerate(self.shards)}
        hists = [self.metas[s]["_histogram"] for s in self.shards]
        rows = np.concatenate([np.zeros((0, 4), dtype=np.int64), *hists])
        owner = np.repeat(np.arange(len(hists), dtype=np.int64), [len(h) for h in hists])
        self._hist = np.column_stack((owner, rows))
        self._totals.clear()

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
        meta = self.metas[shard]

        def load() -> Records:
            try:
                data = self.output.read(IndexPaths(shard).records)
            except FileNotFoundError:
                raise ShardChanged(shard) from None
            if len(data) != meta["records_bytes"]:
                raise ShardChanged(shard)
            return np.frombuffer(data, dtype=RECORD)

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

    def _read(self, shard: str, start: int, length: int) -> bytes:
        try:
            return self.output.read_range(
                IndexPaths(shard).docs, start, length, size=self.metas[shard]["docs_bytes"]
            )
        except (FileNotFoundError, Changed):
            raise ShardChanged(shard) from None

    def document(self, hit: Hit) -> bytes:
        """The document's JSON, as stored."""
        offset, length = int(hit.record["doc_offset"]), int(hit.record["doc_length"])
        return self._read(hit.shard, offset, length)

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
            blob = self._read(shard, base, end - base)
            for h in hits[i:j]:
                start = int(h.record["doc_offset"]) - base
                out.append(blob[start : start + int(h.record["doc_length"])])
            i = j
        return out
