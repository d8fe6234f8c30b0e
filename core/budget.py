"""What one worker's requests may hold at once: connections (`Slots`) and bytes of response
bodies (`BodyBudget`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib


class Slots:
    """A FIFO counting semaphore whose acquire and release are O(1).

    (asyncio.Semaphore in Python 3.11 scans every waiter on each acquire while slots are
    free: with a worker's window of requests queued for its connections, that scan was ~5 %
    of the event loop's time.) A slot is handed straight to the first waiter on release.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class BodyBudget:
    """Bytes of response bodies one worker holds: being read, or read and waiting for their
    image work (the worker gives them back when that is done).

    A new request waits while the budget is spent (`room`). A body being read takes its bytes
    as they arrive (`take`); past the limit, a read waits for room (image work gives bodies
    back), except when reads in progress alone overspend it: then the oldest read goes on, so
    reads never all wait for each other. Time a read waits here does not count against its
    deadline. Held at most: `limit`, plus one body of up to
    max_body_bytes, plus what each waiting read had received (aiohttp pauses a connection
    once ~512 KiB are buffered).
    """

    __slots__ = ("_next", "_readers", "_room", "_turn", "limit", "peak", "reading", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # bytes held: being read, or read and not given back
        self.reading = 0  # of which: of reads in progress
        self.peak = 0
        self._readers: dict[int, None] = {}  # reads in progress, oldest first
        self._next = 0
        # Two kinds of waiters, woken apart: new requests (up to a worker's window of them)
        # only when the budget has room, a read only when its turn may have come. Waking
        # every waiter on every change costs O(window) per image.
        self._room = _Waiters()
        self._turn: dict[int, asyncio.Future[None]] = {}  # waiting reads, by reader

    async def room(self) -> None:
        """Wait until the budget is not spent."""
        while self.used > self.limit:
            await self._room.wait()

    def start_read(self) -> int:
        self._next += 1
        self._readers[self._next] = None
        return self._next

    def end_read(self, reader: int, taken: int) -> None:
        """`reader` is done; the `taken` bytes it holds stay counted until given back."""
        oldest = next(iter(self._readers), None)
        self._readers.pop(reader, None)
        self.reading -= taken
        if reader == oldest:
            self._wake_turns()  # another read is the oldest now

    def take(self, n: int) -> None:
        """Count `n` bytes that arrived for a read in progress."""
        self.used += n
        self.reading += n
        self.peak = max(self.peak, self.used)

    def must_wait(self, reader: int) -> bool:
        """Whether `reader` must wait before reading on (see the class docstring)."""
        return self.used > self.limit and not (
            self.used - self.reading <= self.limit and next(iter(self._readers)) == reader
        )

    async def wait_turn(self, reader: int) -> None:
        while self.must_wait(reader):
            fut = asyncio.get_running_loop().create_future()
            self._turn[reader] = fut
            try:
                await fut
            finally:
                self._turn.pop(reader, None)

    def give_back(self, n: int) -> None:
        self.used -= n
        self._wake_turns()
        if self.used <= self.limit:
            self._room.wake()

    def _wake_turns(self) -> None:
        """Wake the reads that may go on: all of them when the budget has room, else only
        the oldest read, when what the others hold alone keeps within the budget."""
        if not self._turn:
            return
        if self.used <= self.limit:
            waking = list(self._turn.values())
        elif self.used - self.reading <= self.limit:
            oldest = self._turn.get(next(iter(self._readers), -1))
            waking = [oldest] if oldest is not None else []
        else:
            return
        for fut in waking:
            if not fut.done():
                fut.set_result(None)


class _Waiters:
    """Coroutines waiting for one kind of change; `wake` lets them all re-check."""

    __slots__ = ("_event", "count")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.count = 0

    async def wait(self) -> None:
        event = self._event
        self.count += 1
        try:
            await event.wait()
        finally:
            self.count -= 1

    def wake(self) -> None:
        if self.count:
            self._event.set()
            self._event = asyncio.Event()
