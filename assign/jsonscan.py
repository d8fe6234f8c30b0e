"""Compiled readers of JSON text that is already known to be valid.

``assign.batch`` has each line checked by msgspec first (valid UTF-8 aside, which it checks
itself), so these functions need not validate JSON: they find where things are. Each returns
-1 (or a negative count) for anything outside the narrow shapes the batch path takes, and the
line then goes the per-line way. Positions are indices into one byte buffer holding many lines.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

from assign.numparse import parse_number
from assign.swar import find_number_end, find_quote_or_backslash

Bytes = NDArray[np.uint8]
_QUOTE, _BACKSLASH, _COMMA, _COLON = 34, 92, 44, 58
_OPEN_LIST, _CLOSE_LIST, _OPEN_OBJECT, _CLOSE_OBJECT = 91, 93, 123, 125


@njit(cache=True, nogil=True, inline="always")
def skip_space(buf: Bytes, i: int, end: int) -> int:
    while i < end and (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
        i += 1
    return i


@njit(cache=True, nogil=True)
def string_end(buf: Bytes, i: int, end: int) -> int:
    """Index after the string opening at ``buf[i]`` (a quote), or -1 if it does not close."""
    i += 1
    while True:
        i = find_quote_or_backslash(buf, i, end)
        if i >= end:
            return -1
        if buf[i] == _QUOTE:
            return i + 1
        i += 2  # an escape: the next byte is part of it


@njit(cache=True, nogil=True)
def value_end(buf: Bytes, i: int, end: int) -> int:
    """Index after the JSON value starting at ``buf[i]`` (or -1 if it runs past ``end``)."""
    c = buf[i]
    if c == _QUOTE:
        return string_end(buf, i, end)
    if c != _OPEN_LIST and c != _OPEN_OBJECT:  # number or literal: up to a delimiter
        while i < end:
            c = buf[i]
            if c in (_COMMA, _CLOSE_LIST, _CLOSE_OBJECT) or c <= 32:
                return i
            i += 1
        return i
    depth = 0
    while i < end:
        c = buf[i]
        if c == _QUOTE:
            i = string_end(buf, i, end)
            if i < 0:
                return -1
            continue
        if c in (_OPEN_LIST, _OPEN_OBJECT):
            depth += 1
        elif c in (_CLOSE_LIST, _CLOSE_OBJECT):
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


@njit(cache=True, nogil=True)
def key_is(buf: Bytes, start: int, stop: int, name: Bytes) -> bool:
    """Whether the key text ``buf[start:stop]`` (between its quotes) is ``name``."""
    if stop - start != name.size:
        return False
    k = 0
    while k < name.size and buf[start + k] == name[k]:
        k += 1
    return k == name.size


@njit(cache=True, nogil=True)
def plain_string_end(buf: Bytes, i: int, end: int) -> int:
    """``string_end`` for a string without escapes; -1 if it has one (or does not close)."""
    i = find_quote_or_backslash(buf, i + 1, end)
    return i + 1 if i < end and buf[i] == _QUOTE else -1


@njit(cache=True, nogil=True)
def string_list_length(buf: Bytes, i: int, end: int) -> int:
    """Number of items of the list at ``buf[i:end]`` if it is a non-empty list of strings
    that closes exactly at ``end``, else -1."""
    if buf[i] != _OPEN_LIST:
        return -1
    i = skip_space(buf, i + 1, end)
    count = 0
    while i < end:
        if buf[i] != _QUOTE:
            return -1
        i = string_end(buf, i, end)
        if i < 0:
            return -1
        count += 1
        i = skip_space(buf, i, end)
        if i < end and buf[i] == _CLOSE_LIST:
            return count if i + 1 == end else -1
        if i >= end or buf[i] != _COMMA:
            return -1
        i = skip_space(buf, i + 1, end)
    return -1


@njit(cache=True, nogil=True)
def read_matrix(
    buf: Bytes,
    i: int,
    end: int,
    rows: int,
    cols: int,
    values: NDArray[np.float64],
    token_start: NDArray[np.int64],
    token_end: NDArray[np.int64],
) -> bool:
    """Read the list of ``rows`` lists of ``cols`` numbers at ``buf[i:end]``, closing exactly
    at ``end``, into ``values`` (row-major), with the text span of each number; False if it
    is anything else, or if a number is one ``parse_number`` declines."""
    if buf[i] != _OPEN_LIST:
        return False
    i = skip_space(buf, i + 1, end)
    k = 0
    for r in range(rows):
        if r and i < end and buf[i] == _COMMA:
            i = skip_space(buf, i + 1, end)
        elif r:
            return False
        if i >= end or buf[i] != _OPEN_LIST:
            return False
        i = skip_space(buf, i + 1, end)
        for c in range(cols):
            if c:
                if i >= end or buf[i] != _COMMA:
                    return False
                i = skip_space(buf, i + 1, end)
            # The number's end first (a quick scan), then its value: the next number's scan
            # need not wait for this one's arithmetic.
            after = find_number_end(buf, i, end)
            value, parsed_to, ok = parse_number(buf, i, after)
            if not ok or parsed_to != after:
                return False
            values[k] = value
            token_start[k] = i
            token_end[k] = after
            k += 1
            i = skip_space(buf, after, end)
        if i >= end or buf[i] != _CLOSE_LIST:
            return False
        i = skip_space(buf, i + 1, end)
    return i + 1 == end and buf[i] == _CLOSE_LIST


@njit(cache=True, nogil=True)
def find_fields(
    buf: Bytes,
    i: int,
    end: int,
    names: Bytes,
    name_bounds: NDArray[np.int64],
    lengths: NDArray[np.int64],
    positions: NDArray[np.int64],
) -> bool:
    """Where the value of each named top-level field of the object at ``buf[i:end]`` starts.

    Field ``f`` is named ``names[name_bounds[f]:name_bounds[f + 1]]`` and its value is
    ``lengths[f]`` bytes long (as msgspec found it): the walk steps over it without reading
    it. False unless every field occurs exactly once and no key holds a backslash (an
    escaped key could spell a field's name). The caller must check that each value, read
    from its position, is exactly ``lengths[f]`` long: that is what makes the steps exact.
    """
    positions[:] = -1
    i = skip_space(buf, i, end)
    if i >= end or buf[i] != _OPEN_OBJECT:
        return False
    i = skip_space(buf, i + 1, end)
    while i < end:
        if buf[i] != _QUOTE:
            return False
        key_stop = plain_string_end(buf, i, end)
        if key_stop < 0:
            return False
        field = -1
        for f in range(lengths.size):
            if key_is(buf, i + 1, key_stop - 1, names[name_bounds[f] : name_bounds[f + 1]]):
                field = f
        i = skip_space(buf, key_stop, end)
        if i >= end or buf[i] != _COLON:
            return False
        i = skip_space(buf, i + 1, end)
        if i >= end:
            return False
        if field >= 0:
            if positions[field] >= 0:
                return False
            positions[field] = i
            i += lengths[field]
        else:
            i = value_end(buf, i, end)
            if i < 0:
                return False
        i = skip_space(buf, i, end)
        if i < end and buf[i] == _CLOSE_OBJECT:
            return skip_space(buf, i + 1, end) == end and positions.min() >= 0
        if i >= end or buf[i] != _COMMA:
            return False
        i = skip_space(buf, i + 1, end)
    return False


_MATCHED_TEXT_INDEX = np.frombuffer(b"matched_text_index", np.uint8)
_MATCHED_SIM = np.frombuffer(b"matched_sim", np.uint8)


@njit(cache=True, nogil=True)
def image_fields(buf: Bytes, i: int, stop: int, spans: NDArray[np.int64]) -> int:
    """Number of entries of ``image_info`` at ``buf[i:stop]`` (exactly: the list must close at
    ``stop``), with ``spans[e] = (start, stop)`` of entry e's ``matched_text_index`` value,
    then of its ``matched_sim`` value; -1 unless it is a non-empty list of objects that each
    have both keys exactly once, no key holding a backslash, and fit in ``spans``."""
    if buf[i] != _OPEN_LIST:
        return -1
    i = skip_space(buf, i + 1, stop)
    n = 0
    while i < stop:
        if buf[i] != _OPEN_OBJECT or n >= spans.shape[0]:
            return -1
        spans[n, :] = -1
        i = skip_space(buf, i + 1, stop)
        while True:
            if i >= stop or buf[i] != _QUOTE:
                return -1
            key_stop = plain_string_end(buf, i, stop)
            if key_stop < 0:
                return -1
            which = -1
            if key_is(buf, i + 1, key_stop - 1, _MATCHED_TEXT_INDEX):
                which = 0
            elif key_is(buf, i + 1, key_stop - 1, _MATCHED_SIM):
                which = 2
            i = skip_space(buf, key_stop, stop)
            if i >= stop or buf[i] != _COLON:
                return -1
            i = skip_space(buf, i + 1, stop)
            if i >= stop:
                return -1
            after = value_end(buf, i, stop)
            if after < 0:
                return -1
            if which >= 0:
                if spans[n, which] >= 0:
                    return -1
                spans[n, which] = i
                spans[n, which + 1] = after
            i = skip_space(buf, after, stop)
            if i < stop and buf[i] == _CLOSE_OBJECT:
                break
            if i >= stop or buf[i] != _COMMA:
                return -1
            i = skip_space(buf, i + 1, stop)
        if spans[n, 0] < 0 or spans[n, 2] < 0:
            return -1
        n += 1
        i = skip_space(buf, i + 1, stop)
        if i < stop and buf[i] == _CLOSE_LIST:
            return n if i + 1 == stop else -1
        if i >= stop or buf[i] != _COMMA:
            return -1
        i = skip_space(buf, i + 1, stop)
    return -1
