"""Summarize a ``py-spy record --format raw`` (collapsed stacks) file as text.

Usage: .venv/bin/python bench/_profile.py PROFILE.txt [--top 25]

Stacks are grouped by process (``--subprocesses`` puts a ``process <pid>:"<cmdline>"`` frame
first): the crawl worker's event-loop process and the image pool processes are reported
separately, each with its top functions by self time and by inclusive time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_PROCESS = re.compile(r'^(process \d+:".*?")(?:;|$)')
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('fn')} ({file})"


def _role(first: str) -> str:
    if "multiprocessing" in first or "forkserver" in first:
        return "image pool"
    if "crawler" in first and "worker" in first:
        return "worker (event loop)"
    return "process"


def summarize(path: Path, top: int = 25) -> str:
    self_t: dict[str, Counter[str]] = defaultdict(Counter)
    incl_t: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        stack = m.group(1)
        count = int(m.group(2))
        role = "process"
        # --subprocesses nests a frame per process (parent first); the cmdline may itself
        # hold ';' (python -c "a; b"). The innermost process names the role.
        while head := _PROCESS.match(stack):
            role = _role(head.group(1))
            stack = stack[head.end() :]
        frames = stack.split(";")
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        totals[role] += count
        names = [_name(f) for f in frames]
        self_t[role][names[-1]] += count
        for n in set(names):
            incl_t[role][n] += count
    out = [f"py-spy profile {path} (samples per process role)"]
    for role, total in totals.most_common():
        out.append(f"\n== {role}: {total} samples ==")
        out.append("  top by self time:")
        for n, c in self_t[role].most_common(top):
            out.append(f"    {100 * c / total:5.1f}%  {n}")
        out.append("  top by inclusive time:")
        for n, c in incl_t[role].most_common(top):
            out.append(f"    {100 * c / total:5.1f}%  {n}")
    return "\n".join(out)


if __name__ == "__main__":
    top = 25
    if "--top" in sys.argv:
        top = int(sys.argv[sys.argv.index("--top") + 1])
    print(summarize(Path(sys.argv[1]), top))
