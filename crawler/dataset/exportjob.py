"""What an export is asked for (`ExportSettings`: layout, document filter, tar sizes) and what
it reports (`ShardResult` per shard, `ExportSummary` of them all)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from assign.lookup import Filter

LAYOUTS = ("base64", "members")


@dataclass(frozen=True)
class ExportSettings:
    out: str
    layout: str = "base64"
    min_stored: int = 1
    all_stored: bool = False
    min_images: int = 0
    skip_url_duplicates: bool = False
    max_docs: int = 1000
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.max_docs < 1 or self.max_bytes < 1:
            raise ValueError("max_docs and max_bytes must be at least 1")

    @property
    def filter(self) -> Filter:
        return Filter(
            min_images=self.min_images,
            min_stored=self.min_stored,
            all_stored=self.all_stored,
            skip_url_duplicates=self.skip_url_duplicates,
        )

    def describe(self) -> dict[str, Any]:
        """What makes two exports of a shard the same (the output directory does not)."""
        out = asdict(self)
        del out["out"]
        return out


@dataclass
class ShardResult:
    shard: str
    docs: int = 0
    images: int = 0
    bytes: int = 0
    tars: int = 0
    missing_files: int = 0  # recorded as stored, not on disk: left out
    skipped: bool = False  # finished by an earlier run
    errors: list[str] = field(default_factory=list)


@dataclass
class ExportSummary:
    shards: int = 0
    skipped_shards: int = 0
    failed_shards: int = 0
    docs: int = 0
    images: int = 0
    bytes: int = 0
    tars: int = 0
    missing_files: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, r: ShardResult) -> None:
        self.shards += 1
        self.skipped_shards += r.skipped
        self.failed_shards += bool(r.errors)
        self.docs += r.docs
        self.images += r.images
        self.bytes += r.bytes
        self.tars += r.tars
        self.missing_files += r.missing_files
        self.errors += r.errors
