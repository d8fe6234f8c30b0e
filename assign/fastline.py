"""The common line, rewritten without parsing what the reassignment does not change.

A plain reassignment changes two fields of each ``image_info`` entry and nothing else. So one
msgspec pass over the line decodes only what the assignment needs (the matrix's numbers, the
number of sentences, ``image_info``'s own bytes; every other field is skipped, its JSON syntax
still checked), and the output is the line itself with the text of ``image_info`` replaced:
every other byte is written back as read.

This path takes a line only when it is certain to mean what the general path
(``assign.jsonline`` + ``assign.document``) would make of it, and returns ``None`` otherwise
so that the general path decides:

* the line is valid UTF-8 and a JSON object (no NaN, no lone surrogate, depth within limits);
  ``image_info`` is decoded and encoded by msgspec, which keeps integers of any size exact;
* ``image_info`` is a non-empty list of objects, ``text_list`` a non-empty list, and
  ``similarity_matrix`` a list of ``len(image_info)`` rows of ``len(text_list)`` JSON numbers
  (no booleans, strings or nulls: msgspec refuses them for ``float``);
* every similarity is below 2**63 in magnitude (checked by msgspec while decoding), so that
  integers (which the general path reads as int64 and converts) give the same float64 as
  here, and no value is near float32's limit;
* the text of ``image_info`` occurs exactly once in the line, so that replacing it cannot
  touch anything else. (With a key given twice, msgspec keeps the last value, as json and
  orjson do, and that is the one replaced.)

msgspec reads numbers correctly rounded, like Python's ``float`` (the reference's json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from assign.solve import Solver, assign

# Magnitudes at or above this take the general path (int64 reading, float32 overflow).
_LIMIT = float(2**63)
_Similarity = Annotated[float, msgspec.Meta(gt=-_LIMIT, lt=_LIMIT)]


class _Fields(msgspec.Struct):
    """What the assignment reads from a document; other fields are skipped."""

    image_info: msgspec.Raw
    text_list: list[msgspec.Raw]
    similarity_matrix: list[list[_Similarity]]


_DECODER = msgspec.json.Decoder(_Fields)
# msgspec rather than orjson for image_info: it keeps integers beyond 64 bits exact.
_IMAGES = msgspec.json.Decoder(list[dict[str, Any]])
_ENCODE = msgspec.json.Encoder().encode
_PREFIX = 48


@dataclass
class PlainDoc:
    """A line, the position of its ``image_info`` text, and what the reassignment reads."""

    line: bytes
    start: int  # image_info's text is line[start:end]
    end: int
    images: list[dict[str, Any]]
    rows: list[list[float]]
    sim: NDArray[np.float64]


def parse_plain(line: bytes) -> PlainDoc | None:
    """``line`` (its newline optional) read for the fast path, or None: use the general path."""
    if not line.isascii():
        try:
            line.decode()  # msgspec does not check the UTF-8 inside strings it skips
        except UnicodeDecodeError:
            return None
    try:
        fields = _DECODER.decode(line)
        images_text = bytes(fields.image_info)
        images = _IMAGES.decode(images_text)
    except (msgspec.DecodeError, RecursionError):
        return None
    rows, n_texts = fields.similarity_matrix, len(fields.text_list)
    if not images or not n_texts or len(rows) != len(images):
        return None
    try:
        sim = np.array(rows, dtype=np.float64)
    except ValueError:  # rows of different lengths
        return None
    if sim.shape[1] != n_texts:
        return None
    start = _unique_position(line, images_text)
    if start < 0:
        return None
    return PlainDoc(line, start, start + len(images_text), images, rows, sim)


def _unique_position(line: bytes, text: bytes) -> int:
    """Where ``text`` occurs in ``line`` if it occurs there exactly once, else -1."""
    # A prefix that occurs once bounds the occurrences of the whole text to one; searching
    # for a short prefix is several times faster than for the whole text.
    prefix = text[:_PREFIX]
    start = line.find(prefix)
    if start < 0 or line.find(prefix, start + 1) >= 0 or not line.startswith(text, start):
        return -1
    return start


def solve_plain(doc: PlainDoc, solver: Solver) -> None:
    """Set every image's ``matched_text_index`` and ``matched_sim`` as the reference does."""
    assignment = assign(doc.sim, solver)
    for entry, row, index in zip(doc.images, doc.rows, assignment, strict=True):
        entry["matched_text_index"] = index
        entry["matched_sim"] = row[index]


def plain_pieces(doc: PlainDoc) -> tuple[memoryview, bytes, memoryview, bytes]:
    """The rewritten line in pieces (written one by one: no copy of the whole line)."""
    line = memoryview(doc.line)
    newline = b"" if doc.line.endswith(b"\n") else b"\n"
    return line[: doc.start], _ENCODE(doc.images), line[doc.end :], newline


def rewrite_plain(line: bytes, solver: Solver) -> tuple[bytes, int] | None:
    """The rewritten line and its number of images, or None: use the general path."""
    doc = parse_plain(line)
    if doc is None:
        return None
    solve_plain(doc, solver)
    return b"".join(plain_pieces(doc)), len(doc.images)
