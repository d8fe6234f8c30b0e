"""Shards -> work items in the Redis queue, streamed, validated, with backpressure and resume.

Each ``image_info`` entry of each document becomes an item ``(shard, image_name, raw_url)``.
Ingest of a shard resumes at the line after the last enqueued batch (``ingest_line`` in the
shard's meta hash, written in the same transaction as the batch), skips shards already
reported, and seals a shard (sets its image total) once all of it is enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import logging
import os
import re
import tempfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import braceexpand
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from crawler import status
from crawler.config import Config
from crawler.connection import retrying
from crawler.guard import CLOSED, AddressPolicy, check_url
from crawler.keys import Keys
from crawler.queue import WorkQueue, encode_result

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl.gz", ".jsonl.zip", ".jsonl", ".json.gz", ".json")
MAX_NAME_BYTES = 255


class ShardMissing(Exception):
    """A shard source does not exist (404, or no such file)."""


@dataclass(frozen=True)
class ShardSource:
    location: str  # local path or http(s) URL, as given
    shard: str  # shard id: the file name without its .jsonl[.gz|.zip] suffix

    @property
    def remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


def shard_id(location: str) -> str:
    name = location.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_sources(patterns: list[str]) -> list[ShardSource]:
    """Expand brace patterns and directories into shard sources, in the order given."""
    out: list[ShardSource] = []
    seen: set[str] = set()
    for pattern in patterns:
        for loc in braceexpand.braceexpand(pattern):
            locs = [loc]
            if not loc.startswith(("http://", "https://")) and os.path.isdir(loc):
                locs = sorted(
                    str(p) for p in Path(loc).iterdir() if p.name.endswith(SHARD_SUFFIXES)
                )
            for one in locs:
                if not one.startswith(("http://", "https://")):
                    one = os.path.abspath(one)  # workers and the assigner may run elsewhere
                if one not in seen:
                    seen.add(one)
                    out.append(ShardSource(one, shard_id(one)))
    return out


def check_shard_id(shard: str) -> str | None:
    """Why a shard id is unusable as a directory name, or None."""
    if not shard or shard.startswith((".", "_")):
        return f"shard id {shard!r} must not be empty or start with '.' or '_'"
    if "/" in shard or "\\" in shard or any(ord(c) < 32 for c in shard):
        return f"shard id {shard!r} contains a path separator or control character"
    return None


# Searched in C: a generator over every character of every name and URL was a third of
# ingest's CPU (cProfile).
_NAME_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_image_name(name: Any) -> str | None:
    """Why an image_name cannot be a plain file name under the shard directory, or None."""
    if not isinstance(name, str):
        return f"image_name is not a string: {name!r}"
    if not name:
        return "image_name is empty"
    if "/" in name or "\\" in name:
        return f"image_name {name!r} contains a path separator"
    if name.startswith("."):
        return f"image_name {name!r} starts with '.'"
    if _NAME_CONTROL.search(name):
        return f"image_name {name!r} contains a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return "image_name is longer than 255 bytes"
    return None


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
    result = LineResult()
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


def _open_lines(path: Path) -> Iterator[bytes]:
    name = path.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            if not members:
                raise ShardMissing(f"{path}: zip archive is empty")
            with zf.open(members[0]) as fh:
                yield from _lines(fh)
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            yield from _lines(fh)
    else:
        with open(path, "rb") as fh:
            yield from _lines(fh)


def _lines(fh: Any) -> Iterator[bytes]:
    for line in io.BufferedReader(fh, buffer_size=1 << 20):
        stripped = line.strip()
        if stripped:
            yield stripped


@contextlib.asynccontextmanager
async def local_copy(source: ShardSource, cfg: Config) -> AsyncIterator[Path]:
    """The shard as a local file: itself, or a temporary download of a remote shard."""
    if not source.remote:
        path = Path(source.location)
        if not path.is_file():
            raise ShardMissing(f"{source.location}: no such file")
        yield path
        return
    tmp_dir = Path(cfg.paths.data_dir) / "downloads"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in SHARD_SUFFIXES if source.location.endswith(s)), ".jsonl")
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        await _download(source.location, tmp, cfg)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


class ShardDownloadError(OSError):
    """A shard named by URL could not be downloaded (the HTTP client's error, as an OSError)."""


async def _download(url: str, dest: Path, cfg: Config) -> None:
    # aiohttp is imported only for shards named by URL: `run` and `ingest` on local shards
    # start without it (~0.1-0.2 s of CPU).
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=cfg.ingest.download_timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as resp,
        ):
            if resp.status == 404:
                raise ShardMissing(f"{url}: HTTP 404")
            resp.raise_for_status()
            async with aiofiles.open(dest, "wb") as fh:  # 100s of MB: keep the loop free
                async for chunk in resp.content.iter_chunked(1 << 20):
                    await fh.write(chunk)
    except aiohttp.ClientError as exc:
        raise ShardDownloadError(f"{url}: {exc}") from exc


@dataclass
class IngestStats:
    shards: int = 0
    shards_skipped: int = 0
    shards_missing: int = 0
    lines: int = 0
    bad_lines: int = 0
    items: int = 0
    bad_entries: int = 0
    duplicate_names: int = 0


class Ingest:
    """Feeds shards into the queue; one instance per ingest process."""

    def __init__(self, cfg: Config, client: aioredis.Redis) -> None:
        self.cfg = cfg
        self.client = client
        self.keys = Keys(cfg.redis.namespace)
        self.queue = WorkQueue(client, self.keys, cfg.queue)
        self.stats = IngestStats()
        self.output = cfg.output_dir

    async def run(self, sources: list[ShardSource], stop: asyncio.Event | None = None) -> None:
        for source in sources:
            if stop is not None and stop.is_set():
                return
            await self.ingest_shard(source)

    async def ingest_shard(self, source: ShardSource) -> None:
        problem = check_shard_id(source.shard)
        if problem:
            log.error("skipping %s: %s", source.location, problem)
            await self._count_error("bad_shard_id")
            return
        if status.shard_is_reported(self.output, source.shard):
            log.info("shard %s already complete (report exists)", source.shard)
            self.stats.shards_skipped += 1
            return
        meta_key = self.keys.shard_meta(source.shard)
        b = self.cfg.redis.reconnect_backoff_s
        meta = await retrying(lambda: self.client.hgetall(meta_key), b, what="ingest")
        if b"total" in meta:
            self.stats.shards_skipped += 1
            return
        lock = self.keys.shard_meta(source.shard) + ":ingest-lock"
        token = uuid.uuid4().hex

        async def acquire() -> bool:
            if await self.client.set(lock, token, nx=True, ex=600):
                return True
            return bool(await self.client.get(lock) == token.encode())  # ours, reply lost

        if not await retrying(acquire, b, what="ingest lock"):
            log.warning("shard %s is being ingested by another process", source.shard)
            self.stats.shards_skipped += 1
            return
        try:
            start_line = int(meta.get(b"ingest_line", b"0"))
            async with local_copy(source, self.cfg) as path:
                await self._ingest_file(source, path, start_line, lock)
            self.stats.shards += 1
        except ShardMissing as exc:
            log.warning("shard missing, skipped: %s", exc)
            self.stats.shards_missing += 1
            await self._count_error("missing_shard")
        except (OSError, zipfile.BadZipFile, EOFError) as exc:  # ShardDownloadError included
            log.error("shard %s unreadable, skipped: %s", source.location, exc)
            await self._count_error("unreadable_shard")
        finally:
            with contextlib.suppress(Exception):
                if await self.client.get(lock) == token.encode():
                    await self.client.delete(lock)

    async def _count_error(self, kind: str, n: int = 1) -> None:
        await self.client.hincrby(self.keys.ingest_errors, kind, n)

    async def _ingest_file(
        self, source: ShardSource, path: Path, start_line: int, lock: str
    ) -> None:
        seen: set[str] = set()
        batch = Batch(source.shard)
        line_no = 0
        policy = AddressPolicy.of(self.cfg.fetch)
        for line_no, line in enumerate(_open_lines(path), start=1):
            parsed = parse_line(line, policy)
            fresh = line_no > start_line
            if fresh:
                self.stats.lines += 1
                batch.lines += 1
                if parsed.error:
                    self.stats.bad_lines += 1
                    batch.bad_lines += 1
                    batch.errors.append(f"line {line_no}: {parsed.error}")
                batch.skipped_entries += parsed.skipped_entries
            for entry in parsed.entries:
                if entry.name in seen:
                    if fresh:
                        batch.duplicates += 1
                    continue
                seen.add(entry.name)
                if fresh:
                    batch.add(entry)
            if fresh and batch.size >= self.cfg.ingest.batch_size:
                await self._flush(batch, source, line_no, lock)
                batch = Batch(source.shard)
            if line_no % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive while skipping a resumed prefix
        await self._flush(batch, source, line_no, lock)
        total = len(seen)
        b = self.cfg.redis.reconnect_backoff_s
        await retrying(lambda: self.queue.seal(source.shard, total), b, what="seal")
        log.info("shard %s enqueued: %d images", source.shard, len(seen))

    async def _flush(self, batch: Batch, source: ShardSource, line_no: int, lock: str) -> None:
        await self._wait_for_room()
        for err in batch.errors[:20]:
            log.warning("%s %s", source.shard, err)
        meta = self.keys.shard_meta(source.shard)
        delay = self.cfg.redis.reconnect_backoff_s
        while True:
            try:
                pipe = await self._batch_pipeline(batch, source, line_no, lock)
                await pipe.execute()
                break
            except (RedisError, OSError) as exc:
                # Ride out a Redis restart without applying the batch twice: the transaction
                # moves ingest_line to line_no, so after a lost reply meta tells.
                log.warning("ingest: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                with contextlib.suppress(RedisError, OSError):
                    applied = await self.client.hget(meta, "ingest_line")
                    if applied is not None and int(applied) >= line_no > 0:
                        break
        self.stats.items += len(batch.items)
        self.stats.bad_entries += len(batch.problems) + batch.skipped_entries
        self.stats.duplicate_names += batch.duplicates

    async def _batch_pipeline(
        self, batch: Batch, source: ShardSource, line_no: int, lock: str
    ) -> Any:
        """One transaction: the batch's items, its ingest-time records, counters, resume point."""
        pipe = self.client.pipeline(transaction=True)
        meta = self.keys.shard_meta(source.shard)
        pipe.hset(meta, mapping={"source": source.location, "ingest_line": line_no})
        for field_name, value in batch.counters().items():
            if value:
                pipe.hincrby(meta, field_name, value)
        pipe.sadd(self.keys.shards_open, source.shard)
        await self.queue.add_to(pipe, source.shard, [(e.name, e.url) for e in batch.items])
        if batch.problems:
            await self.queue.record_to(pipe, batch.problems)
        errors = {
            "bad_line": batch.bad_lines,
            "bad_image_info": batch.skipped_entries,
            "bad_url": sum(1 for p in batch.problems if p[4] == status.BAD_URL),
            "bad_name": sum(1 for p in batch.problems if p[4] == status.BAD_NAME),
            "blocked_address": sum(1 for p in batch.problems if p[4] == status.BLOCKED_ADDRESS),
        }
        for kind, n in errors.items():
            if n:
                pipe.hincrby(self.keys.ingest_errors, kind, n)
        pipe.expire(lock, 600)
        return pipe

    async def _wait_for_room(self) -> None:
        limit = self.cfg.ingest.max_queue_depth
        while True:
            try:
                if await self.queue.depth() < limit:
                    return
            except (RedisError, OSError) as exc:
                log.warning("ingest: Redis unavailable (%s)", exc)
            await asyncio.sleep(self.cfg.ingest.backpressure_poll_s)


class Batch:
    """Items and ingest-time records of consecutive lines, enqueued in one transaction."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.items: list[Entry] = []
        self.problems: list[tuple[str, str, str, bytes, str, int]] = []
        self.errors: list[str] = []
        self.lines = 0
        self.bad_lines = 0
        self.skipped_entries = 0
        self.duplicates = 0

    @property
    def size(self) -> int:
        return len(self.items) + len(self.problems)

    def add(self, entry: Entry) -> None:
        if not entry.problem_status:
            self.items.append(entry)
            return
        rec = status.make_record(entry.name, entry.url, entry.problem_status, error=entry.problem)
        self.problems.append(encode_result("", self.shard, entry.name, rec))

    def counters(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "bad_lines": self.bad_lines,
            "bad_image_info": self.skipped_entries,
            "duplicate_names": self.duplicates,
            "images": len(self.items) + len(self.problems),
        }
