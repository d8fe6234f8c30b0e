"""The image processes' C heap keeps freed memory for the next image (crawler.heap)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crawler.heap import keep_freed_memory

# Allocates and frees 64 blocks of 1 MiB per round (each written once, as a decoded image
# is) and prints the page faults of rounds 2..4: what a process pays again for memory it
# had already used.
_ROUNDS = """
import json, resource, sys
from crawler.heap import keep_freed_memory
took = keep_freed_memory(int(sys.argv[1]))
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [b"x" * (1 << 20) for _ in range(64)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults[1:]}))
"""


def _rounds(keep_mb: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, str(keep_mb)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_reused_without_page_faults() -> None:
    default = _rounds(0)
    kept = _rounds(256)
    assert default["took"] is False and kept["took"] is True
    # 64 MiB written per round is ~16,000 pages: the defaults fault most of them in again
    # each round, a heap that keeps its freed memory almost none.
    assert min(default["faults"]) > 8000  # type: ignore[call-overload]
    assert max(kept["faults"]) < 1000  # type: ignore[call-overload]


def test_zero_or_negative_leaves_the_defaults() -> None:
    assert keep_freed_memory(0) is False
    assert keep_freed_memory(-5) is False
