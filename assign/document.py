"""Validate one MMC4 document and rewrite its images' ``matched_text_index`` / ``matched_sim``.

A document that cannot be assigned (malformed matrix, shape mismatch, no sentence, ...) is
returned unchanged with an error kind; a document without images is returned unchanged without
error. In downloaded-only mode (``AssignOptions.stored`` set), images the crawler did not store
are removed together with their similarity rows, the assignment is solved again on what is
left, and every kept image gains ``local_path``, ``mimetype``, ``bytes``, ``width``, ``height``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from assign.solve import Solver, assign
from assign.status import StoredImage

# Error kinds, as counted in shard reports.
NOT_AN_OBJECT = "not_an_object"
BAD_IMAGE_INFO = "bad_image_info"
BAD_TEXT_LIST = "bad_text_list"
BAD_MATRIX = "bad_matrix"
RAGGED_MATRIX = "ragged_matrix"
NON_NUMERIC = "non_numeric"
NON_FINITE = "non_finite"
SHAPE_MISMATCH = "shape_mismatch"
NO_SENTENCES = "no_sentences"

# lapjv works in float32: a larger magnitude would become infinite there.
FLOAT32_MAX = float(np.finfo(np.float32).max)

Status = Literal["rewritten", "unchanged", "dropped"]


@dataclass(frozen=True)
class AssignOptions:
    solver: Solver = "lapjv"
    # image_name -> stored image: downloaded-only mode. None: plain reassignment.
    stored: Mapping[str, StoredImage] | None = None
    # Downloaded-only mode: keep documents left with no image (else drop them).
    keep_empty_documents: bool = False


@dataclass
class Outcome:
    status: Status
    doc: Any = None
    error: str | None = None
    kept_images: int = 0
    dropped_images: int = 0
    # The similarity matrix is the one read (so its original text can be written back).
    matrix_untouched: bool = True


@dataclass
class _Valid:
    images: list[dict[str, Any]]
    rows: list[Any]
    sim: NDArray[np.float64]


def assign_document(doc: Any, options: AssignOptions) -> Outcome:
    """Rewrite ``doc`` in place where needed and say what happened to it."""
    checked = _validate(doc)
    if isinstance(checked, str):
        return Outcome("unchanged", doc, error=checked)
    if checked is None:  # no image at all
        return _without_images(doc, options, dropped=0)
    if options.stored is None:
        _apply(checked.images, checked.sim, options.solver)
        return Outcome("rewritten", doc, kept_images=len(checked.images))
    return _downloaded_only(doc, checked, options.stored, options)


def _validate(doc: Any) -> _Valid | str | None:
    """The checked parts of ``doc``, an error kind, or None for a document with no image."""
    if not isinstance(doc, dict):
        return NOT_AN_OBJECT
    images, texts, rows = doc.get("image_info"), doc.get("text_list"), doc.get("similarity_matrix")
    if not isinstance(images, list) or not all(isinstance(e, dict) for e in images):
        return BAD_IMAGE_INFO
    if not isinstance(texts, list):
        return BAD_TEXT_LIST
    if not isinstance(rows, list):
        return BAD_MATRIX
    if not images:
        return SHAPE_MISMATCH if rows else None
    if not texts:
        return NO_SENTENCES
    shape_error = _shape_error(rows, len(images), len(texts))
    if shape_error is not None:
        return shape_error
    sim = _numeric(rows)
    if isinstance(sim, str):
        return sim
    return _Valid(images, rows, sim)


def _shape_error(rows: list[Any], n_images: int, n_sentences: int) -> str | None:
    if not all(isinstance(row, list) for row in rows):
        return BAD_MATRIX
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        return RAGGED_MATRIX
    if len(rows) != n_images or lengths != {n_sentences}:
        return SHAPE_MISMATCH
    return None


def _numeric(rows: list[Any]) -> NDArray[np.float64] | str:
    """The matrix as float64, accepting what numpy reads as numbers (as the reference does)."""
    try:
        raw = np.array(rows)
    except (ValueError, TypeError):
        return BAD_MATRIX  # e.g. lists nested unevenly inside the rows
    if raw.ndim != 2:
        return BAD_MATRIX
    if raw.dtype.kind not in "fiu":  # strings, None, bool-only, objects (huge integers)
        return NON_NUMERIC
    sim = raw.astype(np.float64, copy=False)
    # One pass: NaN fails every comparison, infinities and float32 overflows fail this one.
    if not (np.abs(sim) <= FLOAT32_MAX).all():
        return NON_FINITE
    return sim


def _apply(images: list[dict[str, Any]], sim: NDArray[np.float64], solver: Solver) -> None:
    assignment = assign(sim, solver)
    sims = sim[np.arange(len(assignment)), assignment].tolist()
    for entry, index, value in zip(images, assignment, sims, strict=True):
        entry["matched_text_index"] = index
        entry["matched_sim"] = value


def _without_images(doc: dict[str, Any], options: AssignOptions, dropped: int) -> Outcome:
    if options.stored is not None and not options.keep_empty_documents:
        return Outcome("dropped", None, dropped_images=dropped)
    if dropped == 0:
        return Outcome("unchanged", doc)
    doc["image_info"] = []
    doc["similarity_matrix"] = []
    return Outcome("rewritten", doc, dropped_images=dropped, matrix_untouched=False)


def _downloaded_only(
    doc: dict[str, Any], valid: _Valid, stored: Mapping[str, StoredImage], options: AssignOptions
) -> Outcome:
    keep = [i for i, entry in enumerate(valid.images) if _stored(entry, stored) is not None]
    dropped = len(valid.images) - len(keep)
    if not keep:
        return _without_images(doc, options, dropped)
    images = [valid.images[i] for i in keep]
    sim = valid.sim[keep] if dropped else valid.sim
    _apply(images, sim, options.solver)
    for entry in images:
        image = _stored(entry, stored)
        assert image is not None  # kept above for this very reason
        entry.update(image.fields())
    if dropped:
        doc["image_info"] = images
        doc["similarity_matrix"] = [valid.rows[i] for i in keep]
    return Outcome(
        "rewritten",
        doc,
        kept_images=len(images),
        dropped_images=dropped,
        matrix_untouched=dropped == 0,
    )


def _stored(entry: dict[str, Any], stored: Mapping[str, StoredImage]) -> StoredImage | None:
    name = entry.get("image_name")
    return stored.get(name) if isinstance(name, str) else None
