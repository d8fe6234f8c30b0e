"""assign.rewrite and the ``mmc4-assign shard`` command: whole shards, crash safety, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from test_assign_solve import SHAPES, random_similarities, reference_assignment

from assign.cli import main
from assign.document import AssignOptions, assign_document
from assign.jsonline import dump_line, parse_line
from assign.rewrite import describe, report_path, rewrite_shard
from assign.solve import assign
from assign.status import StoredImage


def random_doc(rng: np.random.Generator, index: int) -> dict[str, Any]:
    n = int(rng.integers(1, 7))
    m = int(rng.integers(1, 30))
    sim = rng.normal(0.22, 0.05, (n, m)).astype(np.float32).astype(np.float64)
    return {
        "text_list": [f"Sentence {j} of doc {index} – ünïcode ✓" for j in range(m)],
        "url": f"http://example.com/{index}",
        "image_info": [
            {
                "face_detections": None,
                "image_name": f"d{index}i{i}.jpg",
                "matched_sim": 0.5,
                "matched_text_index": 0,
                "raw_url": f"http://img.example.com/{index}/{i}.jpg",
            }
            for i in range(n)
        ],
        "similarity_matrix": sim.tolist(),
        "could_have_url_duplicate": index % 2,
        "extra": {"nested": [1, 2, {"k": "v"}]},
    }


def shard_lines(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    # json.dumps: the reference's formatting (", " and ": "), unlike orjson's.
    return [json.dumps(random_doc(rng, i)).encode() for i in range(count)]


def write_shard(path: Path, lines: list[bytes], final_newline: bool = True) -> Path:
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(path.name[: -len(".zip")], data)
    else:
        path.write_bytes(data)
    return path


def check_assignments(doc: dict[str, Any]) -> None:
    sim = np.array(doc["similarity_matrix"], dtype=np.float64)
    expected = assign(sim)  # equal to the reference: see test_assign_solve.py
    assert [im["matched_text_index"] for im in doc["image_info"]] == expected
    assert [im["matched_sim"] for im in doc["image_info"]] == [
        float(sim[i, j]) for i, j in enumerate(expected)
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zip"])
def test_rewrites_every_document_keeping_order_keys_and_other_fields(
    tmp_path: Path, suffix: str
) -> None:
    lines = shard_lines(50)
    source = write_shard(tmp_path / f"docs_shard_7_v2{suffix}", lines, final_newline=False)
    out = tmp_path / "out" / "docs_shard_7_v2.jsonl"
    report = rewrite_shard(source, out, AssignOptions())
    written = out.read_bytes()
    assert written.endswith(b"\n") and written.count(b"\n") == 50
    for original, line in zip(lines, written.splitlines(), strict=True):
        before, after = json.loads(original), orjson.loads(line)
        check_assignments(after)
        assert list(after) == list(before)
        for key in before:
            if key != "image_info":
                assert after[key] == before[key]
        for im_before, im_after in zip(before["image_info"], after["image_info"], strict=True):
            assert list(im_after) == list(im_before)
            assert {k: v for k, v in im_after.items() if not k.startswith("matched_")} == {
                k: v for k, v in im_before.items() if not k.startswith("matched_")
            }
    assert (report.docs, report.rewritten, report.errors, report.complete) == (50, 50, {}, True)


def seed_rewrite(line: bytes) -> dict[str, Any]:
    """The seed's compute_assignments.py on one line: json, np.array, the seed rule."""
    doc = json.loads(line)
    im2txt = np.array(doc["similarity_matrix"])
    assignment = reference_assignment(im2txt)
    for im_idx, im in enumerate(doc["image_info"]):
        im["matched_text_index"] = int(assignment[im_idx])
        im["matched_sim"] = float(im2txt[im_idx, assignment[im_idx]])
    return dict(doc)


def test_tie_heavy_shards_equal_the_seed_rule_on_every_document(tmp_path: Path) -> None:
    rng = np.random.default_rng(2026)
    shapes = [*SHAPES, (64, 64), (3, 64), (65, 80), (90, 20), (4, 300), (70, 1)]
    lines = []
    for trial in range(1200):
        shape = shapes[trial % len(shapes)]
        doc = random_doc(rng, trial)
        doc["text_list"] = [f"s{j}" for j in range(shape[1])]
        doc["image_info"] = [dict(doc["image_info"][0], image_name=f"{trial}-{i}.jpg")
                             for i in range(shape[0])]  # fmt: skip
        if trial % 7 == 6:  # integers: few values, all tied in float32 as in float64
            doc["similarity_matrix"] = rng.integers(0, 3, shape).tolist()
        else:  # ties, near-ties a float32 ulp of 1000 apart, float32-equal values, ...
            doc["similarity_matrix"] = random_similarities(rng, shape, kind=1 + trial % 5).tolist()
        separators = (", ", ": ") if trial % 2 else (",", ":")
        lines.append(json.dumps(doc, separators=separators).encode())
    source = write_shard(tmp_path / "ties.jsonl", lines)
    report = rewrite_shard(source, tmp_path / "o" / "ties.jsonl", AssignOptions())
    written = (tmp_path / "o" / "ties.jsonl").read_bytes().splitlines()
    assert (report.docs, report.rewritten, report.errors) == (1200, 1200, {})
    for trial, (line, out) in enumerate(zip(lines, written, strict=True)):
        assert json.loads(out) == seed_rewrite(line), trial


def test_matrix_text_is_written_back_exactly_as_read(tmp_path: Path) -> None:
    lines = shard_lines(5)
    source = write_shard(tmp_path / "s.jsonl", lines)
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, out, AssignOptions())
    for original, line in zip(lines, out.read_bytes().splitlines(), strict=True):
        start = original.index(b'"similarity_matrix": ') + len(b'"similarity_matrix": ')
        matrix_text = original[start : original.index(b"]]", start) + 2]
        assert matrix_text in line


def test_key_name_inside_text_does_not_confuse_the_matrix_cut(tmp_path: Path) -> None:
    doc = random_doc(np.random.default_rng(1), 0)
    doc["text_list"][0] = '"similarity_matrix": [[9.0]]'
    source = write_shard(tmp_path / "s.jsonl", [json.dumps(doc).encode()])
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, out, AssignOptions())
    after = orjson.loads(out.read_bytes())
    assert after["text_list"] == doc["text_list"]
    assert after["similarity_matrix"] == doc["similarity_matrix"]
    check_assignments(after)


def test_malformed_lines_and_bad_documents_pass_through_byte_for_byte(tmp_path: Path) -> None:
    good = shard_lines(2)
    bad_doc = (
        b'{"image_info": [{"image_name": "x"}], "text_list": ["a"], "similarity_matrix": [[1, 2]]}'
    )
    lines = [good[0], b"{not json", b"", bad_doc, b"  \t", good[1]]
    source = write_shard(tmp_path / "s.jsonl", lines)
    out = tmp_path / "o" / "s.jsonl"
    report = rewrite_shard(source, out, AssignOptions())
    written = out.read_bytes().split(b"\n")
    assert written[1:5] == [b"{not json", b"", bad_doc, b"  \t"]
    assert report.errors == {"malformed_json": 3, "shape_mismatch": 1}
    assert (report.lines, report.docs, report.rewritten, report.unchanged) == (6, 3, 2, 1)


def test_valid_json_that_orjson_refuses_is_still_rewritten(tmp_path: Path) -> None:
    doc = random_doc(np.random.default_rng(2), 0)
    doc["big"] = 2**70
    source = write_shard(tmp_path / "s.jsonl", [json.dumps(doc).encode()])
    out = tmp_path / "o" / "s.jsonl"
    report = rewrite_shard(source, out, AssignOptions())
    after = json.loads(out.read_bytes())
    assert report.rewritten == 1 and after["big"] == 2**70
    check_assignments(after)


def test_integers_beyond_64_bits_stay_exact_on_the_general_path_too() -> None:
    big = 123456789012345678901234567890  # orjson alone would make it a float
    doc = random_doc(np.random.default_rng(3), 0)
    doc["big"] = big
    doc["image_info"][0]["id"] = -big
    parsed = parse_line(json.dumps(doc).encode())
    outcome = assign_document(parsed.doc, AssignOptions())
    after = json.loads(dump_line(parsed, outcome.matrix_untouched))
    assert after["big"] == big and after["image_info"][0]["id"] == -big
    check_assignments(after)


def test_report_is_returned_and_written_next_to_the_output(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl.gz", shard_lines(3))
    out = tmp_path / "o" / "s.jsonl"
    report = rewrite_shard(source, out, AssignOptions())
    on_disk = orjson.loads(report_path(out).read_bytes())
    assert report_path(out) == tmp_path / "o" / "s.report.json"
    assert on_disk == report.to_dict()
    assert on_disk["output_bytes"] == out.stat().st_size


def test_complete_output_is_skipped_on_the_next_run(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(3))
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, out, AssignOptions())
    mtime = out.stat().st_mtime_ns
    again = rewrite_shard(source, out, AssignOptions())
    assert again.skipped and again.docs == 3
    assert out.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("left", [b"", b'{"complete": tr', b"\0" * 64])
def test_a_report_a_power_cut_left_empty_or_partial_means_rewriting_again(
    tmp_path: Path, left: bytes
) -> None:
    """The report is not synced (only the output is): what a power cut can leave of it."""
    source = write_shard(tmp_path / "s.jsonl", shard_lines(3))
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, out, AssignOptions())
    (tmp_path / "o" / "s.report.json").write_bytes(left)
    again = rewrite_shard(source, out, AssignOptions())
    assert not again.skipped and again.complete and again.docs == 3


def test_different_settings_or_a_damaged_output_are_rewritten(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(3))
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, out, AssignOptions())
    scipy = AssignOptions(solver="scipy")
    assert not rewrite_shard(source, out, scipy, settings=describe(scipy, None)).skipped
    with open(out, "ab") as damaged:
        damaged.write(b"x")
    assert not rewrite_shard(source, out, scipy, settings=describe(scipy, None)).skipped


def test_leftover_temporary_files_are_discarded(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(3))
    (tmp_path / "o").mkdir()
    leftover = tmp_path / "o" / ".s.jsonl.4242.deadbeef.tmp"
    leftover.write_bytes(b"half a shard")
    report_leftover = tmp_path / "o" / ".s.report.json.4242.deadbeef.tmp"  # killed mid-report
    report_leftover.write_bytes(b"{")
    rewrite_shard(source, tmp_path / "o" / "s.jsonl", AssignOptions())
    assert not leftover.exists() and not report_leftover.exists()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["s.jsonl", "s.report.json"]


def test_rewriting_in_place_replaces_the_shard_atomically(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(4))
    report = rewrite_shard(source, source, AssignOptions())
    assert report.rewritten == 4
    for line in source.read_bytes().splitlines():
        check_assignments(orjson.loads(line))


def test_downloaded_only_shard_keeps_stored_images_and_drops_empty_documents(
    tmp_path: Path,
) -> None:
    lines = shard_lines(20, seed=5)
    docs = [json.loads(line) for line in lines]
    names = [im["image_name"] for doc in docs for im in doc["image_info"]]
    kept = set(names[::2])
    stored = {n: StoredImage(f"/c/{n}", "image/jpeg", 5, 2, 2) for n in kept}
    source = write_shard(tmp_path / "s.jsonl", lines)
    out = tmp_path / "o" / "s.jsonl"
    report = rewrite_shard(source, out, AssignOptions(stored=stored))
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    expected_docs = [d for d in docs if any(im["image_name"] in kept for im in d["image_info"])]
    assert [d["url"] for d in written] == [d["url"] for d in expected_docs]
    for doc in written:
        assert {im["image_name"] for im in doc["image_info"]} <= kept
        assert all(im["local_path"] == f"/c/{im['image_name']}" for im in doc["image_info"])
        check_assignments(doc)
    assert report.dropped_docs == len(docs) - len(expected_docs)
    assert report.dropped_images == len(names) - len(kept)
    assert report.kept_images == len(kept)


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from assign.document import AssignOptions
    from assign.rewrite import rewrite_shard
    print("started", flush=True)
    rewrite_shard(Path(sys.argv[1]), Path(sys.argv[2]), AssignOptions(), force=True)
    """
)


def test_kill_9_during_a_rewrite_leaves_the_old_or_the_new_output_whole(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(3000, seed=9))
    out = tmp_path / "o" / "s.jsonl"
    rewrite_shard(source, tmp_path / "expected" / "s.jsonl", AssignOptions())
    new = (tmp_path / "expected" / "s.jsonl").read_bytes()
    old = b'{"old": true}\n'
    out.parent.mkdir()
    out.write_bytes(old)
    seen = set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, None):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_SCRIPT, str(source), str(out)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        if delay is not None:  # None: let this one finish
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        content = out.read_bytes()
        assert content in (old, new)
        seen.add(content == new)
        out.write_bytes(old)  # start every round from the old file
    assert seen == {False, True}  # some kills landed mid-way, some after the rename
    report = rewrite_shard(source, out, AssignOptions(), force=True)
    assert out.read_bytes() == new and report.complete
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_rewrites_a_directory_of_shards_into_an_output_directory(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.jsonl.gz", shard_lines(3, seed=1))
    write_shard(shards / "b.jsonl.zip", shard_lines(4, seed=2))
    (shards / "notes.txt").write_text("not a shard")
    result = CliRunner().invoke(main, ["shard", str(shards), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.output.splitlines()]
    assert [r["docs"] for r in reports] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.jsonl",
        "a.report.json",
        "b.jsonl",
        "b.report.json",
    ]


def test_cli_downloaded_only_mode_uses_the_status_report(tmp_path: Path) -> None:
    lines = shard_lines(3, seed=4)
    source = write_shard(tmp_path / "s.jsonl", lines)
    first = json.loads(lines[0])["image_info"][0]["image_name"]
    status = tmp_path / "s.status.jsonl.gz"
    record = {"image_name": first, "status": "ok", "path": f"s/{first}", "mimetype": "image/png",
              "bytes": 9, "width": 1, "height": 1}  # fmt: skip
    status.write_bytes(gzip.compress(orjson.dumps(record) + b"\n"))
    args = ["shard", str(source), "-o", str(tmp_path / "o"), "--report", str(status)]
    result = CliRunner().invoke(main, [*args, "--images-dir", "/crawl", "--drop-empty"])
    assert result.exit_code == 0, result.output
    docs = [orjson.loads(x) for x in (tmp_path / "o" / "s.jsonl").read_bytes().splitlines()]
    assert len(docs) == 1 and [im["image_name"] for im in docs[0]["image_info"]] == [first]
    assert docs[0]["image_info"][0]["local_path"] == f"/crawl/s/{first}"


def test_cli_refuses_two_shards_that_would_share_an_output(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.jsonl.gz", shard_lines(1))
    write_shard(tmp_path / "a.jsonl.zip", shard_lines(1))
    result = CliRunner().invoke(main, ["shard", str(tmp_path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "would both be written" in result.output


def test_python_dash_m_assign_runs_the_cli(tmp_path: Path) -> None:
    source = write_shard(tmp_path / "s.jsonl", shard_lines(2))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "assign", "shard", str(source), "-o", str(tmp_path / "o")],
        capture_output=True,
        env=env,
        check=True,
    )
    assert json.loads(done.stdout)["rewritten"] == 2


@pytest.mark.parametrize("option", ["--output", "--images-dir"])
def test_cli_refuses_a_bucket_url_where_it_takes_a_local_directory(
    tmp_path: Path, option: str
) -> None:
    source = write_shard(tmp_path / "a.jsonl.gz", shard_lines(2, seed=1))
    result = CliRunner().invoke(main, ["shard", str(source), option, "s3://bucket/prefix"])
    assert result.exit_code == 2
    assert "is a URL" in result.output and "assign worker" in result.output
    assert not (Path.cwd() / "s3:").exists() and not list(tmp_path.glob("*.jsonl"))
