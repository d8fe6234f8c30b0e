"""Many lines at once: a chunk of a shard rewritten in one compiled call.

The per-line fast path (``assign.fastline``) spends most of its time on Python objects: the
matrix's numbers as floats in lists, then in an array, ``image_info`` as dicts, one compiled
call per document. Here a chunk of whole lines (a few MB) is handled as one byte buffer:

1. msgspec checks each line is valid JSON, an object with ``image_info``, ``text_list`` and
   ``similarity_matrix``, and reports the length of each of these values' text (``Raw``); a
   chunk that is not all ASCII has its other lines checked for UTF-8 here, since msgspec
   does not look inside the strings it skips;
2. one compiled call (``rewrite_chunk``) then, for each line, finds the three values
   (``assign.jsonscan``), reads the matrix's numbers (``assign.numparse``, rounded as
   ``float()`` does), counts the sentences, solves exactly as ``assign.fastline`` does (the
   lapjv port, whatever the size; one sentence needs no solving)
   and writes the line to an output buffer with each image's ``matched_text_index`` and
   ``matched_sim`` values replaced, every other byte as read. ``matched_sim`` is written as
   the text of the similarity it is, which reads back as the same float64 the reference
   writes.

A line this path cannot take whole (see ``jsonscan``, ``numparse``: integers in the matrix,
unusual keys, a missing field, 64 or more columns on a machine whose lapjv kernel is unknown...)
is marked and left to the caller, which hands it to the per-line paths, in order.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable, Iterator

import msgspec
import numpy as np
from numba import njit, types
from numpy.typing import NDArray

from assign.jsonscan import find_fields, image_fields, read_matrix, string_list_length
from assign.jv import KERNEL_CODE, MAX_DIM, compiled_assign
from assign.swar import copy_bytes, find_newline

CHUNK_BYTES = 1 << 22
# The fast path's range: magnitudes at or above this go the general way (see assign.fastline).
_LIMIT = float(2**63)
_IMAGE_INFO, _TEXT_LIST, _MATRIX = 0, 1, 2
FIELD_NAMES = np.frombuffer(b"image_infotext_listsimilarity_matrix", np.uint8)
FIELD_NAME_BOUNDS = np.array([0, 10, 19, 36], np.int64)
# Shortest text of an image_info entry holding both keys: {"matched_text_index":0,...}.
_MIN_ENTRY_BYTES = 32
_INDEX_DIGITS = 20
DECLINED = -1


# Chunks are read-only: a mapped file, or a buffer marked so (one compiled version for both).
_Bytes = types.Array(types.uint8, 1, "C", readonly=True)


class _Fields(msgspec.Struct, rename={"matrix": "similarity_matrix"}):
    image_info: msgspec.Raw
    text_list: msgspec.Raw
    matrix: msgspec.Raw


_DECODER = msgspec.json.Decoder(_Fields)
_DECODE, _DECODE_LINES = _DECODER.decode, _DECODER.decode_lines


def field_lengths(
    chunk: memoryview, lines: Callable[[], list[memoryview]], count: int, ascii_only: bool
) -> NDArray[np.int64]:
    """Per line of ``chunk`` (``count`` of them, sliced by ``lines()``), the text lengths of
    its ``image_info``, ``text_list``, ``similarity_matrix`` values; -1s for a line msgspec
    refuses, or that is not UTF-8.

    msgspec reads the chunk in one call when every line is valid. It reads whitespace-separated
    values, not lines, so one value per line is not certain even when the counts agree; it
    does not need to be. A string cannot hold a newline, so each line starts between tokens,
    and a line that ``rewrite_chunk`` takes (an object from its first byte to its last, whose
    three values it has read to exactly these lengths) is then one complete value of what
    msgspec checked: lengths paired with the wrong line can only make a line be declined.
    """
    try:
        fields = _DECODE_LINES(chunk)
    except (msgspec.DecodeError, RecursionError):
        fields = None
    if fields is not None and len(fields) == count:
        flat = [n for f in fields for n in (len(f.image_info), len(f.text_list), len(f.matrix))]
        lengths = np.array(flat, np.int64).reshape(count, 3)
        if not ascii_only:
            for k, line in enumerate(lines()):
                if not _is_utf8(line):
                    lengths[k] = DECLINED
        return lengths
    return _lengths_line_by_line(lines(), ascii_only)


def _lengths_line_by_line(lines: list[memoryview], ascii_only: bool) -> NDArray[np.int64]:
    flat: list[int] = []
    extend = flat.extend
    declined = (DECLINED, DECLINED, DECLINED)
    for line in lines:
        try:
            fields = _DECODE(line)
        except (msgspec.DecodeError, RecursionError):
            extend(declined)
            continue
        if not ascii_only and not _is_utf8(line):
            extend(declined)
            continue
        extend((len(fields.image_info), len(fields.text_list), len(fields.matrix)))
    return np.array(flat, np.int64).reshape(len(lines), 3)


def _is_utf8(line: memoryview) -> bool:  # (msgspec does not look inside skipped strings)
    try:
        str(line, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


@njit(cache=True, nogil=True, inline="always")
def _write_int(out: NDArray[np.uint8], at: int, value: int) -> int:
    digits = 1
    rest = value
    while rest >= 10:
        rest //= 10
        digits += 1
    for k in range(digits - 1, -1, -1):
        out[at + k] = 48 + value % 10
        value //= 10
    return at + digits


@njit(cache=True, nogil=True, inline="always")
def _copy(out: NDArray[np.uint8], at: int, buf: NDArray[np.uint8], start: int, stop: int) -> int:
    copy_bytes(out, at, buf, start, stop - start)
    return at + stop - start


@njit(cache=True, nogil=True)
def solve_matrix(sim: NDArray[np.float64], kernel: int) -> NDArray[np.int64]:
    """``assign.solve.assign``'s answer (lapjv's), or an empty array where it needs Python.

    The port up to 63 x 63; above, one sentence, else the port with this machine's lapjv
    kernel (``kernel``: 1 AVX2, 0 scalar, -1 unknown: Python decides).
    """
    n_images, n_sentences = sim.shape
    if max(n_images, n_sentences) <= MAX_DIM:
        return compiled_assign(sim, False)
    if n_sentences == 1:
        return np.zeros(n_images, np.int64)
    if kernel < 0:
        return np.empty(0, np.int64)
    return compiled_assign(sim, kernel == 1)


@njit(
    types.int64(
        _Bytes,
        types.int64[::1],
        types.int64[::1],
        types.int64[:, ::1],
        types.uint8[::1],
        types.int64[::1],
        types.int64[::1],
        types.int64,
    ),
    cache=True,
    nogil=True,
)
def rewrite_chunk(
    buf: NDArray[np.uint8],
    starts: NDArray[np.int64],
    stops: NDArray[np.int64],
    lengths: NDArray[np.int64],
    out: NDArray[np.uint8],
    out_stops: NDArray[np.int64],
    images: NDArray[np.int64],
    kernel: int,
) -> int:
    """Rewrite every line it can take into ``out``, one after another, each ending with a
    newline; ``out_stops[k]`` is where line k's output ends (where it would have, if
    declined), ``images[k]`` its number of images or ``DECLINED``. Returns bytes written."""
    most_numbers = 1
    most_images = 1
    for k in range(starts.size):
        most_numbers = max(most_numbers, lengths[k, _MATRIX] // 2 + 1)
        most_images = max(most_images, lengths[k, _IMAGE_INFO] // _MIN_ENTRY_BYTES + 1)
    values = np.empty(most_numbers, np.float64)
    token_start = np.empty(most_numbers, np.int64)
    token_stop = np.empty(most_numbers, np.int64)
    spans = np.empty((most_images, 4), np.int64)
    positions = np.empty(3, np.int64)
    at = 0
    for k in range(starts.size):
        images[k] = DECLINED
        out_stops[k] = at
        if lengths[k, _IMAGE_INFO] < 0:
            continue
        if not find_fields(
            buf, starts[k], stops[k], FIELD_NAMES, FIELD_NAME_BOUNDS, lengths[k], positions
        ):
            continue
        info = positions[_IMAGE_INFO]
        info_stop = info + lengths[k, _IMAGE_INFO]
        n = image_fields(buf, info, info_stop, spans)
        text = positions[_TEXT_LIST]
        m = string_list_length(buf, text, text + lengths[k, _TEXT_LIST])
        if n <= 0 or m <= 0:
            continue
        matrix = positions[_MATRIX]
        matrix_stop = matrix + lengths[k, _MATRIX]
        if not read_matrix(buf, matrix, matrix_stop, n, m, values, token_start, token_stop):
            continue
        within = True
        for v in values[: n * m]:
            if not abs(v) < _LIMIT:
                within = False
        if not within:
            continue
        assignment = solve_matrix(values[: n * m].reshape((n, m)), kernel)
        if assignment.size != n:
            continue
        # Room: the line, less the old values, plus the new ones and a newline.
        need = stops[k] - starts[k] + 1
        for e in range(n):
            chosen = e * m + assignment[e]
            need += _INDEX_DIGITS + token_stop[chosen] - token_start[chosen]
            need -= spans[e, 1] - spans[e, 0] + spans[e, 3] - spans[e, 2]
        if at + need > out.size:
            continue
        read = starts[k]
        for e in range(n):
            chosen = e * m + assignment[e]
            # The entry's two values, in the order they appear in its text.
            for which in (0, 2) if spans[e, 0] < spans[e, 2] else (2, 0):
                at = _copy(out, at, buf, read, spans[e, which])
                if which == 0:
                    at = _write_int(out, at, assignment[e])
                else:
                    at = _copy(out, at, buf, token_start[chosen], token_stop[chosen])
                read = spans[e, which + 1]
        at = _copy(out, at, buf, read, stops[k])
        out[at] = 10
        at += 1
        out_stops[k] = at
        images[k] = n
    return at


class ChunkReader:
    """A stream in chunks of whole lines: a plain file mapped into memory (read in place, no
    copy), any other stream read into one reused buffer (no fresh memory, no copies but the
    partial line carried over to the next chunk)."""

    def __init__(self, stream: io.BufferedIOBase, size: int = CHUNK_BYTES) -> None:
        self._stream = stream
        self._size = size
        self._buffer = bytearray()  # allocated when needed: a mapped file is read in place
        self._filled = 0  # bytes in the buffer; those after the last chunk's end are kept

    def chunks(self) -> Iterator[memoryview]:
        """Each chunk ends at a newline (the last one at the end of the stream, newline or
        not). A chunk is valid until the next one is asked for; every view of it must be
        released by then."""
        mapped = _mapped(self._stream)
        if mapped is not None:
            yield from _whole_lines(mapped, self._size)
            return
        if len(self._buffer) < self._size:
            self._buffer = bytearray(self._size)
        start = 0  # where the bytes not yet handed out begin
        while True:
            if start:
                rest = self._filled - start
                self._buffer[:rest] = self._buffer[start : self._filled]
                self._filled, start = rest, 0
            if self._filled == len(self._buffer):  # a line longer than a chunk
                bigger = bytearray(2 * len(self._buffer))
                bigger[: self._filled] = self._buffer
                self._buffer = bigger  # (the old one may still be viewed: not resized)
            with memoryview(self._buffer) as free:
                read = self._stream.readinto(free[self._filled :]) or 0
            self._filled += read
            cut = self._buffer.rfind(b"\n", 0, self._filled) + 1 if read else self._filled
            if cut:
                with memoryview(self._buffer) as chunk:
                    yield chunk[:cut]
                start = cut
            elif not read:
                return


# Mapped whole at once where the system can (Linux): no page fault per 4 KiB read later.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _mapped(stream: io.BufferedIOBase) -> mmap.mmap | None:
    """A plain file from its start, mapped read-only; None for anything else. (Not closed
    here: it is unmapped when the last view of it goes.)"""
    if not isinstance(stream, io.BufferedReader):
        return None
    try:
        if stream.tell() != 0 or os.fstat(stream.fileno()).st_size == 0:
            return None
        return mmap.mmap(stream.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
    except (OSError, ValueError):  # not a regular file, or not mappable
        return None


def _whole_lines(mapped: mmap.mmap, size: int) -> Iterator[memoryview]:
    view = memoryview(mapped)
    start, end = 0, len(mapped)
    while start < end:
        stop = start + size
        if stop >= end:
            cut = end
        else:
            cut = mapped.rfind(b"\n", start, stop) + 1
            if cut == 0:  # a line longer than a chunk
                found = mapped.find(b"\n", stop)
                cut = end if found < 0 else found + 1
        yield view[start:cut]
        start = cut


@njit(types.int64[::1](_Bytes), cache=True, nogil=True)
def line_stops(buf: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Where each line of ``buf`` ends (its newline, or the end of ``buf``)."""
    stops = np.empty(buf.size // 256 + 16, np.int64)
    count = 0
    i = 0
    while i < buf.size:
        i = find_newline(buf, i, buf.size)
        if count == stops.size:
            stops = np.concatenate((stops, np.empty(stops.size, np.int64)))
        stops[count] = i  # a newline, or the end of a last line without one
        count += 1
        i += 1
    return stops[:count].copy()


@njit(types.boolean(_Bytes), cache=True, nogil=True)
def _all_ascii(buf: NDArray[np.uint8]) -> bool:
    bits = 0
    for c in buf:
        bits |= c
    return bits < 128


class ChunkRewriter:
    """Rewrites chunks of whole lines; reuses its output buffer from chunk to chunk."""

    def __init__(self) -> None:
        self._out = np.empty(0, np.uint8)

    def rewrite(
        self,
        chunk: memoryview,
        write: Callable[[memoryview], object],
        other: Callable[[bytes], None],
    ) -> tuple[int, int, int]:
        """Write ``chunk``'s lines rewritten, in order: those this path takes with ``write``,
        the others (as bytes, without their newline) through ``other``. Returns (lines, lines
        rewritten here, their images)."""
        buf = np.frombuffer(chunk, np.uint8)
        buf.flags.writeable = False
        stops = line_stops(buf)
        starts = np.empty_like(stops)
        starts[0:1] = 0
        starts[1:] = stops[:-1] + 1
        sliced: list[memoryview] = []

        def lines() -> list[memoryview]:
            if not sliced:
                bounds = zip(starts.tolist(), stops.tolist(), strict=True)
                sliced.extend(chunk[a:b] for a, b in bounds)
            return sliced

        count = len(stops)
        lengths = field_lengths(chunk, lines, count, _all_ascii(buf))
        capacity = 2 * len(chunk) + 4096
        if self._out.size < capacity:
            self._out = np.empty(capacity, np.uint8)
        out_stops = np.empty(count, np.int64)
        images = np.empty(count, np.int64)
        written = rewrite_chunk(
            buf, starts, stops, lengths, self._out, out_stops, images, KERNEL_CODE
        )
        view = memoryview(self._out.data)
        done = 0
        for k in np.flatnonzero(images < 0).tolist():
            if out_stops[k] > done:
                write(view[done : out_stops[k]])
                done = int(out_stops[k])
            other(bytes(chunk[starts[k] : stops[k]]))
        if written > done:
            write(view[done:written])
        taken = images[images >= 0]
        return count, int(taken.size), int(taken.sum())
