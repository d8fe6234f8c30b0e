"""What a response says: its headers (Retry-After, X-Robots-Tag opt-outs) and its body, read
within the size cap and the worker's body budget."""

from __future__ import annotations

import email.utils
import time

import aiohttp
from aiohttp.http_exceptions import DecompressSizeError

from core.budget import BodyBudget
from core.deadlines import Progress


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


def opted_out(values: list[str], agents: list[str]) -> bool:
    """Whether X-Robots-Tag values carry noai/noimageai for everyone or for one of agents."""
    wanted = {"noai", "noimageai"}
    names = {a.lower() for a in agents}
    for value in values:
        agent = ""
        for part in value.split(","):
            token = part.strip().lower()
            if ":" in token:
                head, _, rest = token.partition(":")
                head = head.strip()
                if head not in wanted and head not in _VALUED_DIRECTIVES:
                    agent, token = head, rest.strip()
            if token in wanted and (not agent or agent in names):
                return True
    return False


async def read_capped(
    resp: aiohttp.ClientResponse, cap: int, progress: Progress, budget: BodyBudget | None
) -> bytes | None:
    """The body, or None when it is (or inflates to) more than `cap` bytes. With a `budget`,
    the bytes are taken from it as they arrive; on success they stay taken (the caller gives
    them back when done with the body)."""
    chunks: list[bytes] = []
    size = taken = 0
    reader = budget.start_read() if budget is not None else 0
    done = False
    try:
        async for chunk in resp.content.iter_any():  # what has arrived, not cut into pieces
            size += len(chunk)
            progress.body_bytes = size
            if size > cap:
                resp.close()
                return None
            chunks.append(chunk)
            if budget is not None:
                taken += len(chunk)
                budget.take(len(chunk))
                if budget.must_wait(reader):
                    with progress.paused():
                        await budget.wait_turn(reader)
        done = True
        return b"".join(chunks)
    except aiohttp.ClientPayloadError as exc:
        if not _inflated_too_far(exc):
            raise
        resp.close()
        return None
    finally:
        if budget is not None:
            budget.end_read(reader, taken)
            if not done:
                budget.give_back(taken)


def _inflated_too_far(exc: BaseException) -> bool:
    """Whether aiohttp stopped a compressed body that inflates past its decompression limit."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, DecompressSizeError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
