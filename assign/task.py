"""One completed crawl shard to rewrite, as announced on the ``shards:done`` stream.

Blocking work (download, rewrite) lives here so that the worker can run it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from assign.document import AssignOptions
from assign.rewrite import ShardReport, completed_report, describe, rewrite_shard
from assign.shardio import write_atomically
from assign.solve import SOLVERS, Solver
from assign.status import load_stored_images

# Shard ids become file names: no separators, no hidden files, nothing odd.
_SAFE_SHARD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_REMOTE_SCHEMES = ("http", "https")


class BadTask(ValueError):
    """The stream entry cannot describe a shard (missing field, unsafe shard id)."""


@dataclass(frozen=True)
class ShardTask:
    shard: str
    source: str
    report: str  # crawler's status report (.jsonl.gz)
    output: str  # crawler's output directory (images are under it)

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes], default_output: str) -> ShardTask:
        values = {k.decode(): v.decode() for k, v in fields.items()}
        shard, source = values.get("shard", ""), values.get("source", "")
        if not _SAFE_SHARD.fullmatch(shard):
            raise BadTask(f"unusable shard id {shard!r}")
        if not source:
            raise BadTask(f"shard {shard}: no source")
        output = values.get("output") or default_output
        return cls(shard=shard, source=source, report=values.get("report", ""), output=output)


@dataclass(frozen=True)
class AssignSettings:
    solver: Solver
    downloaded_only: bool
    keep_empty_documents: bool
    # Destination directory for every shard; empty: <task.output>/_shards.
    output: str
    # Downloads a shard named by URL to a local file: the crawler's one shard downloader
    # (`core.shardfiles.download_blocking`: the address guard, the size and time limits).
    # None: a shard named by URL cannot be rewritten.
    download: Callable[[str, Path], None] | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"assign.solver must be one of {SOLVERS}, got {self.solver!r}")


def destination(task: ShardTask, settings: AssignSettings) -> Path:
    base = Path(settings.output) if settings.output else Path(task.output) / "_shards"
    return base / f"{task.shard}.jsonl"


def process(task: ShardTask, settings: AssignSettings) -> ShardReport:
    """Rewrite the task's shard into its destination (skipped if already complete)."""
    target = destination(task, settings)
    options = _options(task, settings)
    described = describe(options, task.report if settings.downloaded_only else None)
    if settings.downloaded_only:
        # The report is rewritten in place after `retry`: a rewrite follows its content, so a
        # new report never finds the rewrite of an older one "already complete".
        described["status_report_sha256"] = _sha256(Path(task.report))
    done = completed_report(target, described)
    if done is not None:
        return done
    with _local_source(task, target.parent, settings.download) as source:
        return rewrite_shard(source, target, options, settings=described)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def record_failure(task: ShardTask, settings: AssignSettings, message: str) -> Path:
    """Leave ``<shard>.error.json`` beside where the output would be, for a person to see."""
    target = destination(task, settings)
    path = target.with_name(f"{task.shard}.error.json")
    text = json.dumps({"shard": task.shard, "source": task.source, "error": message}) + "\n"
    write_atomically(path, text.encode())
    return path


def _options(task: ShardTask, settings: AssignSettings) -> AssignOptions:
    if not settings.downloaded_only:
        return AssignOptions(solver=settings.solver)
    if not task.report:
        raise BadTask(f"shard {task.shard}: downloaded-only mode needs a status report")
    stored = load_stored_images(task.report, images_dir=task.output)
    return AssignOptions(
        solver=settings.solver, stored=stored, keep_empty_documents=settings.keep_empty_documents
    )


@contextlib.contextmanager
def _local_source(
    task: ShardTask, work_dir: Path, download: Callable[[str, Path], None] | None
) -> Iterator[Path]:
    parts = urllib.parse.urlsplit(task.source)
    scheme = parts.scheme.lower()
    if scheme == "file":
        yield Path(urllib.request.url2pathname(parts.path))
        return
    if scheme not in _REMOTE_SCHEMES:
        yield Path(task.source)
        return
    if download is None:
        raise BadTask(f"shard {task.shard}: source {task.source} is a URL and no downloader is set")
    work_dir.mkdir(parents=True, exist_ok=True)
    for leftover in work_dir.glob(f".{task.shard}.source.*.tmp"):  # from a killed worker
        leftover.unlink(missing_ok=True)
    temp = work_dir / f".{task.shard}.source.{secrets.token_hex(4)}.tmp"
    try:
        download(task.source, temp)
        yield temp
    finally:
        temp.unlink(missing_ok=True)
