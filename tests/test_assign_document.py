"""assign.document: one document validated and rewritten; assign.status: the crawler's report."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from assign.document import AssignOptions, assign_document
from assign.solve import assign
from assign.status import StoredImage, load_stored_images


def make_doc(sim: list[list[Any]], n_text: int | None = None) -> dict[str, Any]:
    n_text = n_text if n_text is not None else (len(sim[0]) if sim else 2)
    return {
        "text_list": [f"sentence {j}" for j in range(n_text)],
        "url": "http://example.com/page",
        "image_info": [
            {
                "image_name": f"img{i}.jpg",
                "raw_url": f"http://example.com/{i}.jpg",
                "matched_text_index": 0,
                "matched_sim": 0.0,
                "face_detections": None,
            }
            for i in range(len(sim))
        ],
        "similarity_matrix": sim,
        "could_have_url_duplicate": 0,
    }


def stored(*names: str) -> dict[str, StoredImage]:
    return {
        name: StoredImage(f"/data/shard/{name}", "image/jpeg", 1000 + i, 64, 48)
        for i, name in enumerate(names)
    }


SIM = [[0.20, 0.31, 0.27], [0.22, 0.32, 0.26], [0.10, 0.05, 0.30]]


def test_rewrites_matched_index_and_sim_and_keeps_everything_else_in_order() -> None:
    doc = make_doc(SIM)
    before = copy.deepcopy(doc)
    outcome = assign_document(doc, AssignOptions())
    assert outcome.status == "rewritten" and outcome.error is None
    expected = assign(np.array(SIM))
    assert [im["matched_text_index"] for im in doc["image_info"]] == expected
    assert [im["matched_sim"] for im in doc["image_info"]] == [
        SIM[i][j] for i, j in enumerate(expected)
    ]
    assert list(doc) == list(before)
    assert [list(im) for im in doc["image_info"]] == [list(im) for im in before["image_info"]]
    assert doc["similarity_matrix"] == before["similarity_matrix"]
    assert doc["text_list"] == before["text_list"]


def test_integer_similarities_are_accepted_and_reported_as_floats() -> None:
    doc = make_doc([[0, 1], [1, 0]])
    assign_document(doc, AssignOptions())
    assert [im["matched_sim"] for im in doc["image_info"]] == [1.0, 1.0]
    assert all(isinstance(im["matched_sim"], float) for im in doc["image_info"])


def _broken(change: str) -> Any:
    doc: Any = make_doc([[0.1, 0.2], [0.3, 0.4]])
    if change == "not_an_object":
        return [doc]
    if change == "image_info_not_list":
        doc["image_info"] = {"a": 1}
    elif change == "image_entry_not_object":
        doc["image_info"][1] = "img1.jpg"
    elif change == "text_list_missing":
        del doc["text_list"]
    elif change == "matrix_missing":
        del doc["similarity_matrix"]
    elif change == "row_not_list":
        doc["similarity_matrix"][1] = 0.5
    elif change == "ragged":
        doc["similarity_matrix"][1] = [0.3]
    elif change == "string_value":
        doc["similarity_matrix"][0][1] = "0.2"
    elif change == "null_value":
        doc["similarity_matrix"][0][1] = None
    elif change == "booleans_only":
        doc["similarity_matrix"] = [[True, False], [False, True]]
    elif change == "nested_deeper":
        doc["similarity_matrix"] = [[[0.1], [0.2]], [[0.3], [0.4]]]
    elif change == "nan":
        doc["similarity_matrix"][0][0] = float("nan")
    elif change == "infinity":
        doc["similarity_matrix"][1][1] = float("inf")
    elif change == "beyond_float32":
        doc["similarity_matrix"][1][1] = 1e300
    elif change == "too_few_rows":
        doc["similarity_matrix"] = [[0.1, 0.2]]
    elif change == "too_many_columns":
        doc["similarity_matrix"] = [[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]]
    elif change == "no_sentences":
        doc["text_list"] = []
        doc["similarity_matrix"] = [[], []]
    elif change == "matrix_without_images":
        doc["image_info"] = []
    return doc


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ("not_an_object", "not_an_object"),
        ("image_info_not_list", "bad_image_info"),
        ("image_entry_not_object", "bad_image_info"),
        ("text_list_missing", "bad_text_list"),
        ("matrix_missing", "bad_matrix"),
        ("row_not_list", "bad_matrix"),
        ("ragged", "ragged_matrix"),
        ("string_value", "non_numeric"),
        ("null_value", "non_numeric"),
        ("booleans_only", "non_numeric"),
        ("nested_deeper", "bad_matrix"),
        ("nan", "non_finite"),
        ("infinity", "non_finite"),
        ("beyond_float32", "non_finite"),
        ("too_few_rows", "shape_mismatch"),
        ("too_many_columns", "shape_mismatch"),
        ("no_sentences", "no_sentences"),
        ("matrix_without_images", "shape_mismatch"),
    ],
)
def test_bad_document_is_passed_through_unchanged_with_its_error_kind(
    change: str, kind: str
) -> None:
    doc = _broken(change)
    before = copy.deepcopy(doc)
    outcome = assign_document(doc, AssignOptions())
    assert outcome.status == "unchanged"
    assert outcome.error == kind
    assert repr(doc) == repr(before)  # repr: NaN != NaN


def test_document_without_images_is_unchanged_and_not_an_error() -> None:
    doc = {"text_list": ["a"], "image_info": [], "similarity_matrix": []}
    outcome = assign_document(doc, AssignOptions())
    assert (outcome.status, outcome.error) == ("unchanged", None)


def test_downloaded_only_drops_missing_images_and_their_rows_and_solves_again() -> None:
    sim = [[0.30, 0.10, 0.00], [0.29, 0.28, 0.00], [0.05, 0.31, 0.27]]
    doc = make_doc(sim)
    options = AssignOptions(stored=stored("img1.jpg", "img2.jpg"))
    outcome = assign_document(doc, options)
    assert (outcome.status, outcome.kept_images, outcome.dropped_images) == ("rewritten", 2, 1)
    assert [im["image_name"] for im in doc["image_info"]] == ["img1.jpg", "img2.jpg"]
    assert doc["similarity_matrix"] == [sim[1], sim[2]]
    # Without image 0, image 1 takes sentence 0 (with it, image 0 would have).
    assert [im["matched_text_index"] for im in doc["image_info"]] == assign(np.array(sim[1:]))
    assert doc["image_info"][0]["matched_text_index"] == 0
    first = doc["image_info"][0]
    assert list(first)[-5:] == ["local_path", "mimetype", "bytes", "width", "height"]
    assert first["local_path"] == "/data/shard/img1.jpg"
    assert (first["mimetype"], first["bytes"], first["width"], first["height"]) == (
        "image/jpeg",
        1000,
        64,
        48,
    )


def test_downloaded_only_with_every_image_stored_keeps_the_matrix_as_read() -> None:
    doc = make_doc(SIM)
    outcome = assign_document(doc, AssignOptions(stored=stored("img0.jpg", "img1.jpg", "img2.jpg")))
    assert outcome.matrix_untouched and outcome.dropped_images == 0
    assert all("local_path" in im for im in doc["image_info"])


def test_downloaded_only_drops_documents_left_without_images_by_default() -> None:
    outcome = assign_document(make_doc(SIM), AssignOptions(stored=stored("other.jpg")))
    assert (outcome.status, outcome.doc, outcome.dropped_images) == ("dropped", None, 3)


def test_downloaded_only_keeps_empty_documents_when_asked() -> None:
    doc = make_doc(SIM)
    options = AssignOptions(stored=stored(), keep_empty_documents=True)
    outcome = assign_document(doc, options)
    assert outcome.status == "rewritten"
    assert doc["image_info"] == [] and doc["similarity_matrix"] == []
    assert doc["text_list"] == make_doc(SIM)["text_list"]


def test_status_report_lists_only_stored_images_with_local_paths(tmp_path: Path) -> None:
    report = tmp_path / "shard.jsonl.gz"
    records = [
        {"image_name": "a.jpg", "status": "ok", "path": "s/a.jpg", "mimetype": "image/jpeg",
         "bytes": 10, "width": 3, "height": 2},
        {"image_name": "b.jpg", "status": "http_404", "path": None},
        {"image_name": "c.jpg", "status": "ok", "path": "s/c.webp", "mimetype": "image/webp",
         "bytes": 20, "width": 5, "height": 4},
    ]  # fmt: skip
    lines = b"".join(orjson.dumps(r) + b"\n" for r in records) + b"garbage\n"
    report.write_bytes(gzip.compress(lines))
    found = load_stored_images(report, images_dir="/crawl")
    assert sorted(found) == ["a.jpg", "c.jpg"]
    assert found["c.jpg"] == StoredImage("/crawl/s/c.webp", "image/webp", 20, 5, 4)
    assert load_stored_images(report, images_dir=None)["a.jpg"].local_path == "s/a.jpg"
