"""Status records: one terminal record per image, live counters, per-shard reports.

A record is a :class:`Record`, stored as a flat JSON object (its fields, in their order).
While a shard is in flight its records live in the Redis hash ``ns:shard:<shard>:records``;
when its last image is recorded, the records are written to
``OUTPUT/_status/<shard>.jsonl.gz`` (atomically) with a summary beside it, taken out of
Redis, and the shard is announced on ``ns:shards:done`` for the assignment worker.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NewType, TypeGuard

import msgspec
import orjson

from core import safefs
from core.storage import Storage

Status = NewType("Status", str)
"""The name of what became of an image (`Record.status`): one of the terminal statuses below,
or http_<code> (`http_status`). On the wire and on disk it is the plain string; the type makes
the checker hold every status to these names."""

# Terminal statuses. HTTP failures are recorded as http_<code> (http_404, http_503, ...).
OK = Status("ok")
TIMEOUT = Status("timeout")
CONNECTION_ERROR = Status("connection_error")
DNS_ERROR = Status("dns_error")
BLOCKED_ADDRESS = Status("blocked_address")
TOO_MANY_REDIRECTS = Status("too_many_redirects")
TOO_LARGE = Status("too_large")
OPTED_OUT = Status("opted_out")
NOT_AN_IMAGE = Status("not_an_image")
DECODE_ERROR = Status("decode_error")
TOO_MANY_PIXELS = Status("too_many_pixels")
TOO_MANY_FRAMES = Status("too_many_frames")
IMAGE_TIMEOUT = Status("image_timeout")  # the image's processing ran past images.job_timeout_s
UNSUPPORTED_IMAGE = Status("unsupported_image")
BAD_URL = Status("bad_url")
BAD_NAME = Status("bad_name")
DEAD_LETTER = Status("dead_letter")
WRITE_ERROR = Status("write_error")

# Every terminal status but ok, in the order `retry --status` lists them.
FAILURE_STATUSES: tuple[Status, ...] = (
    TIMEOUT, CONNECTION_ERROR, DNS_ERROR, BLOCKED_ADDRESS, TOO_MANY_REDIRECTS, TOO_LARGE,
    OPTED_OUT, NOT_AN_IMAGE, DECODE_ERROR, TOO_MANY_PIXELS, TOO_MANY_FRAMES, IMAGE_TIMEOUT,
    UNSUPPORTED_IMAGE, BAD_URL, BAD_NAME, DEAD_LETTER, WRITE_ERROR,
)  # fmt: skip


def http_status(code: int) -> Status:
    return Status(f"http_{code}")


# Failures that another try will not change: the image is gone (HTTP 404 Not Found, 410 Gone).
GONE_STATUSES = (http_status(404), http_status(410))


def is_failure_status(name: str) -> TypeGuard[Status]:
    """A status a failed image can have: one of FAILURE_STATUSES or http_<code>."""
    code = name.removeprefix("http_")
    return name in FAILURE_STATUSES or (
        code != name and len(code) == 3 and code.isdigit() and code[0] in "12345"
    )


class Record(msgspec.Struct, kw_only=True):
    """The terminal record of one image: what the crawl did with it."""

    image_name: str  # as in the shard
    raw_url: str = ""  # as in the shard
    status: Status
    http_code: int = 0  # last HTTP status code (0: no response)
    error: str = ""  # human-readable reason when status != ok
    mimetype: str = ""  # of the stored file
    source_mimetype: str = ""  # of the downloaded bytes, by content (python-magic)
    bytes: int = 0  # stored file size
    source_bytes: int = 0  # downloaded size
    width: int = 0  # stored
    height: int = 0
    orig_width: int = 0  # as downloaded (after EXIF orientation)
    orig_height: int = 0
    sha256: str = ""  # of the stored file
    attempts: int = 0  # HTTP attempts made
    path: str = ""  # stored file, relative to the output directory
    time: float = msgspec.field(default_factory=lambda: round(time.time(), 3))  # unix time


RECORD_FIELDS: tuple[str, ...] = Record.__struct_fields__
_DECODE_RECORD = msgspec.json.Decoder(Record)

STATUS_DIR = "_status"
SHARDS_DIR = "_shards"


def make_record(image_name: str, raw_url: str, status: Status, **fields: Any) -> Record:
    """The record of an image; `fields` are Record's other fields (a TypeError names one
    that is not)."""
    return Record(image_name=image_name, raw_url=raw_url, status=status, **fields)


def encode(rec: Record) -> bytes:
    return msgspec.json.encode(rec)


def decode(raw: bytes | str) -> Record:
    """The record of its JSON; msgspec.DecodeError (ValidationError included) for anything
    that is not one."""
    return _DECODE_RECORD.decode(raw)


@dataclass(frozen=True)
class ReportPaths:
    output: Path
    shard: str

    @property
    def directory(self) -> Path:
        return self.output / STATUS_DIR

    @property
    def report(self) -> Path:
        return self.directory / f"{self.shard}.jsonl.gz"

    @property
    def summary(self) -> Path:
        return self.directory / f"{self.shard}.summary.json"


def report_key(shard: str) -> str:
    """The storage key of a shard's report (`core.storage`)."""
    return f"{STATUS_DIR}/{shard}.jsonl.gz"


def summary_key(shard: str) -> str:
    return f"{STATUS_DIR}/{shard}.summary.json"


def shard_is_reported(storage: Storage, shard: str) -> bool:
    """(Blocking: one existence check.)"""
    return storage.exists_sync(report_key(shard))


def write_report(
    storage: Storage, shard: str, records: list[bytes], summary: dict[str, Any]
) -> str:
    """Write a shard's records (sorted by image name) and its summary, each whole or not at
    all; returns the report's key. (Blocking: call it in a thread.)"""
    problem = safefs.check_part(shard)
    if problem:
        raise safefs.UnsafePath(f"shard {problem}")
    records = sorted(records, key=lambda r: decode(r).image_name)
    body = b"".join(r + b"\n" for r in records)
    storage.put_sync(
        summary_key(shard), orjson.dumps(summary, option=orjson.OPT_INDENT_2), durable=True
    )
    storage.put_sync(report_key(shard), gzip.compress(body, 6), durable=True)
    return report_key(shard)


def read_report(path: Path) -> Iterator[Record]:
    """The records of a report file (lines that are not records are skipped)."""
    with gzip.open(path, "rb") as fh:
        yield from records_of(fh)


def report_records(data: bytes) -> Iterator[Record]:
    """The records of a report's bytes (as stored: gzip); lines that are not records are
    skipped."""
    return records_of(io.BytesIO(gzip.decompress(data)))


def records_of(lines: Iterable[bytes]) -> Iterator[Record]:
    """The records among `lines` of JSON (blank lines, and lines that are not records, are
    skipped: an image without a readable record counts as not recorded)."""
    for line in lines:
        if line.strip():
            with contextlib.suppress(msgspec.DecodeError):
                yield _DECODE_RECORD.decode(line)
