"""Status records: one terminal record per image, live counters, per-shard reports.

A record is a flat JSON object (see :data:`RECORD_FIELDS`). While a shard is in flight its
records live in the Redis hash ``ns:shard:<shard>:records``; when its last image is recorded,
the records are written to ``OUTPUT/_status/<shard>.jsonl.gz`` (atomically) with a summary
beside it, taken out of Redis, and the shard is announced on ``ns:shards:done`` for the
assignment worker.
"""

from __future__ import annotations

import gzip
import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from core import safefs
from core.storage import Storage

# Terminal statuses. HTTP failures are recorded as http_<code> (http_404, http_503, ...).
OK = "ok"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
DNS_ERROR = "dns_error"
BLOCKED_ADDRESS = "blocked_address"
TOO_MANY_REDIRECTS = "too_many_redirects"
TOO_LARGE = "too_large"
OPTED_OUT = "opted_out"
NOT_AN_IMAGE = "not_an_image"
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
TOO_MANY_FRAMES = "too_many_frames"
IMAGE_TIMEOUT = "image_timeout"  # the image's processing ran past images.job_timeout_s
UNSUPPORTED_IMAGE = "unsupported_image"
BAD_URL = "bad_url"
BAD_NAME = "bad_name"
DEAD_LETTER = "dead_letter"
WRITE_ERROR = "write_error"

# Every terminal status but ok, in the order `retry --status` lists them.
FAILURE_STATUSES = (
    TIMEOUT, CONNECTION_ERROR, DNS_ERROR, BLOCKED_ADDRESS, TOO_MANY_REDIRECTS, TOO_LARGE,
    OPTED_OUT, NOT_AN_IMAGE, DECODE_ERROR, TOO_MANY_PIXELS, TOO_MANY_FRAMES, IMAGE_TIMEOUT,
    UNSUPPORTED_IMAGE, BAD_URL, BAD_NAME, DEAD_LETTER, WRITE_ERROR,
)  # fmt: skip


# Failures that another try will not change: the image is gone (HTTP 404 Not Found, 410 Gone).
GONE_STATUSES = ("http_404", "http_410")


def is_failure_status(name: str) -> bool:
    """A status a failed image can have: one of FAILURE_STATUSES or http_<code>."""
    code = name.removeprefix("http_")
    return name in FAILURE_STATUSES or (
        code != name and len(code) == 3 and code.isdigit() and code[0] in "12345"
    )


RECORD_FIELDS = (
    "image_name",  # as in the shard
    "raw_url",  # as in the shard
    "status",  # one of the statuses above
    "http_code",  # last HTTP status code (0: no response)
    "error",  # human-readable reason when status != ok
    "mimetype",  # of the stored file
    "source_mimetype",  # of the downloaded bytes, by content (python-magic)
    "bytes",  # stored file size
    "source_bytes",  # downloaded size
    "width",  # stored
    "height",
    "orig_width",  # as downloaded (after EXIF orientation)
    "orig_height",
    "sha256",  # of the stored file
    "attempts",  # HTTP attempts made
    "path",  # stored file, relative to the output directory
    "time",  # unix time of the record
)

STATUS_DIR = "_status"
SHARDS_DIR = "_shards"


def http_status(code: int) -> str:
    return f"http_{code}"


def make_record(image_name: str, raw_url: str, status: str, **fields: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "image_name": image_name,
        "raw_url": raw_url,
        "status": status,
        "http_code": 0,
        "error": "",
        "mimetype": "",
        "source_mimetype": "",
        "bytes": 0,
        "source_bytes": 0,
        "width": 0,
        "height": 0,
        "orig_width": 0,
        "orig_height": 0,
        "sha256": "",
        "attempts": 0,
        "path": "",
        "time": round(time.time(), 3),
    }
    rec.update(fields)
    return rec


def encode(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec)


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
    records = sorted(records, key=lambda r: orjson.loads(r)["image_name"])
    body = b"".join(r + b"\n" for r in records)
    storage.put_sync(
        summary_key(shard), orjson.dumps(summary, option=orjson.OPT_INDENT_2), durable=True
    )
    storage.put_sync(report_key(shard), gzip.compress(body, 6), durable=True)
    return report_key(shard)


def read_report(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rb") as fh:
        yield from _lines(fh)


def report_records(data: bytes) -> Iterator[dict[str, Any]]:
    """The records of a report's bytes (as stored: gzip)."""
    return _lines(io.BytesIO(gzip.decompress(data)))


def _lines(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.strip():
            yield orjson.loads(line)


def decode(raw: bytes | str) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(raw)
    return out
