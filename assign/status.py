"""The crawler's per-shard status report, as the rewrite reads it: which images it stored
(records with status ok and a path, ``core.status.Record``), and where.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.status import OK, records_of


@dataclass(frozen=True)
class StoredImage:
    local_path: str
    mimetype: str
    bytes: int
    width: int
    height: int

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
    """image_name -> stored image, for every record with status OK and a path, of the
    report file ``report`` (see ``stored_images``)."""
    with gzip.open(report, "rb") as lines:
        return _collect(lines, images_dir)


def stored_images(text: bytes, images_dir: str | Path | None) -> dict[str, StoredImage]:
    """image_name -> stored image, for every record with status OK and a path, of a
    report's (decompressed) ``text``.

    ``local_path`` is ``images_dir/path`` when ``images_dir`` is given (a directory or an
    s3:// URL), else ``path`` as recorded (relative to the crawler's output directory). Lines
    that are not records are skipped: an image without a readable record counts as not
    stored.
    """
    return _collect(text.splitlines(), images_dir)


def _collect(lines: Iterable[bytes], images_dir: str | Path | None) -> dict[str, StoredImage]:
    stored: dict[str, StoredImage] = {}
    for record in records_of(lines):
        if record.status != OK or not record.path:
            continue
        local = os.path.join(images_dir, record.path) if images_dir is not None else record.path
        stored[record.image_name] = StoredImage(
            local_path=str(local),
            mimetype=record.mimetype,
            bytes=record.bytes,
            width=record.width,
            height=record.height,
        )
    return stored
