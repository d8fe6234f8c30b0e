"""Reading the dataset index (`assign.index` writes it): pages of documents at any offset,
documents by id.

`DatasetIndex` finds a page at any offset from per-shard counts (a binary search over shards,
then a slice of one shard's records), never by scanning the documents before it, and reads a
page's documents with one ranged read per run of consecutive documents of a shard.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from assign.index import INDEX_DIR, RECORD, IndexPaths, Records, read_meta, shard_sort_key
from assign.tree import Changed, Tree


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
