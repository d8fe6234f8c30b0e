"""Helpers for dataset tests: a real crawl's output, indexed, and a live `serve-dataset`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from crawling import TEST_REDIS_URL, crawl, crawl_config, image_doc, write_docs

from assign.worker import run_assign_worker
from core.config import Config
from crawler.dataset.auth import new_token, token_hash
from testweb import ImageWeb

OK_PATHS = ["/img/640x480/a.jpg", "/img/300x200/b.png", "/img/1200x900/c.webp", "/img/64x64/d.gif"]
FAIL_PATHS = ["/fault/status/404", "/fault/html"]


@dataclass(frozen=True)
class Corpus:
    output: Path
    shards: list[str]
    docs: int  # documents in all shards
    cfg: Config


def _doc_urls(web: ImageWeb, tag: str, d: int) -> list[str]:
    """0 to 3 images per document; every third document has one that fails."""
    n = d % 4
    urls = [web.url((d + i) % 6, f"{OK_PATHS[(d + i) % 4]}?k={tag}-{d}-{i}") for i in range(n)]
    if n and d % 3 == 0:
        urls[-1] = web.url(d % 6, f"{FAIL_PATHS[d % 2]}?k={tag}-{d}")
    return urls


def crawl_corpus(web: ImageWeb, root: Path, docs_per_shard: tuple[int, ...] = (23, 17)) -> Corpus:
    """Crawl shards of documents from the loopback web, then rewrite and index them the
    way a crawl does (the assignment worker). One document in each shard is flagged
    `could_have_url_duplicate`; each shard has one line that is not JSON."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    cfg = crawl_config(namespace, root)
    tag = uuid.uuid4().hex[:6]
    paths, shards = [], []
    for s, count in enumerate(docs_per_shard):
        docs = []
        for d in range(count):
            doc = image_doc(_doc_urls(web, f"{tag}{s}", d))
            doc["url"] = f"http://example.invalid/{s}/{d}"
            doc["text_list"] = [f"shard {s} doc {d} sentence {j}." for j in range(3)]
            doc["similarity_matrix"] = [[0.2, 0.1, 0.3] for _ in doc["image_info"]]
            doc["could_have_url_duplicate"] = 1 if d == 5 else 0
            docs.append(doc)
        path = write_docs(root / f"docs_shard_{s}_v2.jsonl", docs)
        with open(path, "ab") as fh:
            fh.write(b"{not json\n")
        paths.append(str(path))
        shards.append(f"docs_shard_{s}_v2")

    async def go() -> None:
        await crawl(cfg, paths)
        await run_assign_worker(cfg, once=True)

    try:
        asyncio.run(go())
    finally:
        client = redis.Redis.from_url(TEST_REDIS_URL)
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    return Corpus(cfg.output_dir, shards, sum(docs_per_shard), cfg)


@dataclass
class Server:
    base: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def serving(output: Path, log: Path, *settings: str) -> Iterator[Server]:
    """`mmc4-crawl serve-dataset` on an ephemeral port over ``output``, with a fresh token.
    Redis points nowhere reachable: the server must not need it."""
    token = new_token()
    args = [sys.executable, "-m", "crawler", "--output", str(output)]
    args += ["--set", f"dataset.token_hashes={token_hash(token)}"]
    args += ["--set", "dataset.refresh_s=0.2"]
    for item in settings:
        args += ["--set", item]
    env = {**os.environ, "MMC4_REDIS__URL": "redis://127.0.0.1:1/0"}
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            [*args, "-v", "serve-dataset", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=sink,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = _read_line(proc.stdout, 30.0)
        assert line.startswith("dataset API on "), f"{line!r}; log: {log.read_text()}"
        base = line.split(" on ", 1)[1].strip().rsplit("/datasets/mmc4", 1)[0]
        yield Server(base, token, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _read_line(stream: object, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                return stream.readline().decode()  # type: ignore[attr-defined, no-any-return]
        return ""
    finally:
        sel.close()
