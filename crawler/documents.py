"""A shard file read line by line (gzip and zip decoded, lines and size bounded) and each line
parsed into the image entries of its document."""

from __future__ import annotations

import lzma
import struct
import zipfile
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from core import status
from core.guard import CLOSED, AddressPolicy, check_url
from core.shardfiles import READ_CHUNK, ShardUnreadable, check_image_name, open_lines


@dataclass
class Entry:
    """One image of a document: a work item, or a record of why it cannot be one."""

    name: str
    url: str
    # BAD_URL, BAD_NAME, BLOCKED_ADDRESS: recorded at ingest ("": the entry is a work item)
    problem_status: status.Status | Literal[""] = ""
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


# What a decompressor or archive reader raises on data it cannot decode (truncated streams,
# corrupt blocks, unsupported or encrypted zip members, damaged headers).
_DECODE_ERRORS = (
    OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, zipfile.LargeZipFile,
    NotImplementedError, RuntimeError, ValueError, struct.error,
)  # fmt: skip


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
        with open_lines(path) as reader:
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
