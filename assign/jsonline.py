"""Reading and writing one jsonl line, fast.

Most of the bytes and nearly half of the serialisation time of an MMC4 document are in its
``similarity_matrix``, which the plain reassignment never changes. So the matrix's original
text is cut out of the line before parsing and written back verbatim (``orjson.Fragment``)
instead of being re-formatted from floats. The cut is verified: the rest of the line must parse
with a sentinel in the top-level ``similarity_matrix`` slot, or the line is parsed whole.

Lines orjson refuses but Python's json accepts (NaN, lone surrogates) are parsed and written
with the standard library instead, so they are not mistaken for malformed JSON; so are lines
with 20 digits in a row, since orjson would turn an integer beyond 64 bits into a float.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

_MATRIX_OPENING = re.compile(rb'"similarity_matrix"\s*:\s*\[')
# "[]" or "[" rows "]" where rows are "[...]" separated by commas, no "]" inside a row.
_MATRIX_CLOSING = re.compile(rb"\[\s*\]|\[\s*(?:\[[^\]]*\]\s*,\s*)*\[[^\]]*\]\s*\]")
_SENTINEL = "\x00mmc4-assign:similarity_matrix"
# 20 digits in a row: possibly an integer beyond 64 bits (or digits in a string: harmless).
_LONG_DIGITS = re.compile(rb"[0-9]{20}")
_SENTINEL_JSON = orjson.dumps(_SENTINEL)


class MalformedLine(ValueError):
    """The line is not JSON."""


@dataclass
class ParsedLine:
    doc: Any
    # Original text of the top-level similarity_matrix, when it could be cut out cleanly.
    matrix_text: bytes | None = None
    # Parsed by the standard library (orjson refused it): write it back the same way.
    stdlib: bool = False


def parse_line(line: bytes) -> ParsedLine:
    """Parse one line (without its newline); raises MalformedLine."""
    # orjson reads integers beyond 64 bits as floats, silently: such lines go to json.
    if _LONG_DIGITS.search(line) is None:
        cut = _parse_with_matrix_cut(line)
        if cut is not None:
            return cut
        try:
            return ParsedLine(orjson.loads(line))
        except orjson.JSONDecodeError:
            pass
    try:
        return ParsedLine(json.loads(line), stdlib=True)
    except (ValueError, RecursionError):
        raise MalformedLine("not JSON") from None


def dump_line(parsed: ParsedLine, matrix_untouched: bool) -> bytes:
    """Serialise ``parsed.doc`` with a trailing newline, reusing the matrix text if unchanged."""
    doc = parsed.doc
    if parsed.stdlib:
        return _dump_stdlib(doc)
    text = parsed.matrix_text if matrix_untouched and isinstance(doc, dict) else None
    reuse = text is not None
    if text is not None:
        matrix = doc["similarity_matrix"]
        doc["similarity_matrix"] = orjson.Fragment(text)
    try:
        return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        pass  # e.g. an integer beyond 64 bits elsewhere in the document
    finally:
        if reuse:
            doc["similarity_matrix"] = matrix
    return _dump_stdlib(doc)


def _dump_stdlib(doc: Any) -> bytes:
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"


def _parse_with_matrix_cut(line: bytes) -> ParsedLine | None:
    span = _matrix_span(line)
    if span is None:
        return None
    start, end = span
    matrix_text = line[start:end]
    try:
        doc = orjson.loads(line[:start] + _SENTINEL_JSON + line[end:])
        matrix = orjson.loads(matrix_text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("similarity_matrix") != _SENTINEL:
        return None  # the key we found was not the top-level one
    doc["similarity_matrix"] = matrix
    return ParsedLine(doc, matrix_text=matrix_text)


def _matrix_span(line: bytes) -> tuple[int, int] | None:
    """Byte range of the list after the first ``"similarity_matrix":``, if it looks numeric."""
    opening = _MATRIX_OPENING.search(line)
    if opening is None:
        return None
    start = opening.end() - 1
    # A numeric matrix holds no strings and no deeper lists; the caller verifies the cut.
    closing = _MATRIX_CLOSING.match(line, start)
    if closing is None:
        return None
    end = closing.end()
    return (start, end) if line.find(b'"', start, end) < 0 else None
