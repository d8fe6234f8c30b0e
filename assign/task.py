"""One completed crawl shard to rewrite, as announced on the ``shards:done`` stream.

Blocking work (download, rewrite) lives here so that the worker can run it in a thread.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from assign.document import AssignOptions
from assign.rewrite import ShardReport, completed_report, describe, rewrite_into
from assign.solve import SOLVERS, Solver
from assign.status import stored_images
from assign.tree import Tree, open_tree
from core.config import StorageConfig
from core.status import SHARDS_DIR, STATUS_DIR

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
    # The client settings of a bucket (output or destination).
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"assign.solver must be one of {SOLVERS}, got {self.solver!r}")


def destination(task: ShardTask, settings: AssignSettings) -> tuple[Tree, str]:
    """The tree and name the rewritten shard goes to."""
    if settings.output:
        return open_tree(settings.output, settings.storage), f"{task.shard}.jsonl"
    return open_tree(task.output, settings.storage), f"{SHARDS_DIR}/{task.shard}.jsonl"


def report_of(task: ShardTask) -> str:
    """The name of the shard's status report in the crawler's output."""
    return f"{STATUS_DIR}/{task.shard}.jsonl.gz"


def process(task: ShardTask, settings: AssignSettings) -> ShardReport:
    """Rewrite the task's shard into its destination (skipped if already complete)."""
    tree, name = destination(task, settings)
    options = AssignOptions(solver=settings.solver)
    described = describe(options, None)
    if settings.downloaded_only:
        if not task.report:
            raise BadTask(f"shard {task.shard}: downloaded-only mode needs a status report")
        report = open_tree(task.output, settings.storage).read(report_of(task))
        stored = stored_images(gzip.decompress(report), images_dir=task.output)
        options = AssignOptions(
            solver=settings.solver, stored=stored,
            keep_empty_documents=settings.keep_empty_documents,
        )  # fmt: skip
        described = describe(options, task.report)
        # The report is rewritten in place after `retry`: a rewrite follows its content, so a
        # new report never finds the rewrite of an older one "already complete".
        described["status_report_sha256"] = hashlib.sha256(report).hexdigest()
    done = completed_report(tree, name, described)
    if done is not None:
        return done
    source_name = name.removesuffix(".jsonl") + ".source"  # not a leftover of `name`'s
    with _local_source(task, tree, source_name, settings.download) as source:
        return rewrite_into(tree, name, source, options, settings=described)


def record_failure(task: ShardTask, settings: AssignSettings, message: str) -> str:
    """Leave ``<shard>.error.json`` beside where the output would be, for a person to see."""
    tree, name = destination(task, settings)
    where = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    text = json.dumps({"shard": task.shard, "source": task.source, "error": message}) + "\n"
    tree.write(f"{where}{task.shard}.error.json", text.encode())
    return tree.url(f"{where}{task.shard}.error.json")


@contextlib.contextmanager
def _local_source(
    task: ShardTask, tree: Tree, name: str, download: Callable[[str, Path], None] | None
) -> Iterator[Path]:
    """The task's source shard as a local file (a URL is downloaded beside the output, or
    into the bucket's scratch directory, and removed afterwards)."""
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
    tree.discard(name)  # from a killed worker
    temp = tree.staging(name)
    try:
        download(task.source, temp)
        yield temp
    finally:
        temp.unlink(missing_ok=True)
