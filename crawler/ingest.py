"""Shards -> work items in the Redis queue, streamed, validated, bounded, with backpressure
and resume.

Each ``image_info`` entry of each document becomes an item ``(shard, image_name, raw_url)``.
Ingest of a shard resumes at the line after the last enqueued batch (``ingest_line`` in the
shard's meta hash, written in the same transaction as the batch), skips shards already
reported, and seals a shard (sets its image total) once all of it is enqueued.

A shard that cannot be read to its end (truncated or corrupt compressed data, more than
``ingest.max_shard_bytes`` once decompressed) ends where reading stopped: what was read is
enqueued and the shard is sealed with ``unreadable`` in its meta (and so in its report's
summary), so that its images are crawled and the shard completes. A shard of which nothing
could be read leaves nothing behind and is tried again by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import logging
import lzma
import os
import re
import struct
import uuid
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import braceexpand
import orjson
import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import RedisError

from core import status
from core.config import Config
from core.connection import RedisRetry
from core.guard import CLOSED, AddressPolicy, check_url
from core.keys import Keys
from core.shardfiles import (
    READ_CHUNK,
    SHARD_SUFFIXES,
    ShardMissing,
    ShardUnreadable,
    check_image_name,
    check_shard_id,
    is_remote,
    local_copy,
    shard_id,
)
from core.storage import output_storage
from crawler.queue import Result, WorkQueue, encode_result

log = logging.getLogger(__name__)
T = TypeVar("T")

# The ingest lock of a shard expires this long after its holder last renewed it (a third of
# this, while it holds the shard: downloading, reading, waiting for room), so a killed
# ingest holds a shard up for at most this.
LOCK_TTL_S = 60

# The MMC4 shard numbers that never existed (the corpus README's "missing shards"). A brace
# pattern that names one of these skips it as a known gap, not as a missing shard.
KNOWN_GAPS = frozenset(
    {3218, 3267, 5064, 5146, 7119, 8991, 9750, 11899, 15127, 15252, 16996, 17369, 17499, 17818}
)
_SHARD_NUMBER = re.compile(r"(?:^|_)shard_(\d+)(?:_v\d+)?$")


class Stopped(Exception):
    """A stop was requested (a signal): ingest ends at its last enqueued batch."""


@dataclass(frozen=True)
class ShardSource:
    location: str  # local path or http(s) URL, as given
    shard: str  # shard id: the file name without its .jsonl[.gz|.zip] suffix
    known_gap: bool = False  # named by a brace pattern, and one of the corpus's KNOWN_GAPS

    @property
    def remote(self) -> bool:
        return is_remote(self.location)


def shard_number(shard: str) -> int | None:
    """N of an MMC4 shard id (``docs_shard_N_v2``, ``docs_no_face_shard_N_v3``), or None."""
    m = _SHARD_NUMBER.search(shard)
    return int(m.group(1)) if m else None


def expand_sources(patterns: list[str]) -> list[ShardSource]:
    """Expand brace patterns and directories into shard sources, in the order given."""
    out: list[ShardSource] = []
    seen: set[str] = set()
    for pattern in patterns:
        if not is_remote(pattern) and os.path.exists(pattern):
            expanded = [pattern]  # a path that exists is taken as written (braces, backslashes)
        else:
            try:
                expanded = list(braceexpand.braceexpand(pattern))
            except ValueError:  # braceexpand.UnbalancedBracesError (not in its type stubs)
                expanded = [pattern]  # not a pattern: a name with a brace in it
        from_braces = expanded != [pattern]
        for loc in expanded:
            locs = [loc]
            if not is_remote(loc) and os.path.isdir(loc):
                locs = sorted(
                    str(p) for p in Path(loc).iterdir() if p.name.endswith(SHARD_SUFFIXES)
                )
            for one in locs:
                if not is_remote(one):
                    one = os.path.abspath(one)  # workers and the assigner may run elsewhere
                if one not in seen:
                    seen.add(one)
                    shard = shard_id(one)
                    gap = from_braces and shard_number(shard) in KNOWN_GAPS
                    out.append(ShardSource(one, shard, known_gap=gap))
    return out


def missing_local(sources: list[ShardSource]) -> list[ShardSource]:
    """Local shards that do not exist, known gaps aside: a mistyped path, said up front."""
    return [
        s for s in sources if not s.remote and not s.known_gap and not os.path.isfile(s.location)
    ]


def missing_message(sources: list[ShardSource]) -> str | None:
    """The one-line error for local shards that do not exist (`missing_local`), or None."""
    missing = missing_local(sources)
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"no such shard file: {missing[0].location}{more}"


@dataclass
class Entry:
    """One image of a document: a work item, or a record of why it cannot be one."""

    name: str
    url: str
    problem_status: str = ""  # bad_url, bad_name, blocked_address: recorded at ingest
    problem: str = ""


@dataclass
class LineResult:
    entries: list[Entry] = field(default_factory=list)
    error: str = ""  # the line is not a usable document
    skipped_entries: int = 0  # image_info entries without a usable name
    url_duplicate: bool = False  # the document is flagged could_have_url_duplicate


def parse_line(line: bytes, policy: AddressPolicy = CLOSED) -> LineResult:
    """Parse one shard line into image entries; never raises. URLs are judged by
    `guard.check_url` under the crawl's address `policy`."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return LineResult(error=f"malformed JSON: {exc}")
    if not isinstance(doc, dict):
        return LineResult(error="line is not a JSON object")
    infos = doc.get("image_info")
    if not isinstance(infos, list):
        return LineResult(error="document has no image_info list")
    result = LineResult(url_duplicate=doc.get("could_have_url_duplicate") == 1)
    for info in infos:
        if not isinstance(info, dict) or "image_name" not in info:
            result.skipped_entries += 1
            continue
        name, url = info["image_name"], info.get("raw_url")
        if not isinstance(name, str):
            result.skipped_entries += 1
            continue
        url_s = url if isinstance(url, str) else repr(url)
        name_problem = check_image_name(name)
        if name_problem:
            result.entries.append(Entry(name, url_s, status.BAD_NAME, name_problem))
            continue
        url_problem = check_url(url, policy)
        if url_problem:
            result.entries.append(Entry(name, url_s, *url_problem))
            continue
        result.entries.append(Entry(name, url_s))
    return result


# ---- reading a shard file ----------------------------------------------------------------

# What a decompressor or archive reader raises on data it cannot decode (truncated streams,
# corrupt blocks, unsupported or encrypted zip members, damaged headers).
_DECODE_ERRORS = (
    OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, zipfile.LargeZipFile,
    NotImplementedError, RuntimeError, ValueError, struct.error,
)  # fmt: skip


class _LineReader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


@contextlib.contextmanager
def _open_decoded(path: Path) -> Iterator[_LineReader]:
    name = path.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            if not members:
                raise ShardUnreadable("unreadable_shard", f"{path}: zip archive has no members")
            with zf.open(members[0]) as fh:
                # a zip member's own readline(limit) steps 512 bytes at a time in Python; a
                # buffer's is C. Small, so that damage loses little of what precedes it.
                yield io.BufferedReader(fh, buffer_size=1 << 16)  # type: ignore[type-var]
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


def read_lines(
    path: Path, max_line_bytes: int, max_shard_bytes: int
) -> Generator[bytes | None, None, None]:
    """The non-blank lines of a shard file (gzip and zip decoded), stripped; None for a line
    longer than max_line_bytes (skipped, never held whole in memory).

    Raises ShardUnreadable when the data cannot be decoded or decodes to more than
    max_shard_bytes.
    """
    total = 0

    def count(n: int) -> None:
        nonlocal total
        total += n
        if total > max_shard_bytes:
            raise ShardUnreadable(
                "shard_too_large", f"{path}: more than {max_shard_bytes} bytes decompressed"
            )

    try:
        with _open_decoded(path) as reader:
            # readline(limit) never holds more than the limit of one line
            while line := reader.readline(max_line_bytes + 1):
                count(len(line))
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest of the line
                        line = reader.readline(READ_CHUNK)
                        count(len(line))
                    yield None
                    continue
                stripped = line.strip()
                if stripped:
                    yield stripped
    except ShardUnreadable:
        raise
    except _DECODE_ERRORS as exc:
        raise ShardUnreadable("unreadable_shard", f"{path}: {type(exc).__name__}: {exc}") from exc


# ---- remote shards -------------------------------------------------------------------------


# ---- ingest ----------------------------------------------------------------------------------


@dataclass
class IngestStats:
    shards: int = 0
    shards_skipped: int = 0
    shards_missing: int = 0
    shards_known_gaps: int = 0
    shards_unreadable: int = 0
    lines: int = 0
    bad_lines: int = 0
    items: int = 0
    bad_entries: int = 0
    duplicate_names: int = 0
    flagged_duplicates: int = 0  # documents flagged could_have_url_duplicate
    skipped_duplicates: int = 0  # of those, left out (corpus.skip_url_duplicates)
    unreadable: list[str] = field(default_factory=list)  # "<shard>: why", one per shard
    stopped: bool = False  # a stop was requested before every shard was handled


class Ingest:
    """Feeds shards into the queue; one instance per ingest process.

    ``redis_wait_s`` > 0 bounds how long a Redis outage is ridden out (then
    ``connection.RedisUnavailable`` is raised); 0 waits for Redis however long it takes.
    """

    def __init__(self, cfg: Config, client: aioredis.Redis, *, redis_wait_s: float = 0.0) -> None:
        self.cfg = cfg
        self.client = client
        self.keys = Keys(cfg.redis.namespace)
        self.queue = WorkQueue(client, self.keys, cfg.queue)
        self.stats = IngestStats()
        self.storage = output_storage(cfg)
        self.redis_wait_s = redis_wait_s
        self.stop = asyncio.Event()

    async def run(self, sources: list[ShardSource], stop: asyncio.Event | None = None) -> None:
        """Ingest each source in turn. Setting `stop` ends at the last enqueued batch."""
        if stop is not None:
            self.stop = stop
        try:
            await self._plan(sources)
            for source in sources:
                if self.stop.is_set():
                    raise Stopped
                await self.ingest_shard(source)
        except Stopped:
            self.stats.stopped = True
            log.warning("ingest stopped; a rerun resumes after the last enqueued batch")

    async def _redis(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        retry = RedisRetry.from_config(self.cfg, what, give_up_after_s=self.redis_wait_s)
        return await retry.call(fn)

    async def _plan(self, sources: list[ShardSource]) -> None:
        """Name every shard of the crawl in Redis (progress and ETA cover them all)."""
        names = [s.shard for s in sources if not check_shard_id(s.shard)]
        for start in range(0, len(names), 5000):
            chunk = names[start : start + 5000]

            async def add(chunk: list[str] = chunk) -> None:
                await self.client.sadd(self.keys.plan_shards, *chunk)

            await self._redis(add, "plan")

    async def ingest_shard(self, source: ShardSource) -> None:
        problem = check_shard_id(source.shard)
        if problem:
            log.error("skipping %s: %s", source.location, problem)
            self.stats.shards_unreadable += 1
            self.stats.unreadable.append(f"{source.location}: {problem}")
            await self._count_error("bad_shard_id")
            return
        if await asyncio.to_thread(status.shard_is_reported, self.storage, source.shard):
            log.info("shard %s already complete (report exists)", source.shard)
            self.stats.shards_skipped += 1

            async def reported() -> None:
                await self.client.sadd(self.keys.shards_reported, source.shard)

            await self._redis(reported, "plan")
            return
        meta_key = self.keys.shard_meta(source.shard)
        meta = await self._redis(lambda: self.client.hgetall(meta_key), "ingest")
        if b"total" in meta:
            self.stats.shards_skipped += 1
            return
        lock = self.client.lock(
            self.keys.shard_ingest_lock(source.shard),
            timeout=LOCK_TTL_S,
            blocking=False,
            thread_local=False,  # renewed and released by other tasks of this process
        )
        token = uuid.uuid4().hex.encode()

        async def acquire() -> bool:
            if await lock.acquire(token=token):
                return True
            if await self.client.get(lock.name) == token:  # ours: the reply was lost
                lock.local.token = token
                return True
            return False

        if not await self._redis(acquire, "ingest lock"):
            log.warning("shard %s is being ingested by another process", source.shard)
            self.stats.shards_skipped += 1
            return
        keeper = asyncio.create_task(self._keep_lock(lock))
        try:
            start_line = int(meta.get(b"ingest_line", b"0"))
            async with local_copy(source.location, self.cfg) as path:
                await self._ingest_file(source, path, start_line)
            self.stats.shards += 1
        except ShardMissing as exc:
            if source.known_gap:
                log.info("shard %s is a known gap of the corpus, skipped", source.shard)
                self.stats.shards_known_gaps += 1
            else:
                log.warning("shard missing, skipped: %s", exc)
                self.stats.shards_missing += 1
                await self._count_error("missing_shard")
            await self._unplan(source.shard)
        except ShardUnreadable as exc:
            log.error("shard %s unreadable (%s): %s", source.shard, exc.kind, exc)
            self.stats.shards_unreadable += 1
            self.stats.unreadable.append(f"{source.shard}: {exc}")
            await self._count_error(exc.kind)
            if not exc.sealed:  # a sealed shard completes with the images read before
                await self._unplan(source.shard)
        finally:
            keeper.cancel()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):  # a stopping process does not wait on Redis
                    await lock.release()

    async def _keep_lock(self, lock: Lock) -> None:
        """Renew the shard's ingest lock while this process holds the shard."""
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            try:
                await lock.extend(LOCK_TTL_S, replace_ttl=True)
            except (RedisError, OSError) as exc:  # LockNotOwnedError is a RedisError
                log.warning("ingest lock %r not renewed: %s", lock.name, exc)

    async def _unplan(self, shard: str) -> None:
        """A shard that yields no images leaves the crawl's plan (progress, ETA)."""
        key = self.keys.plan_shards
        await self._redis(lambda: self.client.srem(key, shard), "plan")

    async def _count_error(self, kind: str, n: int = 1) -> None:
        key = self.keys.ingest_errors
        await self._redis(lambda: self.client.hincrby(key, kind, n), "ingest errors")

    async def _ingest_file(self, source: ShardSource, path: Path, start_line: int) -> None:
        seen: set[str] = set()
        batch = Batch(source.shard)
        line_no = 0
        policy = AddressPolicy.of(self.cfg.fetch)
        skip_flagged = self.cfg.corpus.skip_url_duplicates
        ing = self.cfg.ingest
        lines = read_lines(path, ing.max_line_bytes, ing.max_shard_bytes)
        unreadable: ShardUnreadable | None = None
        try:
            for line_no, line in enumerate(lines, start=1):
                fresh = line_no > start_line
                batch.lines += fresh
                if line is None:  # longer than max_line_bytes
                    if fresh:
                        batch.count_bad_line(line_no, "line_too_long", "line is too long")
                    continue
                parsed = parse_line(line, policy)
                if fresh:
                    if parsed.error:
                        batch.count_bad_line(line_no, "bad_line", parsed.error)
                    batch.skipped_entries += parsed.skipped_entries
                    batch.flagged += parsed.url_duplicate
                if parsed.url_duplicate and skip_flagged:
                    batch.skipped_flagged += fresh
                    continue
                for entry in parsed.entries:
                    if entry.name in seen:
                        if fresh:
                            batch.duplicates += 1
                        continue
                    seen.add(entry.name)
                    if fresh:
                        batch.add(entry)
                if fresh and batch.size >= ing.batch_size:
                    await self._flush(batch, source, line_no)
                    batch = Batch(source.shard)
                if line_no % 5000 == 0:
                    await asyncio.sleep(0)  # stay responsive while skipping a resumed prefix
        except ShardUnreadable as exc:
            if line_no == 0:
                raise  # nothing read: nothing to end; the next run tries again
            unreadable = exc
            batch.unreadable = f"{exc.kind}: {exc}"
            log.error("shard %s ends at line %d: %s", source.shard, line_no, exc)
        finally:
            lines.close()  # a stop (or a Redis error) leaves the file closed, not to the GC
        await self._flush(batch, source, line_no)
        total = len(seen)
        await self._redis(lambda: self.queue.seal(source.shard, total), "seal")
        log.info("shard %s enqueued: %d images", source.shard, total)
        if unreadable is not None:
            unreadable.sealed = True
            raise unreadable

    async def _flush(self, batch: Batch, source: ShardSource, line_no: int) -> None:
        await self._wait_for_room()
        if self.stop.is_set():
            raise Stopped  # before the transaction: the resume point stays at the last batch
        for err in batch.errors[:20]:
            log.warning("%s %s", source.shard, err)
        meta = self.keys.shard_meta(source.shard)

        tried = False

        async def apply() -> None:
            # Rides out a Redis restart without applying the batch twice: the transaction
            # moves ingest_line to line_no, so after a lost reply meta tells.
            nonlocal tried
            if tried:
                applied = await self.client.hget(meta, "ingest_line")
                if applied is not None and int(applied) >= line_no > 0 and not batch.unreadable:
                    return
            tried = True
            pipe = await self._batch_pipeline(batch, source, line_no)
            await pipe.execute()

        await self._redis(apply, "ingest")
        self.stats.lines += batch.lines
        self.stats.bad_lines += batch.bad_lines
        self.stats.items += len(batch.items)
        self.stats.bad_entries += len(batch.problems) + batch.skipped_entries
        self.stats.duplicate_names += batch.duplicates
        self.stats.flagged_duplicates += batch.flagged
        self.stats.skipped_duplicates += batch.skipped_flagged

    async def _batch_pipeline(self, batch: Batch, source: ShardSource, line_no: int) -> Any:
        """One transaction: the batch's items, its ingest-time records, counters, resume point."""
        pipe = self.client.pipeline(transaction=True)
        meta = self.keys.shard_meta(source.shard)
        fields: dict[Any, Any] = {"source": source.location, "ingest_line": line_no}
        if batch.unreadable:
            fields["unreadable"] = batch.unreadable
        pipe.hset(meta, mapping=fields)
        for field_name, value in batch.counters().items():
            if value:
                pipe.hincrby(meta, field_name, value)
        pipe.sadd(self.keys.shards_open, source.shard)
        await self.queue.add_to(pipe, source.shard, [(e.name, e.url) for e in batch.items])
        if batch.problems:
            await self.queue.record_to(pipe, batch.problems)
        errors = {**batch.error_kinds, "bad_image_info": batch.skipped_entries}
        for kind, n in errors.items():
            if n:
                pipe.hincrby(self.keys.ingest_errors, kind, n)
        return pipe

    async def _wait_for_room(self) -> None:
        """Backpressure: wait while the queue holds ingest.max_queue_depth items or more; a
        stop request ends the wait at once."""
        limit = self.cfg.ingest.max_queue_depth
        waiting = False
        while True:
            depth = await self._redis(self.queue.depth, "ingest: queue depth")
            if depth < limit:
                return
            if not waiting:
                log.info("queue full (%d items): waiting for room", depth)
                waiting = True
            await self._pause(self.cfg.ingest.backpressure_poll_s)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or raise Stopped as soon as a stop is requested."""
        if not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.stop.wait()
        if self.stop.is_set():
            raise Stopped


class Batch:
    """Items and ingest-time records of consecutive lines, enqueued in one transaction."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.items: list[Entry] = []
        self.problems: list[Result] = []
        self.errors: list[str] = []
        self.error_kinds: dict[str, int] = {}
        self.lines = 0
        self.bad_lines = 0
        self.skipped_entries = 0
        self.duplicates = 0
        self.flagged = 0
        self.skipped_flagged = 0
        self.unreadable = ""  # set on the shard's last batch when reading ended early

    @property
    def size(self) -> int:
        return len(self.items) + len(self.problems)

    def add(self, entry: Entry) -> None:
        if not entry.problem_status:
            self.items.append(entry)
            return
        kind = entry.problem_status  # bad_url, bad_name, blocked_address: counted as kinds
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        rec = status.make_record(entry.name, entry.url, kind, error=entry.problem)
        self.problems.append(encode_result("", self.shard, entry.name, rec))

    def count_bad_line(self, line_no: int, kind: str, why: str) -> None:
        self.bad_lines += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.errors.append(f"line {line_no}: {why}")

    def counters(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "bad_lines": self.bad_lines,
            "bad_image_info": self.skipped_entries,
            "duplicate_names": self.duplicates,
            "flagged_duplicates": self.flagged,
            "skipped_duplicates": self.skipped_flagged,
            "images": len(self.items) + len(self.problems),
        }
