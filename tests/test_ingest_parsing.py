"""Shard lines -> image entries: every kind of bad input is reported, none crashes."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import orjson
import pytest

from core import shardfiles, status
from crawler import documents
from crawler.sources import expand_sources


def doc(*infos: dict[str, object]) -> bytes:
    return orjson.dumps({"text_list": ["a"], "image_info": list(infos)})


def test_a_valid_document_yields_one_entry_per_image() -> None:
    line = doc(
        {"image_name": "a.jpg", "raw_url": "http://h.example/a.jpg"},
        {"image_name": "b.png", "raw_url": "https://h.example/b.png"},
    )
    result = documents.parse_line(line)
    assert result.error == ""
    assert [(e.name, e.url, e.problem_status) for e in result.entries] == [
        ("a.jpg", "http://h.example/a.jpg", ""),
        ("b.png", "https://h.example/b.png", ""),
    ]


@pytest.mark.parametrize(
    "line",
    [b"{not json", b"[1, 2]", b'"text"', orjson.dumps({"text_list": []})],
)
def test_malformed_lines_are_errors_not_exceptions(line: bytes) -> None:
    result = documents.parse_line(line)
    assert result.error
    assert result.entries == []


@pytest.mark.parametrize(
    "name",
    [
        "../x.jpg", "/etc/passwd", "", ".hidden", "a/b.jpg", "a\\b.jpg", "nul\x00.jpg",
        "tab\t.jpg", "us\x1f.jpg", "del\x7f.jpg", "x" * 300,
    ],
)  # fmt: skip
def test_names_that_are_not_plain_file_names_are_recorded_as_bad_name(name: str) -> None:
    result = documents.parse_line(doc({"image_name": name, "raw_url": "http://h.example/a"}))
    (entry,) = result.entries
    assert entry.problem_status == status.BAD_NAME
    assert entry.problem


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h.example/a.jpg", "file:///etc/passwd", "javascript:alert(1)", "http://", "", None,
        5, "http://h.example/a\nb.jpg", "http://h.example/\x00.jpg", "http://h.example/\x1f",
    ],
)  # fmt: skip
def test_non_http_urls_are_recorded_as_bad_url(url: object) -> None:
    result = documents.parse_line(doc({"image_name": "a.jpg", "raw_url": url}))
    (entry,) = result.entries
    assert entry.problem_status == status.BAD_URL


def test_entries_without_a_name_are_counted_and_skipped() -> None:
    result = documents.parse_line(doc({"raw_url": "http://h.example/a"}, "junk", {"image_name": 3}))
    assert result.entries == []
    assert result.skipped_entries == 3


def test_shard_ids_come_from_file_names_without_the_jsonl_suffixes() -> None:
    assert shardfiles.shard_id("/d/docs_no_face_shard_7_v2.jsonl.zip") == "docs_no_face_shard_7_v2"
    assert shardfiles.shard_id("https://h/x/docs_shard_1_v3.jsonl?sig=1") == "docs_shard_1_v3"
    assert shardfiles.shard_id("a.jsonl.gz") == "a"


def test_brace_patterns_and_directories_expand_in_order(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s_{i}.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    sources = expand_sources([str(tmp_path / "s_{0..1}.jsonl"), str(tmp_path)])
    assert [s.shard for s in sources] == ["s_0", "s_1", "s_2"]
    remote = expand_sources(["https://h.example/d_{8..9}.jsonl.zip"])
    assert [s.location for s in remote] == [
        "https://h.example/d_8.jsonl.zip",
        "https://h.example/d_9.jsonl.zip",
    ]


def test_plain_gzip_and_zip_shards_stream_the_same_lines_named_or_not(tmp_path: Path) -> None:
    lines = [doc({"image_name": f"{i}.jpg", "raw_url": f"http://h.example/{i}"}) for i in range(5)]
    body = b"\n".join(lines) + b"\n\n"
    (tmp_path / "a.jsonl").write_bytes(body)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body))
    with zipfile.ZipFile(tmp_path / "c.jsonl.zip", "w") as zf:
        zf.writestr("c.jsonl", body)
    (tmp_path / "d.jsonl").write_bytes(gzip.compress(body))  # compressed, named plain
    (tmp_path / "e.jsonl").write_bytes((tmp_path / "c.jsonl.zip").read_bytes())
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zip", "d.jsonl", "e.jsonl"):
        assert list(documents.read_lines(tmp_path / name, 1 << 20, 1 << 30)) == lines


@pytest.mark.parametrize("shard", ["", "_status", ".x", "a/b", "a\nb"])
def test_unusable_shard_ids_are_refused(shard: str) -> None:
    assert shardfiles.check_shard_id(shard)


def test_a_name_with_unbalanced_braces_is_taken_as_it_is(tmp_path: Path) -> None:
    (source,) = expand_sources([str(tmp_path / "odd{name.jsonl")])
    assert source.location == str(tmp_path / "odd{name.jsonl")
