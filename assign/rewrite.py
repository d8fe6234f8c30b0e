"""Rewrite one shard: every document's assignment recomputed, everything else as it was.

Documents stay in their order with their keys in their order; lines that are not JSON, and
documents that cannot be assigned, are copied byte for byte; every output line ends with a
newline. A plain reassignment takes most lines through ``assign.fastline``, which writes every
top-level field but ``image_info`` back as the bytes it was read as; the rest go through
``assign.jsonline`` and ``assign.document``. The shard is streamed, never loaded whole. The
output replaces its destination atomically (``assign.tree``); then a report
``<name>.report.json`` is written next to it.

Resume: a destination whose report says it is complete, was made with the same settings and
matches the output's size is skipped. The old report is removed before the new output is
published, so a report always describes the output beside it. The output may be a local
directory or a bucket (``assign.tree``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from assign.document import AssignOptions, Outcome, assign_document
from assign.fastline import parse_plain, plain_pieces, solve_plain
from assign.jsonline import MalformedLine, parse_line
from assign.jsonline import dump_line as _dump
from assign.tree import LocalTree, Tree
from core.safefs import WRITE_BUFFER
from core.shardfiles import open_lines

MALFORMED_JSON = "malformed_json"


@dataclass
class ShardReport:
    source: str
    output: str
    settings: dict[str, Any]
    lines: int = 0
    docs: int = 0  # lines that are JSON
    rewritten: int = 0
    unchanged: int = 0  # documents copied as they were (errors, no image)
    dropped_docs: int = 0
    kept_images: int = 0
    dropped_images: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0
    seconds: float = 0.0
    complete: bool = False
    skipped: bool = False  # found complete from an earlier run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def report_path(output: Path) -> Path:
    return output.with_name(report_name(output.name))


def report_name(name: str) -> str:
    """``<dir>/<stem>.jsonl`` -> ``<dir>/<stem>.report.json``."""
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    return f"{stem}.report.json"


def describe(options: AssignOptions, status_report: str | None) -> dict[str, Any]:
    """What a rewrite means, stored in its report; a complete output is reused only if equal."""
    return {
        "solver": options.solver,
        "downloaded_only": options.stored is not None,
        "status_report": status_report,
        "keep_empty_documents": options.keep_empty_documents,
    }


def completed_report(tree: Tree, name: str, settings: Mapping[str, Any]) -> ShardReport | None:
    """The report of an earlier complete rewrite into ``name`` with these settings, if any."""
    try:
        data = orjson.loads(tree.read(report_name(name)))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    found = tree.stat(name)
    if not isinstance(data, dict) or data.get("complete") is not True or found is None:
        return None
    if data.get("settings") != dict(settings) or data.get("output_bytes") != found.size:
        return None
    try:
        report = ShardReport(**data)
    except TypeError:  # written by another version
        return None
    report.skipped = True
    return report


def rewrite_shard(
    source: Path,
    output: Path,
    options: AssignOptions,
    *,
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
) -> ShardReport:
    """Rewrite ``source`` into ``output`` (may be the same path) and return the report."""
    return rewrite_into(
        LocalTree(output.parent), output.name, source, options, settings=settings, force=force
    )


def rewrite_into(
    tree: Tree,
    name: str,
    source: Path,
    options: AssignOptions,
    *,
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
) -> ShardReport:
    """Rewrite the local file ``source`` into ``name`` of ``tree`` and return the report."""
    settings = dict(settings if settings is not None else describe(options, None))
    if not force:
        done = completed_report(tree, name, settings)
        if done is not None:
            return done
    tree.discard(name)
    tree.discard(report_name(name))  # a run killed while writing its report
    started = time.perf_counter()
    report = ShardReport(source=str(source), output=tree.url(name), settings=settings)
    built = tree.staging(name)
    try:
        with open_lines(source) as lines, open(built, "wb", buffering=WRITE_BUFFER) as out:
            for raw in lines:
                _rewrite_one(raw, out, options, report)
        report.output_bytes = built.stat().st_size
        tree.delete(report_name(name))
        tree.publish(name, built)
    finally:
        built.unlink(missing_ok=True)
    report.seconds = round(time.perf_counter() - started, 3)
    report.complete = True
    text = orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    # Not synced: the report only says that the (synced) output is complete. One lost to a
    # power cut, or left empty or partial by it, fails `completed_report`'s checks (JSON,
    # settings, the output's size) and the shard is rewritten again. Two fewer disk syncs.
    tree.write(report_name(name), text, durable=False)
    return report


def _rewrite_one(raw: bytes, out: IO[bytes], options: AssignOptions, report: ShardReport) -> None:
    """One line (its newline optional): the per-line fast path, else the general path."""
    report.lines += 1
    doc = parse_plain(raw) if options.stored is None else None
    if doc is not None:
        solve_plain(doc, options.solver)
        report.docs += 1
        report.rewritten += 1
        report.kept_images += len(doc.images)
        out.writelines(plain_pieces(doc))
    else:
        out.write(_rewrite_line(raw, options, report))


def _rewrite_line(raw: bytes, options: AssignOptions, report: ShardReport) -> bytes:
    original = raw if raw.endswith(b"\n") else raw + b"\n"
    try:
        parsed = parse_line(original[:-1])
    except MalformedLine:
        report.count_error(MALFORMED_JSON)
        return original
    report.docs += 1
    outcome = assign_document(parsed.doc, options)
    _count(outcome, report)
    if outcome.status == "unchanged":
        return original
    if outcome.status == "dropped":
        return b""
    return _dump(parsed, outcome.matrix_untouched)


def _count(outcome: Outcome, report: ShardReport) -> None:
    if outcome.error is not None:
        report.count_error(outcome.error)
    if outcome.status == "rewritten":
        report.rewritten += 1
    elif outcome.status == "unchanged":
        report.unchanged += 1
    else:
        report.dropped_docs += 1
    report.kept_images += outcome.kept_images
    report.dropped_images += outcome.dropped_images
