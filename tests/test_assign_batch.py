"""assign.batch rewrites whole chunks of lines as the reference would, or hands lines on.

Every line it takes must come out as the reference's document (``reference_assignment`` of
test_assign_solve.py, an independent restatement of compute_assignments.py + lapjv), with every
byte but the two rewritten values as read; every line it cannot vouch for must reach the
per-line paths unchanged and in order.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_assign_fastline import general_path, mmc4_doc
from test_assign_solve import SHAPES, random_similarities, reference_assignment

from assign.batch import ChunkReader, ChunkRewriter
from assign.document import AssignOptions
from assign.fastline import rewrite_plain
from assign.jv import kernel_known
from assign.rewrite import rewrite_shard


def run_batch(lines: list[bytes], chunk_bytes: int = 1 << 16) -> tuple[list[bytes], list[bytes]]:
    """(the output's lines, the lines handed on); a handed-on line is written as ``<n>``."""
    stream = io.BytesIO(b"".join(line + b"\n" for line in lines))
    out = io.BytesIO()
    handed_on: list[bytes] = []

    def other(line: bytes) -> None:
        out.write(f"<{len(handed_on)}>\n".encode())
        handed_on.append(line)

    rewriter = ChunkRewriter()
    for chunk in ChunkReader(stream, chunk_bytes).chunks():
        rewriter.rewrite(chunk, out.write, other)
    return out.getvalue().splitlines(), handed_on


def assert_reference_result(line: bytes, doc: dict[str, Any]) -> None:
    sim = np.array(doc["similarity_matrix"], dtype=np.float64)
    expected = reference_assignment(sim)
    for image, index, row in zip(doc["image_info"], expected, sim, strict=True):
        image["matched_text_index"] = index
        image["matched_sim"] = float(row[index])
    written = json.loads(line)
    assert written == doc
    assert list(written) == list(doc)  # keys keep their order
    for image in written["image_info"]:
        assert type(image["matched_sim"]) is float and type(image["matched_text_index"]) is int


def test_documents_of_every_shape_and_kind_get_the_references_assignment() -> None:
    rng = np.random.default_rng(31)
    docs = []
    shapes = [*SHAPES, (64, 64), (70, 1), (3, 64), (65, 80), (90, 20)]
    for trial in range(2400):
        if trial % 2:
            shape = shapes[trial % len(shapes)]
        else:
            n = min(int(rng.geometric(1 / 5.6)), 60)
            shape = (n, int(np.clip(rng.lognormal(2.6, 0.9), 1, 200)))
        doc = mmc4_doc(rng, *shape)
        doc["similarity_matrix"] = random_similarities(rng, shape, kind=trial % 6).tolist()
        docs.append(doc)
    lines = [json.dumps(doc).encode() for doc in docs]
    written, handed_on = run_batch(lines)
    if kernel_known():  # else lapjv's kernel decides 64 x 64 and more, in Python
        assert handed_on == []  # every one of these is taken
    for line, doc in zip(written, docs, strict=True):
        if line.startswith(b"<"):
            per_line = rewrite_plain(handed_on[int(line[1:-1])], "lapjv")
            assert per_line is not None
            line = per_line[0]
        assert_reference_result(line, doc)


def test_mmc4_documents_in_any_json_layout_are_taken_and_equal_the_per_line_path() -> None:
    rng = np.random.default_rng(32)
    lines = []
    for trial in range(600):
        doc = mmc4_doc(rng, int(rng.integers(1, 9)), int(rng.integers(1, 40)))
        doc["extra"] = {"nested": [[1, 2], {"a": ']}\\"[{'}], "n": -1.5e-3}
        if trial % 3 == 0:  # the two values in the other order, keys in another order
            for image in doc["image_info"]:
                image["matched_text_index"] = image.pop("matched_text_index")
            doc = dict(reversed(list(doc.items())))
        dumps = [
            json.dumps(doc),
            json.dumps(doc, separators=(",", ":")),
            json.dumps(doc, ensure_ascii=False),
            json.dumps(doc, indent=None, separators=(" , ", " :\t")),
        ]
        lines.append(dumps[trial % 4].encode())
    written, handed_on = run_batch(lines, chunk_bytes=8192)
    assert handed_on == []
    for line, out in zip(lines, written, strict=True):
        per_line = rewrite_plain(line, "lapjv")
        assert per_line is not None
        assert json.loads(out) == json.loads(per_line[0])
        assert list(json.loads(out)) == list(json.loads(line))


def test_every_byte_but_the_two_values_is_written_back_as_read() -> None:
    doc = mmc4_doc(np.random.default_rng(33), 4, 9)
    doc["image_info"][1]["matched_sim"] = 0.123456789
    line = json.dumps(doc, separators=(" ,", ":  ")).encode()
    (out,), _ = run_batch([line])
    blank = re.compile(rb'("matched_text_index":\s*)[^,}]*|("matched_sim":\s*)[^,}]*')
    assert blank.sub(rb"\1\2", out) == blank.sub(rb"\1\2", line)
    # matched_sim is the very text of the chosen similarity.
    for image, row in zip(json.loads(out)["image_info"], doc["similarity_matrix"], strict=True):
        assert repr(row[image["matched_text_index"]]).encode() in out


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"text_list": ["a", "\xff"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}],'
        b' "similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": ["a", "b"], "image_info": [], "similarity_matrix": []}',
        b'{"text_list": ["a", "b"], "image_info": [{"image_name": "x"}], '
        b'"similarity_matrix": [[0.1, 0.2]]}',  # no matched_* keys: they are added
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0, '
        b'"matched_sim": 1}], "similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, '
        b'"matched_\\u0073im": 0}], "similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[1, 0.2]]}',  # an integer reads as an int
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[1e300, 0.2]]}',
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[NaN, 0.2]]}',
        b'{"text_list": ["a", 7], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[0.1, 0.2, 0.3]]}',  # shape mismatch
        b'{"text_list": ["a", "b"], "image_info": [{"matched_text_index": 0, "matched_sim": 0}], '
        b'"similarity_matrix": [[0.1, 0.2]], "image_info": [{"matched_text_index": 0, '
        b'"matched_sim": 0}]}',  # a field given twice
        b'{"text_\\u006cist": ["a", "b"], "image_info": [{"matched_text_index": 0, '
        b'"matched_sim": 0}], "similarity_matrix": [[0.1, 0.2]]}',
    ],
)
def test_lines_it_cannot_vouch_for_are_handed_on_as_read_and_in_order(line: bytes) -> None:
    good = json.dumps(mmc4_doc(np.random.default_rng(34), 2, 3)).encode()
    written, handed_on = run_batch([good, line, good])
    assert handed_on == [line]
    assert written[1] == b"<0>"
    assert written[0] == written[2] and json.loads(written[0]) == json.loads(general_path(good))


def test_lines_holding_several_values_or_part_of_one_are_handed_on() -> None:
    # msgspec reads a chunk as whitespace-separated values: here as many values as lines,
    # but not one per line. Every line is still judged on its own.
    good = json.dumps(mmc4_doc(np.random.default_rng(36), 2, 3)).encode()
    lines = [good, good + b" " + good, good[:40], good[40:], b"", good]
    written, handed_on = run_batch(lines)
    assert handed_on == lines[1:5]
    assert written[1:5] == [b"<0>", b"<1>", b"<2>", b"<3>"]
    assert written[0] == written[5] and json.loads(written[0]) == json.loads(general_path(good))


def test_rewrite_shard_equals_the_per_line_paths_on_a_mixed_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(35)
    lines = []
    for trial in range(300):
        doc = mmc4_doc(rng, int(rng.integers(1, 6)), int(rng.integers(1, 30)))
        if trial % 7 == 0:
            doc["similarity_matrix"][0][0] = 1  # handed on: read by the per-line paths
        lines.append(json.dumps(doc).encode())
    lines[10] = b"{broken"
    source = tmp_path / "shard.jsonl"
    source.write_bytes(b"\n".join(lines))  # no newline at the very end
    report = rewrite_shard(source, tmp_path / "out" / "shard.jsonl", AssignOptions())
    output = Path(report.output).read_bytes()
    assert output.endswith(b"}\n") and output.count(b"\n") == len(lines)
    for line, out in zip(lines, output.splitlines(), strict=True):
        expected = general_path(line)
        if expected is None:
            assert out == line
        else:
            assert json.loads(out) == json.loads(expected)
    assert (report.lines, report.docs, report.rewritten) == (300, 299, 299)
    assert report.errors == {"malformed_json": 1}


@pytest.mark.parametrize("size", [1, 7, 100, 1 << 16])
@pytest.mark.parametrize("final_newline", [True, False])
def test_chunks_hold_whole_lines_whatever_the_chunk_size(
    size: int, final_newline: bool, tmp_path: Path
) -> None:
    data = b"a\n\nbb\n" + b"c" * 500 + b"\n{}\nlast line" + (b"\n" if final_newline else b"")
    path = tmp_path / "shard.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as mapped:  # a plain file is mapped, other streams are read
        for stream in (io.BytesIO(data), mapped):
            chunks = [bytes(chunk) for chunk in ChunkReader(stream, size).chunks()]
            assert b"".join(chunks) == data
            assert all(chunk.endswith(b"\n") for chunk in chunks[:-1])
            assert all(chunks)


def test_an_empty_shard_has_no_chunks(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with open(path, "rb") as stream:
        assert list(ChunkReader(stream).chunks()) == []
    assert list(ChunkReader(io.BytesIO(b"")).chunks()) == []
