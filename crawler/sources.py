"""Which shards a crawl ingests: brace patterns, directories and URLs expanded into shard
sources, the corpus's known gaps, and local shards that do not exist."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from core.shardfiles import SHARD_SUFFIXES, is_remote, shard_id

# The MMC4 shard numbers that never existed (the corpus README's "missing shards"). A brace
# pattern that names one of these skips it as a known gap, not as a missing shard.
KNOWN_GAPS = frozenset(
    {3218, 3267, 5064, 5146, 7119, 8991, 9750, 11899, 15127, 15252, 16996, 17369, 17499, 17818}
)
_SHARD_NUMBER = re.compile(r"(?:^|_)shard_(\d+)(?:_v\d+)?$")


@dataclass(frozen=True)
class ShardSource:
    location: str  # local path or http(s) URL, as given
    shard: str  # shard id: the file name without its .jsonl[.gz|.zip] suffix
    known_gap: bool = False  # named by a brace pattern, and one of the corpus's KNOWN_GAPS

    @property
    def remote(self) -> bool:
        return is_remote(self.location)


def shard_number(shard: str) -> int | None:
    """N of an MMC4 shard id (``docs_shard_N_v2``, ``docs_no_face_shard_N_v3``), or None."""
    m = _SHARD_NUMBER.search(shard)
    return int(m.group(1)) if m else None


def expand_sources(patterns: list[str]) -> list[ShardSource]:
    """Expand brace patterns and directories into shard sources, in the order given."""
    out: list[ShardSource] = []
    seen: set[str] = set()
    for pattern in patterns:
        if not is_remote(pattern) and os.path.exists(pattern):
            expanded = [pattern]  # a path that exists is taken as written (braces, backslashes)
        else:
            try:
                expanded = list(braceexpand.braceexpand(pattern))
            except ValueError:  # braceexpand.UnbalancedBracesError (not in its type stubs)
                expanded = [pattern]  # not a pattern: a name with a brace in it
        from_braces = expanded != [pattern]
        for loc in expanded:
            locs = [loc]
            if not is_remote(loc) and os.path.isdir(loc):
                locs = sorted(
                    str(p) for p in Path(loc).iterdir() if p.name.endswith(SHARD_SUFFIXES)
                )
            for one in locs:
                if not is_remote(one):
                    one = os.path.abspath(one)  # workers and the assigner may run elsewhere
                if one not in seen:
                    seen.add(one)
                    shard = shard_id(one)
                    gap = from_braces and shard_number(shard) in KNOWN_GAPS
                    out.append(ShardSource(one, shard, known_gap=gap))
    return out


def missing_local(sources: list[ShardSource]) -> list[ShardSource]:
    """Local shards that do not exist, known gaps aside: a mistyped path, said up front."""
    return [
        s for s in sources if not s.remote and not s.known_gap and not os.path.isfile(s.location)
    ]


def missing_message(sources: list[ShardSource]) -> str | None:
    """The one-line error for local shards that do not exist (`missing_local`), or None."""
    missing = missing_local(sources)
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"no such shard file: {missing[0].location}{more}"
