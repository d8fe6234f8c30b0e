"""Training-ready tar shards (WebDataset) of whole documents, from the dataset index.

Each sample is one document, keyed ``<shard>-<line>``. Its ``.json`` is the rewritten shard's
document with only the stored images left in ``image_info`` (and their rows of
``similarity_matrix``), plus ``id``. Two layouts:

- ``base64`` (OpenFlamingo's MMC4 loader): ``image_info[i]["image_base64"]`` holds the file;
- ``members``: each image is a member of its own, ``<key>.<i>.<ext>``, and
  ``image_info[i]["image_member"]`` names it (``<i>.<ext>``): smaller, no base64.

Tars are ``OUT/<shard>-<n>.tar`` (OUT a directory or ``s3://bucket/prefix``; the corpus is read
from OUTPUT, either too), at most ``max_docs`` documents and about ``max_bytes`` each. Every
tar is built under a temporary name and published when whole (renamed, or uploaded), then
recorded in ``OUT/_progress/<shard>.json``; a rerun with the same settings skips finished shards and
resumes an unfinished one after its last recorded tar. Shards run in parallel processes;
each holds one document at a time (and its shard's list of stored images).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import multiprocessing
import os
import signal
import tarfile
import threading
import time
from pathlib import Path
from queue import Empty
from typing import IO, Any

import numpy as np
import orjson

from assign.index import RECORD, IndexPaths
from assign.lookup import DatasetIndex, Filter
from assign.status import StoredImage, stored_images
from assign.tree import Tree, open_file, open_tree
from core import status
from core.config import StorageConfig
from core.safefs import WRITE_BUFFER
from crawler.dataset.exportjob import ExportSettings, ExportSummary, ShardResult

PROGRESS_DIR = "_progress"
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
_TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks end an archive
_PROGRESS_EVERY = 64  # documents between progress messages from a worker


def sample_key(shard: str, line: int) -> str:
    """WebDataset splits a member's name at its first dot: the key has none."""
    return f"{shard.replace('.', '_')}-{line:09d}"


def _progress_name(shard: str) -> str:
    return f"{PROGRESS_DIR}/{shard}.json"


class _TarSink:
    """The shard's tars, one at a time: members go to the open tar; ``close`` publishes it."""

    def __init__(self, out: Tree, shard: str, number: int, settings: ExportSettings) -> None:
        self.out, self.shard, self.number, self.settings = out, shard, number, settings
        self._path: Path | None = None
        self._file: IO[bytes] | None = None
        self.docs = 0
        self.first_line = self.last_line = -1

    @property
    def name(self) -> str:
        return f"{self.shard}-{self.number:06d}.tar"

    def size(self) -> int:
        return self._file.tell() if self._file is not None else 0

    def fits(self, members: list[tuple[str, bytes]]) -> bool:
        if self.docs == 0:
            return True
        if self.docs >= self.settings.max_docs:
            return False
        need = sum(tarfile.BLOCKSIZE + -(-len(b) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                   for _, b in members)  # fmt: skip
        return self.size() + need + _TAR_END <= self.settings.max_bytes

    def add(self, line: int, members: list[tuple[str, bytes]]) -> None:
        if self._file is None:
            self._path = self.out.staging(self.name)
            self._file = open(self._path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115
        for name, data in members:
            # tarfile makes the header; the body goes straight to the file (no copy loop).
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o444
            self._file.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            self._file.write(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._file.write(bytes(pad))
        self.docs += 1
        self.first_line = line if self.first_line < 0 else self.first_line
        self.last_line = line

    def close(self) -> dict[str, Any] | None:
        """Finish the open tar (published whole); its progress entry, or None."""
        if self._file is None or self._path is None:
            return None
        end = _TAR_END + -(self.size() + _TAR_END) % tarfile.RECORDSIZE
        self._file.write(bytes(end))  # the end-of-archive blocks, padded as tarfile pads
        size = self.size()
        self._file.close()
        self.out.publish(self.name, self._path)
        entry = {"name": self.name, "docs": self.docs, "bytes": size,
                 "first_line": self.first_line, "last_line": self.last_line}  # fmt: skip
        self._file = self._path = None
        return entry

    def abandon(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._file = self._path = None


def _image_files(output: Tree, shard: str) -> dict[str, StoredImage]:
    """The shard's stored images, their ``local_path`` relative to the output."""
    try:
        report = output.read(f"{status.STATUS_DIR}/{shard}.jsonl.gz")
    except FileNotFoundError:
        return {}
    return stored_images(gzip.decompress(report), images_dir=None)


def _sample(
    raw: bytes, shard: str, line: int, stored: dict[str, StoredImage], settings: ExportSettings,
    result: ShardResult, output: Tree,
) -> tuple[list[tuple[str, bytes]], int] | None:  # fmt: skip
    """The tar members of one document, and its image count; None: left out."""
    doc = orjson.loads(raw)
    key = sample_key(shard, line)
    infos = doc.get("image_info") or []
    matrix = doc.get("similarity_matrix")
    kept_infos: list[dict[str, Any]] = []
    kept_rows: list[Any] = []
    members: list[tuple[str, bytes]] = []
    for i, info in enumerate(infos):
        name = info.get("image_name") if isinstance(info, dict) else None
        image = stored.get(name) if isinstance(name, str) else None
        if image is None:
            continue
        try:
            data = output.read(image.local_path)
        except OSError:
            result.missing_files += 1
            continue
        info = dict(info)
        if settings.layout == "base64":
            info["image_base64"] = base64.b64encode(data).decode("ascii")
        else:
            ext = _EXTENSIONS.get(str(image.mimetype), "bin")
            info["image_member"] = f"{len(kept_infos)}.{ext}"
            members.append((f"{key}.{info['image_member']}", data))
        kept_infos.append(info)
        if isinstance(matrix, list) and i < len(matrix):
            kept_rows.append(matrix[i])
    n = len(kept_infos)
    if n < settings.min_stored or (settings.all_stored and n != len(infos)):
        return None  # a file recorded as stored is gone: the document no longer qualifies
    doc["image_info"] = kept_infos
    if isinstance(matrix, list):
        doc["similarity_matrix"] = kept_rows
    doc["id"] = f"{shard}:{line}"
    members.insert(0, (f"{key}.json", orjson.dumps(doc)))
    return members, n


_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    # The parent's handlers (core.early) only remember a signal: a worker ends on SIGTERM,
    # and leaves Ctrl-C to the parent.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _report(docs: int, nbytes: int) -> None:
    if _progress_queue is not None:
        _progress_queue.put((docs, nbytes))


def export_shard(
    output: str, shard: str, settings: ExportSettings, storage: StorageConfig
) -> ShardResult:
    """Export one indexed shard (resuming an unfinished earlier run); errors are returned."""
    result = ShardResult(shard)
    try:
        _export_shard(open_tree(output, storage), shard, settings, result)
    except (OSError, ValueError, orjson.JSONDecodeError) as exc:
        result.errors.append(f"{shard}: {type(exc).__name__}: {exc}")
    return result


def _export_shard(output: Tree, shard: str, settings: ExportSettings, result: ShardResult) -> None:
    out = open_tree(settings.out, output.settings)
    paths = IndexPaths(shard)
    meta = orjson.loads(output.read(paths.meta))
    described = {**settings.describe(), "source": [meta["shard_stat"], meta["report_stat"]]}
    progress_name = _progress_name(shard)
    progress = _read_progress(out, progress_name)
    if progress is not None and progress.get("settings") != described:
        for tar in progress.get("tars", []):
            out.delete(str(tar.get("name")))
        progress = None
    if progress is None:
        progress = {"shard": shard, "settings": described, "tars": [], "complete": False}
    tars: list[dict[str, Any]] = progress["tars"]
    if progress.get("complete"):
        result.skipped = True
        result.tars = len(tars)
        result.docs = sum(int(t["docs"]) for t in tars)
        _report(result.docs, 0)
        return
    after = int(tars[-1]["last_line"]) if tars else -1
    result.docs = sum(int(t["docs"]) for t in tars)
    _report(result.docs, 0)
    records = np.frombuffer(output.read(paths.records), dtype=RECORD)
    flt = settings.filter
    chosen = records[flt.mask(records["n_images"], records["n_stored"], records["dup"])]
    chosen = chosen[chosen["line"] > after] if after >= 0 else chosen
    stored = _image_files(output, shard)
    sink = _TarSink(out, shard, len(tars), settings)
    out.discard(sink.name)  # the tar a killed run was writing
    pending_docs = pending_bytes = 0
    source, source_name = open_file(meta["shard_file"], output.settings)
    try:
        with source.fetch(source_name) as local, open(local, "rb") as src:
            for rec in chosen:
                src.seek(int(rec["src_offset"]))
                raw = src.read(int(rec["src_length"]))
                line = int(rec["line"])
                sample = _sample(raw, shard, line, stored, settings, result, output)
                if sample is None:
                    continue
                members, n_images = sample
                if not sink.fits(members):
                    _finish_tar(sink, tars, progress, out, result)
                    sink = _TarSink(out, shard, len(tars), settings)
                before = sink.size()
                sink.add(line, members)
                result.images += n_images
                pending_docs += 1
                pending_bytes += sink.size() - before
                if pending_docs >= _PROGRESS_EVERY:
                    _report(pending_docs, pending_bytes)
                    pending_docs = pending_bytes = 0
        _finish_tar(sink, tars, progress, out, result)
    except BaseException:
        sink.abandon()
        raise
    _report(pending_docs, pending_bytes)
    progress["complete"] = True
    _write_progress(out, progress)


def _finish_tar(
    sink: _TarSink, tars: list[dict[str, Any]], progress: dict[str, Any], out: Tree,
    result: ShardResult,
) -> None:  # fmt: skip
    entry = sink.close()
    if entry is None:
        return
    tars.append(entry)
    result.docs += int(entry["docs"])
    result.bytes += int(entry["bytes"])
    result.tars += 1
    _write_progress(out, progress)


def _read_progress(out: Tree, name: str) -> dict[str, Any] | None:
    try:
        data = orjson.loads(out.read(name))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_progress(out: Tree, progress: dict[str, Any]) -> None:
    name = _progress_name(progress["shard"])
    out.write(name, orjson.dumps(progress, option=orjson.OPT_APPEND_NEWLINE))


def plan(
    output: str, settings: ExportSettings, only: list[str] | None = None,
    storage: StorageConfig | None = None,
) -> tuple[list[str], int]:  # fmt: skip
    """The indexed shards to export, in order, and how many documents match."""
    index = DatasetIndex(open_tree(output, storage))
    index.refresh()
    shards = [s for s in index.shards if not only or s in only]
    flt = settings.filter
    total = sum(index.total(Filter(**{**flt.__dict__, "shard": s})) for s in shards)
    return shards, total


def export(
    output: str, settings: ExportSettings, *, processes: int = 0, progress: bool = True,
    only: list[str] | None = None, storage: StorageConfig | None = None,
) -> ExportSummary:  # fmt: skip
    """Export every indexed shard of ``output`` (or ``only`` these) into ``settings.out``."""
    started = time.perf_counter()
    storage = storage or StorageConfig()
    shards, total = plan(output, settings, only, storage)
    summary = ExportSummary()
    workers = max(1, min(processes or (os.cpu_count() or 1), len(shards) or 1))
    # spawned, not forked: a bucket's client (obstore's runtime threads) does not survive fork
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    bar = _ProgressBar(queue, total, enabled=progress)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(queue,))
    bar.start()
    try:
        jobs = [(output, shard, settings, storage) for shard in shards]
        for result in pool.imap_unordered(_export_job, jobs):
            summary.add(result)
        pool.close()
    except BaseException:
        pool.terminate()  # each tar in the making is left as a temporary file, removed next run
        raise
    finally:
        pool.join()
        bar.stop()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _export_job(job: tuple[str, str, ExportSettings, StorageConfig]) -> ShardResult:
    return export_shard(*job)


class _ProgressBar:
    """A tqdm bar fed by the workers' (documents, bytes) messages, drained by a thread."""

    def __init__(self, queue: Any, total: int, *, enabled: bool) -> None:
        self.queue, self.total, self.enabled = queue, total, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, unit="doc", disable=not self.enabled, dynamic_ncols=True,
                   smoothing=0.1)  # fmt: skip
        written = 0
        try:
            while True:
                try:
                    msg = self.queue.get()
                except (EOFError, OSError, Empty):
                    return
                if msg is None:
                    return
                docs, nbytes = msg
                written += nbytes
                bar.update(docs)
                bar.set_postfix_str(f"{written / 1e6:,.0f} MB", refresh=False)
        finally:
            bar.close()
