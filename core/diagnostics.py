"""Where a stuck process is waiting: the await chain of every asyncio task, as text.

`Task.print_stack` shows only the outermost frame of a suspended coroutine; the frame that
actually waits (a Redis read, a lock, a future) is at the end of the `cr_await` chain.
"""

from __future__ import annotations

import asyncio
from typing import Any


def await_chain(coro: Any) -> list[str]:
    """'file:line in function' for each coroutine or generator frame, outermost first."""
    out: list[str] = []
    seen = 0
    while coro is not None and seen < 64:
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            out.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        nxt = getattr(coro, "cr_await", None)
        if nxt is None:
            nxt = getattr(coro, "gi_yieldfrom", None)
        if nxt is None and frame is None and not out:
            out.append(repr(coro))
        coro = nxt
    return out


def task_stacks(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """Every pending task of `loop` (default: the running one) with its await chain."""
    tasks = asyncio.all_tasks(loop)
    parts = []
    for task in list(tasks):
        lines = [f"task {task.get_name()}:"]
        lines += [f"    {where}" for where in await_chain(task.get_coro())]
        parts.append("\n".join(lines))
    return "\n".join(parts)
