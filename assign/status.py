"""The crawler's per-shard status report: which images it stored, and where.

The report is a gzip jsonl file, one record per image, with at least ``image_name``, ``status``
("ok" means stored), ``path`` (relative to the crawler's output directory), ``mimetype``,
``bytes``, ``width`` and ``height``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

STORED = "ok"


@dataclass(frozen=True)
class StoredImage:
    local_path: str
    mimetype: Any
    bytes: Any
    width: Any
    height: Any

    def fields(self) -> dict[str, Any]:
        """The keys added to the image's ``image_info`` entry, in this order."""
        return {
            "local_path": self.local_path,
            "mimetype": self.mimetype,
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
        }


def load_stored_images(report: str | Path, images_dir: str | Path | None) -> dict[str, StoredImage]:
    """image_name -> stored image, for every record with status "ok" and a path, of the
    report file ``report`` (see ``stored_images``)."""
    with gzip.open(report, "rb") as lines:
        return _collect(lines, images_dir)


def stored_images(text: bytes, images_dir: str | Path | None) -> dict[str, StoredImage]:
    """image_name -> stored image, for every record with status "ok" and a path, of a
    report's (decompressed) ``text``.

    ``local_path`` is ``images_dir/path`` when ``images_dir`` is given (a directory or an
    s3:// URL), else ``path`` as recorded (relative to the crawler's output directory). Lines
    that are not JSON objects are skipped: an image without a readable record counts as not
    stored.
    """
    return _collect(text.splitlines(), images_dir)


def _collect(lines: Iterable[bytes], images_dir: str | Path | None) -> dict[str, StoredImage]:
    stored: dict[str, StoredImage] = {}
    for line in lines:
        image = _stored_image(line, images_dir)
        if image is not None:
            stored[image[0]] = image[1]
    return stored


def _stored_image(line: bytes, images_dir: str | Path | None) -> tuple[str, StoredImage] | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("status") != STORED:
        return None
    name, path = record.get("image_name"), record.get("path")
    if not isinstance(name, str) or not isinstance(path, str) or not path:
        return None
    local = os.path.join(images_dir, path) if images_dir is not None else path
    image = StoredImage(
        local_path=str(local),
        mimetype=record.get("mimetype"),
        bytes=record.get("bytes"),
        width=record.get("width"),
        height=record.get("height"),
    )
    return name, image
