"""The dataset API: the crawled corpus over HTTP, read-only, from ``OUTPUT`` alone.

| route | what |
|---|---|
| ``GET /datasets/mmc4?limit=&offset=`` | a page: documents, total, limit, offset, next |
| ``GET /datasets/mmc4?cursor=<id>`` | the page starting at a document (``next`` of the last page) |
| ``GET /datasets/mmc4/{id}`` | one document |
| ``GET /datasets/mmc4/images/{shard}/{name}`` | a stored image (ETag, Range, Cache-Control) |
| ``GET /openapi.json`` | the OpenAPI 3.1 description (no token needed) |

Every ``/datasets`` route needs ``Authorization: Bearer <token>``. Shards appear as the crawl
indexes them (the index directory is looked at every ``dataset.refresh_s``); no Redis is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web

from assign.index import IMAGE_ROUTE, SHARD_ID
from assign.lookup import DatasetIndex, Filter, Page, ShardChanged
from assign.tree import Tree, open_tree
from core.config import Config
from crawler.dataset import openapi
from crawler.dataset.auth import TokenCheck

log = logging.getLogger("crawler.dataset.api")

LIST_PARAMS = ("limit", "offset", "cursor", "shard", "min_images", "min_stored", "all_stored")
DEFAULT_LIMIT = 100
MAX_COUNT = 0xFFFF  # images per document the index can count
MAX_OFFSET = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")
_ID = re.compile(r"(?P<shard>[A-Za-z0-9][A-Za-z0-9._-]*):(?P<line>[0-9]{1,10})")
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
# The formats the crawler stores (crawler/images.py), by their first bytes.
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

INDEX_KEY = web.AppKey("index", DatasetIndex)
CONFIG_KEY = web.AppKey("config", Config)
TOKENS_KEY = web.AppKey("tokens", TokenCheck)


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, error: str, message: str, **extra: object) -> web.Response:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="mmc4"'}
        if extra.pop("invalid", False):
            headers["WWW-Authenticate"] += ', error="invalid_token"'
    return _json({"error": error, "message": message, **extra}, status, headers)


def _bad(exc: BadParameter) -> web.Response:
    return _error(400, "bad_parameter", exc.message, parameter=exc.parameter)


@web.middleware
async def _changing(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ShardChanged as exc:
        return _json(
            {"error": "reindexing", "message": f"shard {exc} is being re-indexed, ask again"},
            503,
            {"Retry-After": "1"},
        )


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith("/datasets"):
        return await handler(request)
    header = request.headers.get("Authorization")
    if not request.app[TOKENS_KEY].accepts(header):
        if header:
            return _error(401, "unauthorized", "the bearer token is not valid", invalid=True)
        return _error(401, "unauthorized", "an Authorization: Bearer <token> header is required")
    return await handler(request)


def _int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw):
        raise BadParameter(name, f"{name} must be an integer in {low}..{high}, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadParameter(name, f"{name} must be in {low}..{high}, got {value}")
    return value


def _bool(query: dict[str, str], name: str) -> bool:
    raw = query.get(name)
    if raw is None:
        return False
    low = raw.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise BadParameter(name, f"{name} must be true or false, got {raw[:40]!r}")


def parse_id(text: str) -> tuple[str, int] | None:
    m = _ID.fullmatch(text)
    if m is None:
        return None
    return m["shard"], int(m["line"])


def _query(request: web.Request) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in LIST_PARAMS:
            raise BadParameter(
                name, f"unknown parameter {name[:40]!r} (known: {', '.join(LIST_PARAMS)})"
            )
        if name in query:
            raise BadParameter(name, f"{name} is given more than once")
        query[name] = value
    return query


def _filter(query: dict[str, str], index: DatasetIndex, cfg: Config) -> Filter:
    shard = query.get("shard")
    if shard is not None and not (SHARD_ID.fullmatch(shard) and index.has_shard(shard)):
        raise BadParameter("shard", f"no indexed shard {shard[:80]!r}")
    return Filter(
        min_images=_int(query, "min_images", 0, 0, MAX_COUNT),
        min_stored=_int(query, "min_stored", 0, 0, MAX_COUNT),
        all_stored=_bool(query, "all_stored"),
        shard=shard,
        skip_url_duplicates=cfg.corpus.skip_url_duplicates,
    )


async def list_documents(request: web.Request) -> web.Response:
    index, cfg = request.app[INDEX_KEY], request.app[CONFIG_KEY]
    try:
        query = _query(request)
        body = await asyncio.to_thread(_list_body, index, cfg, query)
    except BadParameter as exc:
        return _bad(exc)
    return web.Response(body=body, content_type="application/json")


def _list_body(index: DatasetIndex, cfg: Config, query: dict[str, str]) -> bytes:
    """A page's JSON (in a thread: the index reads from the output tree)."""
    limit = _int(
        query, "limit", min(DEFAULT_LIMIT, cfg.dataset.max_limit), 1, cfg.dataset.max_limit
    )
    offset = _int(query, "offset", 0, 0, MAX_OFFSET)
    flt = _filter(query, index, cfg)
    cursor = query.get("cursor")
    if cursor is not None:
        if "offset" in query:
            raise BadParameter("offset", "give either offset or cursor, not both")
        where = parse_id(cursor)
        if where is None or not index.has_shard(where[0]):
            raise BadParameter("cursor", f"cursor must be a document id, got {cursor[:80]!r}")
        page = index.page_from(flt, where[0], where[1], limit)
    else:
        page = index.page(flt, offset, limit)
    return _page_body(index, page, limit)


def _page_body(index: DatasetIndex, page: Page, limit: int) -> bytes:
    docs = index.documents(page.hits)
    tail = orjson.dumps(
        {"total": page.total, "limit": limit, "offset": page.offset, "next": page.next}
    )
    return b'{"documents":[' + b",".join(docs) + b"]," + tail[1:]


async def get_document(request: web.Request) -> web.Response:
    index, cfg = request.app[INDEX_KEY], request.app[CONFIG_KEY]
    where = parse_id(request.match_info["id"])

    def find() -> bytes | None:
        hit = index.find(*where) if where is not None else None
        if hit is None or (cfg.corpus.skip_url_duplicates and int(hit.record["dup"])):
            return None
        return index.document(hit)

    body = await asyncio.to_thread(find)
    if body is None:
        return _error(404, "not_found", "no such document")
    return web.Response(body=body, content_type="application/json")


def _sniff(head: bytes, name: str) -> str:
    """A stored image's type from its first bytes."""
    for signature, mimetype in _SIGNATURES:
        if head.startswith(signature):
            return mimetype
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _content_type(path: Path) -> str | None:
    """The stored file's type from its first bytes; None if the file is missing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, 16, 0)
    finally:
        os.close(fd)
    return _sniff(head, path.name)


async def get_image(request: web.Request) -> web.StreamResponse:
    index, cfg = request.app[INDEX_KEY], request.app[CONFIG_KEY]
    shard, name = request.match_info["shard"], request.match_info["name"]
    if (
        not index.has_shard(shard)
        or not name
        or name.startswith(".")
        or _BAD_NAME.search(name)
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        return _error(404, "not_found", "no such image")
    headers = {"Cache-Control": f"private, max-age={cfg.dataset.image_max_age_s}"}
    path = index.output.path(f"{shard}/{name}")
    if path is None:
        return await _bucket_image(request, index.output, f"{shard}/{name}", headers)
    mimetype = _content_type(path)
    if mimetype is None:
        return _error(404, "not_found", "no such image")
    return web.FileResponse(path, headers={**headers, "Content-Type": mimetype})


async def _bucket_image(
    request: web.Request, tree: Tree, name: str, headers: dict[str, str]
) -> web.StreamResponse:
    """An image from the bucket, through this server: the bucket stays private (its address
    and credentials never reach a client), a revoked token stops access at once, and ETag,
    If-None-Match and single byte ranges work as for a local file."""
    try:
        body, tag = await asyncio.to_thread(tree.read_tagged, name)
    except FileNotFoundError:
        return _error(404, "not_found", "no such image")
    headers = {**headers, "ETag": tag, "Accept-Ranges": "bytes"}
    wanted = request.headers.get("If-None-Match", "")
    if tag in (t.strip() for t in wanted.split(",")):
        return web.Response(status=304, headers=headers)
    size = len(body)
    headers["Content-Type"] = _sniff(body[:16], name)
    try:
        part = request.http_range
    except ValueError:  # a malformed or multiple range: the whole image (RFC 9110 14.2)
        part = slice(None, None)
    if part.start is None and part.stop is None:
        return web.Response(body=body, headers=headers)
    start, stop, _ = part.indices(size)
    if (part.start is not None and part.start >= size) or start >= stop:
        return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return web.Response(status=206, body=body[start:stop], headers=headers)


async def get_openapi(request: web.Request) -> web.Response:
    return _json(openapi.document(request.app[CONFIG_KEY].dataset.max_limit))


async def _refresh_loop(app: web.Application) -> None:
    index, cfg = app[INDEX_KEY], app[CONFIG_KEY]
    while True:
        await asyncio.sleep(cfg.dataset.refresh_s)
        try:
            found = await asyncio.to_thread(index.scan)
        except OSError as exc:
            log.warning("dataset: cannot look for new shards: %s", exc)
            continue
        if index.apply(found):
            log.info("dataset: %d shards indexed", len(index.shards))


def make_app(cfg: Config, tokens: TokenCheck) -> web.Application:
    index = DatasetIndex(open_tree(cfg.paths.output, cfg.storage))
    index.refresh()
    app = web.Application(middlewares=[_auth, _changing])
    app[INDEX_KEY] = index
    app[CONFIG_KEY] = cfg
    app[TOKENS_KEY] = tokens
    app.router.add_get("/datasets/mmc4", list_documents)
    app.router.add_get(IMAGE_ROUTE + "/{shard}/{name}", get_image)
    app.router.add_get("/datasets/mmc4/{id}", get_document)
    app.router.add_get("/openapi.json", get_openapi)

    async def refresher(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_refresh_loop(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(refresher)
    return app
