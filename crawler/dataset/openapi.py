"""The OpenAPI 3.1 description of the dataset API (served at ``/openapi.json``)."""

from __future__ import annotations

import copy
from typing import Any

_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}
_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*:[0-9]{1,10}$"
_SHARD_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_IMAGE: dict[str, Any] = {
    "type": "object",
    "required": [
        "image_name",
        "raw_url",
        "url",
        "matched_text_index",
        "matched_sim",
        "status",
        "width",
        "height",
        "mimetype",
    ],
    "properties": {
        "image_name": _NULLABLE_STR,
        "raw_url": _NULLABLE_STR,
        "url": {**_NULLABLE_STR, "description": "The stored file on this server (a path)."},
        "matched_text_index": _NULLABLE_INT,
        "matched_sim": {"type": ["number", "null"]},
        "status": {"type": "string", "description": "The crawl's status; ok: stored."},
        "width": _NULLABLE_INT,
        "height": _NULLABLE_INT,
        "mimetype": _NULLABLE_STR,
    },
}


_DOCUMENT: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "shard",
        "line",
        "url",
        "text",
        "text_list",
        "could_have_url_duplicate",
        "images",
    ],
    "properties": {
        "id": {"type": "string", "description": "<shard>:<line>, stable across restarts."},
        "shard": {"type": "string"},
        "line": {"type": "integer", "minimum": 0},
        "url": {},
        "text": {"type": "string"},
        "text_list": {"type": "array", "items": {"type": "string"}},
        "could_have_url_duplicate": {"type": "boolean"},
        "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
    },
}


_PAGE: dict[str, Any] = {
    "type": "object",
    "required": ["documents", "total", "limit", "offset", "next"],
    "properties": {
        "documents": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}},
        "total": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1},
        "offset": {"type": "integer", "minimum": 0},
        "next": {**_NULLABLE_STR, "description": "Cursor (a document id) of the next page."},
    },
}


_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "parameter": {"type": "string"},
    },
}


_COUNT = {"type": "integer", "minimum": 0, "maximum": 0xFFFF}


_UNAUTHORIZED = _error("No token, or not a valid one (WWW-Authenticate: Bearer).")


_BUSY = _error("The shard is being re-indexed this moment (Retry-After).")


def _list_documents(max_limit: int) -> dict[str, Any]:
    return {
        "get": {
            "operationId": "listDocuments",
            "summary": "A page of documents, by offset or by cursor.",
            "parameters": [
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": max_limit, "default": 100},
                    "Documents per page.",
                ),
                _query("offset", {"type": "integer", "minimum": 0}, "Documents to skip."),
                _query(
                    "cursor",
                    {"type": "string", "pattern": _ID_PATTERN},
                    "Start at this document (`next` of a page); not with offset.",
                ),
                _query(
                    "shard",
                    {"type": "string", "pattern": _SHARD_PATTERN},
                    "Only this shard.",
                ),
                _query("min_images", _COUNT, "At least this many images."),
                _query("min_stored", _COUNT, "At least this many stored images."),
                _query("all_stored", {"type": "boolean"}, "Every image stored."),
            ],
            "responses": {
                "200": {
                    "description": "A page.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Page"}}
                    },
                },
                "400": _error("A parameter is not valid (named in `parameter`)."),
                "401": _UNAUTHORIZED,
                "503": _BUSY,
            },
        }
    }


_GET_DOCUMENT: dict[str, Any] = {
    "get": {
        "operationId": "getDocument",
        "summary": "One document by id.",
        "parameters": [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": {
                "description": "The document.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Document"}}
                },
            },
            "401": _UNAUTHORIZED,
            "404": _error("No such document."),
            "503": _BUSY,
        },
    }
}


_GET_IMAGE: dict[str, Any] = {
    "get": {
        "operationId": "getImage",
        "summary": "A stored image (ETag, If-None-Match, Range, Cache-Control).",
        "parameters": [
            {
                "name": "shard",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            },
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": {
                "description": "The image.",
                "content": {"image/*": {"schema": {}}},
            },
            "206": {"description": "Part of the image (Range)."},
            "304": {"description": "Not modified (If-None-Match)."},
            "401": _UNAUTHORIZED,
            "404": _error("No such image."),
            "416": {"description": "Range not satisfiable."},
        },
    }
}


def document(max_limit: int) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "mmc4-crawler dataset API",
                "version": "1",
                "description": "The crawled MMC4 corpus: documents with their stored images.",
            },
            "security": [{"bearer": []}],
            "paths": {
                "/datasets/mmc4": _list_documents(max_limit),
                "/datasets/mmc4/{id}": _GET_DOCUMENT,
                "/datasets/mmc4/images/{shard}/{name}": _GET_IMAGE,
            },
            "components": {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                "schemas": {"Page": _PAGE, "Document": _DOCUMENT, "Image": _IMAGE, "Error": _ERROR},
            },
        }
    )
