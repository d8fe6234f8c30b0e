"""`mmc4-crawl export`: WebDataset tars of a real crawl's documents, read back with the
`webdataset` library, in OpenFlamingo's format and with images as members; resumable."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import webdataset as wds
from dataset_helpers import Corpus, crawl_corpus
from PIL import Image

from core import status
from crawler.dataset.export import sample_key
from testweb import ImageWeb


@pytest.fixture(scope="module")
def corpus(web: ImageWeb, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return crawl_corpus(web, tmp_path_factory.mktemp("crawl"))


def export(corpus: Corpus, out: Path, *args: str, settings: tuple[str, ...] = ()) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "crawler", "--output", str(corpus.output)]
    for item in settings:
        cmd += ["--set", item]
    done = subprocess.run(
        [*cmd, "export", "--format", "webdataset", str(out), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    summary: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return summary


def source_documents(corpus: Corpus) -> dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]]:
    """id -> (rewritten shard document, image_name -> stored file record)."""
    out = {}
    for shard in corpus.shards:
        recs = {
            r.image_name: msgspec.structs.asdict(r)
            for r in status.read_report(status.ReportPaths(corpus.output, shard).report)
            if r.status == status.OK
        }
        lines = (corpus.output / status.SHARDS_DIR / f"{shard}.jsonl").read_bytes().splitlines()
        for i, raw in enumerate(lines):
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            stored = {n["image_name"]: recs[n["image_name"]] for n in doc["image_info"]
                      if n["image_name"] in recs}  # fmt: skip
            out[f"{shard}:{i}"] = (doc, stored)
    return out


def read_back(out: Path) -> list[dict[str, Any]]:
    tars = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def test_openflamingo_format_decodes_to_the_stored_images(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "wds"
    summary = export(corpus, out, "--max-docs", "4", "--processes", "2")
    sources = source_documents(corpus)
    expected = {i for i, (_, stored) in sources.items() if stored}  # at least one stored image
    samples = read_back(out)
    assert summary["docs"] == len(samples) == len(expected)
    seen = set()
    for sample in samples:
        assert set(sample) == {"__key__", "__url__", "__local_path__", "json"}
        doc = orjson.loads(sample["json"])
        seen.add(doc["id"])
        source, stored = sources[doc["id"]]
        shard, line = doc["id"].rsplit(":", 1)
        assert sample["__key__"] == sample_key(shard, int(line)) == f"{shard}-{int(line):09d}"
        assert doc["text_list"] == source["text_list"]
        assert [i["image_name"] for i in doc["image_info"]] == [
            i["image_name"] for i in source["image_info"] if i["image_name"] in stored
        ]
        assert len(doc["similarity_matrix"]) == len(doc["image_info"])
        for info in doc["image_info"]:
            path = corpus.output / stored[info["image_name"]]["path"]
            raw = base64.b64decode(info["image_base64"])
            assert raw == path.read_bytes()
            # as OpenFlamingo's MMC4 loader opens it
            with Image.open(io.BytesIO(raw)) as a, Image.open(path) as b:
                assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    assert seen == expected
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == summary["tars"] > len(corpus.shards)
    for tar in tars:
        with tarfile.open(tar) as t:
            assert len(t.getnames()) <= 4


def test_images_as_members_and_only_documents_with_every_image_stored(
    corpus: Corpus, tmp_path: Path
) -> None:
    out = tmp_path / "wds"
    export(corpus, out, "--images", "members", "--all-stored", "--min-stored", "1")
    sources = source_documents(corpus)
    expected = {
        i for i, (doc, stored) in sources.items()
        if stored and len(stored) == len(doc["image_info"])
    }  # fmt: skip
    samples = read_back(out)
    assert {orjson.loads(s["json"])["id"] for s in samples} == expected
    for sample in samples:
        doc = orjson.loads(sample["json"])
        _, stored = sources[doc["id"]]
        members = {k for k in sample if not k.startswith("__") and k != "json"}
        assert members == {i["image_member"] for i in doc["image_info"]}
        for info in doc["image_info"]:
            assert "image_base64" not in info
            rec = stored[info["image_name"]]
            assert sample[info["image_member"]] == (corpus.output / rec["path"]).read_bytes()
            ext = {
                "image/jpeg": "jpg",
                "image/png": "png",
                "image/webp": "webp",
                "image/gif": "gif",
            }
            assert info["image_member"].endswith("." + ext[rec["mimetype"]])


def test_a_rerun_skips_finished_tars_and_redoes_only_the_unfinished(
    corpus: Corpus, tmp_path: Path
) -> None:
    out = tmp_path / "wds"
    first = export(corpus, out, "--max-docs", "3")
    tars = sorted(out.glob("*.tar"))
    content = {t.name: t.read_bytes() for t in tars}
    stamps = {t.name: t.stat().st_mtime_ns for t in tars}
    again = export(corpus, out, "--max-docs", "3")
    assert again["skipped_shards"] == len(corpus.shards)
    assert {t.name: t.stat().st_mtime_ns for t in out.glob("*.tar")} == stamps
    # As if killed while writing a shard's third tar: two tars recorded, the rest not.
    shard = corpus.shards[0]
    progress_file = out / "_progress" / f"{shard}.json"
    progress = orjson.loads(progress_file.read_bytes())
    lost = progress["tars"][2:]
    progress["tars"], progress["complete"] = progress["tars"][:2], False
    progress_file.write_bytes(orjson.dumps(progress))
    for tar in lost:
        (out / tar["name"]).unlink()
    (out / f".{shard}-000002.tar.123.abcd.tmp").write_bytes(b"partial")
    resumed = export(corpus, out, "--max-docs", "3")
    assert resumed["docs"] == first["docs"]
    after = {t.name: t for t in out.glob("*.tar")}
    assert {n: p.read_bytes() for n, p in after.items()} == content
    kept = {t["name"] for t in progress["tars"]} | {
        t.name for t in tars if not t.name.startswith(shard)
    }
    for name in kept:
        assert after[name].stat().st_mtime_ns == stamps[name], name
    assert not list(out.glob(".*.tmp"))


def test_tars_stay_under_the_size_limit(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "wds"
    export(corpus, out, "--max-tar-mb", "0.06")
    sizes = {t: t.stat().st_size for t in out.glob("*.tar")}
    assert len(sizes) > len(corpus.shards)
    for tar, size in sizes.items():
        with tarfile.open(tar) as t:
            docs = {n.split(".", 1)[0] for n in t.getnames()}
        assert size <= 60_000 or len(docs) == 1, tar


def test_url_duplicates_are_left_out_when_configured(corpus: Corpus, tmp_path: Path) -> None:
    everything = export(corpus, tmp_path / "all", "--min-stored", "0")
    kept = export(
        corpus, tmp_path / "kept", "--min-stored", "0",
        settings=("corpus.skip_url_duplicates=true",),
    )  # fmt: skip
    assert everything["docs"] == corpus.docs
    assert kept["docs"] == corpus.docs - len(corpus.shards)
    ids = {orjson.loads(s["json"])["id"] for s in read_back(tmp_path / "kept")}
    flags = [
        orjson.loads(s["json"])["could_have_url_duplicate"] for s in read_back(tmp_path / "kept")
    ]
    assert not any(flags)
    assert len(ids) == kept["docs"]
