"""assign.fastline gives the documents the general path gives, or steps aside.

The general path (assign.jsonline + assign.document) parses and re-serialises every line; the
fast path decodes only what the assignment reads and splices the new ``image_info`` into the
line. For every line the fast path accepts, the resulting document must equal the general
path's; every line it cannot vouch for must be declined (None), never rewritten differently.
"""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import numpy as np
import pytest

from assign.document import AssignOptions, assign_document
from assign.fastline import parse_plain, rewrite_plain
from assign.jsonline import MalformedLine, dump_line, parse_line


def general_path(line: bytes) -> bytes | None:
    """What assign.rewrite does with a line when the fast path declines it."""
    try:
        parsed = parse_line(line)
    except MalformedLine:
        return None
    outcome = assign_document(parsed.doc, AssignOptions())
    if outcome.status != "rewritten":
        return None
    return dump_line(parsed, outcome.matrix_untouched)


def mmc4_doc(rng: np.random.Generator, n: int, m: int) -> dict[str, Any]:
    sim = rng.normal(0.21, 0.05, (n, m)).astype(np.float32).astype(np.float64)
    return {
        "text_list": [f'Sentence {j} – ünïcode ✓, "quoted" [x]' for j in range(m)],
        "url": "http://example.com/a",
        "image_info": [
            {
                "image_name": f"{i:012x}.jpg",
                "face_detections": None,
                "matched_text_index": 0,
                "matched_sim": 0.0,
                "raw_url": f"http://img.example.com/{i}.jpg",
            }
            for i in range(n)
        ],
        "similarity_matrix": sim.tolist(),
        "could_have_url_duplicate": 0,
    }


def assert_same_document(line: bytes) -> None:
    fast, general = rewrite_plain(line, "lapjv"), general_path(line)
    if fast is None:
        return  # declined: the general path decides, as before
    assert general is not None, line
    assert json.loads(fast[0]) == json.loads(general), line
    assert list(json.loads(fast[0])) == list(json.loads(general))
    assert fast[0].endswith(b"\n") and fast[0].count(b"\n") == 1
    assert fast[1] == len(json.loads(general)["image_info"])


def test_takes_ordinary_documents_and_gives_the_general_paths_result() -> None:
    rng = np.random.default_rng(5)
    taken = 0
    for _ in range(400):
        n = min(int(rng.geometric(1 / 5.6)), 70)
        m = max(1, min(int(rng.lognormal(2.6, 0.9)), 120))
        doc = mmc4_doc(rng, n, m)
        for line in (json.dumps(doc).encode(), json.dumps(doc, ensure_ascii=False).encode()):
            assert_same_document(line)
            taken += rewrite_plain(line, "lapjv") is not None
    assert taken == 800  # every ordinary document takes the fast path


def test_every_byte_outside_image_info_is_written_back_as_read() -> None:
    doc = mmc4_doc(np.random.default_rng(6), 3, 8)
    line = json.dumps(doc, indent=None, separators=(" , ", " : ")).encode()
    fast = rewrite_plain(line, "lapjv")
    assert fast is not None
    start = line.index(b'"image_info"')
    end = line.index(b'"similarity_matrix"')
    assert fast[0].startswith(line[:start]) and fast[0].endswith(line[end:] + b"\n")


def test_integers_zeros_and_negative_zero_read_like_the_general_path() -> None:
    doc = mmc4_doc(np.random.default_rng(7), 2, 4)
    doc["similarity_matrix"] = [[0, -0.0, 1, 2], [-3, 0.5, 123456789012345678, 0.25]]
    line = json.dumps(doc).encode().replace(b"-0.0", b"-0")
    assert rewrite_plain(line, "lapjv") is not None
    assert_same_document(line)
    assert_same_document(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "matrix",
    [
        "[[1e400, 0.1]]",  # overflows float64
        "[[NaN, 0.1]]",
        "[[true, 0.1]]",
        '[["0.5", 0.1]]',
        "[[null, 0.1]]",
        "[[10000000000000000000, 0.1]]",  # beyond int64: the general path reads it differently
        "[[-1e30, 0.1]]",
        "[[0.1, 0.2], [0.3]]",  # ragged
        "[[0.1]]",  # shape mismatch
        "[0.1, 0.2]",
        "[[[0.1], 0.2]]",
    ],
)
def test_unusual_matrices_are_left_to_the_general_path(matrix: str) -> None:
    line = (
        '{"text_list": ["a", "b"], "image_info": [{"image_name": "x.jpg"}], '
        f'"similarity_matrix": {matrix}}}'
    ).encode()
    assert rewrite_plain(line, "lapjv") is None


@pytest.mark.parametrize(
    "line",
    [
        b'{"text_list": ["a", "\xff"], "image_info": [{}], "similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": ["a", "\\ud800"], "image_info": [{}], "similarity_matrix": [[0.1, 0.2]]}',
        b'{"text_list": [], "image_info": [], "similarity_matrix": []}',
        b'{"text_list": ["a"], "image_info": [1], "similarity_matrix": [[0.1]]}',
        b'{"text_list": "a", "image_info": [{}], "similarity_matrix": [[0.1]]}',
        b'{"text_list": ["a"], "image_info": {}, "similarity_matrix": [[0.1]]}',
        b'{"text_list": ["a"], "similarity_matrix": [[0.1]]}',
        b'["text_list", "image_info", "similarity_matrix"]',
        b'{"text_list": ["a"], "image_info": [{}], "similarity_matrix": [[0.1]]',
        b'{"text_list": ["a"], "image_info": [{}], "similarity_matrix": [[0.1]], "deep": '
        + b"[" * 3000
        + b"]" * 3000
        + b"}",
    ],
)
def test_lines_the_fast_path_cannot_vouch_for_are_declined(line: bytes) -> None:
    assert rewrite_plain(line, "lapjv") is None


def test_image_info_text_found_twice_in_the_line_is_declined() -> None:
    doc = mmc4_doc(np.random.default_rng(8), 2, 3)
    doc["copy"] = {"image_info": doc["image_info"]}  # the same text, nested elsewhere
    line = json.dumps(doc).encode()
    assert rewrite_plain(line, "lapjv") is None
    doc2 = mmc4_doc(np.random.default_rng(8), 2, 3)
    doc2["text_list"][0] = json.dumps(doc2["image_info"])  # inside a string: escaped, unique
    assert_same_document(json.dumps(doc2).encode())


def test_repeated_or_escaped_keys_mean_what_json_makes_of_them() -> None:
    rng = np.random.default_rng(9)
    doc = mmc4_doc(rng, 2, 3)
    body = json.dumps(doc).encode()
    first = json.dumps(mmc4_doc(rng, 1, 3)["image_info"]).encode()
    lines = [
        b'{"image_info": ' + first + b", " + body[1:],  # repeated: the last one counts
        body[:-1] + b', "image_info": ' + first + b"}",
        body.replace(b'"image_info"', b'"\\u0069mage_info"'),
        body.replace(b'"text_list"', b'"text_\\u006cist"'),
        body[:-1] + b', "similarity_matrix": [[0.5, 0.25, 0.125], [0.0, 1.0, 0.5]]}',
        b"  " + body + b" \r",
    ]
    for line in lines:
        assert_same_document(line)


def test_integers_beyond_64_bits_in_image_info_stay_exact_as_in_the_reference() -> None:
    line = (
        b'{"text_list": ["a", "b"], "image_info": [{"id": 123456789012345678901234567890}], '
        b'"similarity_matrix": [[0.1, 0.2]]}'
    )
    fast = rewrite_plain(line, "lapjv")
    assert fast is not None
    # The reference's json keeps the integer; so does the fast path.
    assert json.loads(fast[0])["image_info"] == [
        {"id": 123456789012345678901234567890, "matched_text_index": 1, "matched_sim": 0.2}
    ]


def test_numbers_are_read_as_pythons_float_reads_them() -> None:
    decoder = msgspec.json.Decoder(list[list[float]])
    generator = random.Random(10)
    texts = []
    for _ in range(20000):
        value = generator.choice(
            [generator.random(), generator.uniform(-1, 1) * 10 ** generator.randint(-320, 300)]
        )
        texts.append(
            repr(value) if generator.random() < 0.5 else f"{value:.{generator.randint(1, 25)}g}"
        )
    parsed = decoder.decode(("[[" + ", ".join(texts) + "]]").encode())[0]
    assert parsed == [float(text) for text in texts]


def test_parse_keeps_the_float64_values_and_the_shape() -> None:
    doc = mmc4_doc(np.random.default_rng(11), 3, 5)
    parsed = parse_plain(json.dumps(doc).encode())
    assert parsed is not None
    assert parsed.sim.shape == (3, 5)
    assert parsed.sim.tolist() == doc["similarity_matrix"]
