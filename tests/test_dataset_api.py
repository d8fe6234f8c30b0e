"""The dataset API, end to end: a real crawl's output, indexed by the assignment worker,
served by `mmc4-crawl serve-dataset` (a separate process, no Redis) and read over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import orjson
import pytest
import requests
import schemathesis
import schemathesis.specs.openapi.checks
from crawling import image_doc, write_docs
from dataset_helpers import Corpus, Server, crawl_corpus, serving
from schemathesis import GenerationMode

from assign.index import index_shard
from assign.tree import LocalTree
from core import status
from testweb import ImageWeb


@pytest.fixture(scope="module")
def corpus(web: ImageWeb, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return crawl_corpus(web, tmp_path_factory.mktemp("crawl"))


@pytest.fixture(scope="module")
def server(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(corpus.output, tmp_path_factory.mktemp("log") / "serve.log") as srv:
        yield srv


def records(corpus: Corpus) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for shard in corpus.shards:
        for rec in status.read_report(status.ReportPaths(corpus.output, shard).report):
            out[(shard, rec.image_name)] = msgspec.structs.asdict(rec)
    return out


def every_document(server: Server, **params: Any) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    url = f"{server.base}/datasets/mmc4"
    offset = 0
    while True:
        r = requests.get(url, headers=server.auth, params={**params, "offset": offset}, timeout=10)
        assert r.status_code == 200, r.text
        page = r.json()
        docs += page["documents"]
        offset += len(page["documents"])
        if not page["documents"]:
            assert offset == page["total"]
            return docs


def test_the_seed_pages_example_client_works_unchanged(server: Server) -> None:
    # The example client of the hosted dataset page, pointed at this server.
    API_TOKEN = server.token
    response = requests.get(
        f"{server.base}/datasets/mmc4",
        headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
        params={"limit": 10, "offset": 0},
    )
    data = response.json()
    printed = []
    for doc in data.get("documents", []):
        printed.append(f"Document ID: {doc['id']}")
        printed.append(f"Text length: {len(doc['text'])} chars")
        printed.append(f"Images: {len(doc['images'])} items")
    assert response.status_code == 200
    assert len(data["documents"]) == 10
    assert printed[0] == "Document ID: docs_shard_0_v2:0"


def test_documents_carry_text_images_and_where_they_came_from(
    server: Server, corpus: Corpus
) -> None:
    recs = records(corpus)
    docs = every_document(server, limit=9)
    assert len(docs) == corpus.docs  # every document, the lines that are not JSON left out
    assert len({d["id"] for d in docs}) == len(docs)
    shard_lines = {
        s: (corpus.output / status.SHARDS_DIR / f"{s}.jsonl").read_bytes().splitlines()
        for s in corpus.shards
    }
    stored = 0
    for doc in docs:
        source = orjson.loads(shard_lines[doc["shard"]][doc["line"]])
        assert doc["id"] == f"{doc['shard']}:{doc['line']}"
        assert doc["text_list"] == source["text_list"]
        assert doc["text"] == " ".join(source["text_list"])
        assert doc["url"] == source["url"]
        assert len(doc["images"]) == len(source["image_info"])
        for image, info in zip(doc["images"], source["image_info"], strict=True):
            rec = recs[(doc["shard"], info["image_name"])]
            assert image["image_name"] == info["image_name"]
            assert image["raw_url"] == info["raw_url"]
            assert image["matched_text_index"] == info["matched_text_index"]
            assert image["matched_sim"] == info["matched_sim"]
            assert image["status"] == rec["status"]
            if rec["status"] == "ok":
                stored += 1
                assert (image["width"], image["height"]) == (rec["width"], rec["height"])
                assert image["mimetype"] == rec["mimetype"]
                assert image["url"].endswith(f"/{doc['shard']}/{info['image_name']}")
            else:
                assert image["url"] is None
    assert stored > 10
    assert any(i["status"] != "ok" for d in docs for i in d["images"])


def test_cursor_paging_visits_the_same_documents_as_offsets(server: Server) -> None:
    by_offset = [d["id"] for d in every_document(server, limit=4)]
    by_cursor: list[str] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        r = requests.get(f"{server.base}/datasets/mmc4", headers=server.auth, params=params)
        page = r.json()
        assert page["offset"] == len(by_cursor)
        by_cursor += [d["id"] for d in page["documents"]]
        if page["next"] is None:
            break
        params = {"limit": 4, "cursor": page["next"]}
    assert by_cursor == by_offset


def test_a_deep_page_is_the_documents_at_that_offset(server: Server, corpus: Corpus) -> None:
    everything = [d["id"] for d in every_document(server, limit=100)]
    for offset in (0, 1, 22, 23, 24, corpus.docs - 3):
        r = requests.get(
            f"{server.base}/datasets/mmc4",
            headers=server.auth,
            params={"limit": 5, "offset": offset},
        )
        page = r.json()
        assert [d["id"] for d in page["documents"]] == everything[offset : offset + 5]
        assert page["total"] == corpus.docs
        assert page["limit"] == 5 and page["offset"] == offset
    past = requests.get(
        f"{server.base}/datasets/mmc4", headers=server.auth, params={"offset": 10**12}
    ).json()
    assert past["documents"] == [] and past["next"] is None


def test_filters_select_by_stored_images_image_count_and_shard(
    server: Server, corpus: Corpus
) -> None:
    docs = every_document(server, limit=50)

    def stored(d: dict[str, Any]) -> int:
        return sum(i["status"] == "ok" for i in d["images"])

    def all_stored(d: dict[str, Any]) -> bool:
        return stored(d) == len(d["images"])

    second = corpus.shards[1]
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"all_stored": "true"}, all_stored),
        ({"all_stored": "true", "min_images": 1}, lambda d: d["images"] and all_stored(d)),
        ({"min_stored": 2}, lambda d: stored(d) >= 2),
        ({"min_images": 3}, lambda d: len(d["images"]) >= 3),
        ({"shard": second}, lambda d: d["shard"] == second),
        ({"shard": second, "min_stored": 1}, lambda d: d["shard"] == second and stored(d) >= 1),
    ]
    for params, wanted in cases:
        expected = [d["id"] for d in docs if wanted(d)]
        assert 0 < len(expected) < len(docs), params
        got = every_document(server, limit=3, **params)
        assert [d["id"] for d in got] == expected, params
        first = requests.get(
            f"{server.base}/datasets/mmc4", headers=server.auth, params={**params, "limit": 1}
        ).json()
        assert first["total"] == len(expected)


def test_one_document_by_id_and_404_for_unknown_ids(server: Server) -> None:
    page = requests.get(f"{server.base}/datasets/mmc4?limit=30", headers=server.auth).json()
    for doc in page["documents"][::7]:
        r = requests.get(f"{server.base}/datasets/mmc4/{doc['id']}", headers=server.auth)
        assert r.status_code == 200 and r.json() == doc
    for unknown in ("docs_shard_0_v2:9999", "nope:1", "docs_shard_0_v2:23", "x", "a:b:c"):
        r = requests.get(f"{server.base}/datasets/mmc4/{unknown}", headers=server.auth)
        assert r.status_code == 404, unknown
        assert r.json()["error"] == "not_found"


def test_stored_images_are_served_with_type_etag_range_and_caching(
    server: Server, corpus: Corpus
) -> None:
    recs = records(corpus)
    docs = every_document(server, limit=100)
    served = 0
    for doc in docs:
        for image in doc["images"]:
            if image["url"] is None:
                continue
            rec = recs[(doc["shard"], image["image_name"])]
            body = (corpus.output / rec["path"]).read_bytes()
            r = requests.get(server.base + image["url"], headers=server.auth)
            assert r.status_code == 200
            assert r.content == body
            assert r.headers["Content-Type"] == rec["mimetype"] == image["mimetype"]
            assert "max-age=" in r.headers["Cache-Control"]
            etag = r.headers["ETag"]
            again = requests.get(
                server.base + image["url"], headers={**server.auth, "If-None-Match": etag}
            )
            assert again.status_code == 304 and again.content == b""
            part = requests.get(
                server.base + image["url"], headers={**server.auth, "Range": "bytes=10-99"}
            )
            assert part.status_code == 206 and part.content == body[10:100]
            assert part.headers["Content-Range"] == f"bytes 10-99/{len(body)}"
            served += 1
    assert served >= 10
    assert {i["mimetype"] for d in docs for i in d["images"] if i["url"]} >= {
        "image/jpeg", "image/png", "image/webp", "image/gif"
    }  # fmt: skip
    for missing in (
        f"/datasets/mmc4/images/{corpus.shards[0]}/nothing.jpg",
        "/datasets/mmc4/images/unknown_shard/x.jpg",
        f"/datasets/mmc4/images/{corpus.shards[0]}/..%2F..%2Fetc%2Fpasswd",
        f"/datasets/mmc4/images/{corpus.shards[0]}/.hidden",
    ):
        r = requests.get(server.base + missing, headers=server.auth)
        assert r.status_code == 404, missing


def test_no_or_wrong_token_is_401_with_www_authenticate_and_never_logged(
    server: Server, corpus: Corpus
) -> None:
    page = requests.get(f"{server.base}/datasets/mmc4?limit=1", headers=server.auth).json()
    doc_id = page["documents"][0]["id"]
    wrong = "Bearer " + "x" * 43
    for path in ("/datasets/mmc4", f"/datasets/mmc4/{doc_id}", "/datasets/mmc4/images/a/b.jpg"):
        for headers in ({}, {"Authorization": wrong}, {"Authorization": f"Basic {server.token}"}):
            r = requests.get(server.base + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["error"] == "unauthorized"
    assert requests.get(f"{server.base}/openapi.json").status_code == 200
    log = server.log.read_text()
    assert server.token not in log and "x" * 43 not in log


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
        ("min_images=-2", "min_images"),
        ("min_stored=lots", "min_stored"),
        ("all_stored=maybe", "all_stored"),
        ("shard=nope", "shard"),
        ("cursor=nope", "cursor"),
        ("cursor=docs_shard_0_v2:3&offset=2", "offset"),
        ("limit=5&limit=6", "limit"),
        ("lmit=5", "lmit"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    server: Server, query: str, parameter: str
) -> None:
    r = requests.get(f"{server.base}/datasets/mmc4?{query}", headers=server.auth)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "bad_parameter" and body["parameter"] == parameter
    assert parameter in body["message"]


def test_the_limit_is_capped_at_1000(server: Server) -> None:
    r = requests.get(f"{server.base}/datasets/mmc4?limit=1000", headers=server.auth)
    assert r.status_code == 200 and r.json()["limit"] == 1000


def test_url_duplicates_are_left_out_when_configured(
    corpus: Corpus, tmp_path: Path, server: Server
) -> None:
    flagged = [d["id"] for d in every_document(server, limit=100) if d["could_have_url_duplicate"]]
    assert len(flagged) == len(corpus.shards)
    with serving(corpus.output, tmp_path / "log", "corpus.skip_url_duplicates=true") as srv:
        ids = [d["id"] for d in every_document(srv, limit=10)]
        assert len(ids) == corpus.docs - len(flagged)
        assert not set(flagged) & set(ids)
        r = requests.get(f"{srv.base}/datasets/mmc4/{flagged[0]}", headers=srv.auth)
        assert r.status_code == 404


def test_shards_appear_while_the_server_runs_and_reindexing_keeps_ids(
    corpus: Corpus, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(corpus.output, output)
    shutil.rmtree(output / "_dataset")
    with serving(output, tmp_path / "log") as srv:
        url = f"{srv.base}/datasets/mmc4"
        assert requests.get(url, headers=srv.auth).json()["total"] == 0
        done = subprocess.run(
            [sys.executable, "-m", "crawler", "--output", str(output), "dataset-index"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"{len(corpus.shards)} shards indexed" in done.stdout
        new = write_docs(
            output / "_shards" / "extra_shard.jsonl", [image_doc([]) for _ in range(4)]
        )
        index_shard(LocalTree(output), "extra_shard", str(new))
        deadline = time.monotonic() + 10
        while requests.get(url, headers=srv.auth).json()["total"] != corpus.docs + 4:
            assert time.monotonic() < deadline, "new shards never appeared"
            time.sleep(0.1)
        last = requests.get(url, headers=srv.auth, params={"offset": corpus.docs}).json()
        assert [d["id"] for d in last["documents"]] == [f"extra_shard:{i}" for i in range(4)]
        assert last["documents"][0]["images"] == []


def test_the_server_refuses_to_start_without_a_token(corpus: Corpus) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "--output", str(corpus.output), "serve-dataset"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "dataset-token" in done.stderr


def test_dataset_token_prints_a_token_and_the_hash_the_server_accepts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "crawler", "dataset-token"], capture_output=True, text=True
    )
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    from crawler.dataset.auth import TokenCheck

    check = TokenCheck([lines["hash"].strip()])
    assert check.accepts(f"Bearer {lines['token'].strip()}")
    assert not check.accepts(f"Bearer {lines['token'].strip()}x")


# ---- property-based: the running server against its own OpenAPI document ------------------


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.specs.openapi.checks.status_code_conformance,
    schemathesis.specs.openapi.checks.content_type_conformance,
    schemathesis.specs.openapi.checks.response_schema_conformance,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_allowed_or_forbidden_by_the_schema_gets_a_5xx(
    server: Server, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 3
    session = requests.Session()
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def property_holds(case: Any) -> None:
            case.call_and_validate(
                base_url=server.base, session=session, headers=server.auth, checks=CHECKS
            )

        property_holds()


def test_a_shard_whose_files_no_longer_match_its_meta_answers_503_not_garbage(
    corpus: Corpus, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(corpus.output, output)
    docs = output / "_dataset" / f"{corpus.shards[0]}.docs.jsonl"
    with serving(output, tmp_path / "log") as srv:
        docs.write_bytes(docs.read_bytes()[:-100])  # as if caught in the middle of re-indexing
        r = requests.get(
            f"{srv.base}/datasets/mmc4", headers=srv.auth, params={"shard": corpus.shards[0]}
        )
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "reindexing"
        other = requests.get(
            f"{srv.base}/datasets/mmc4", headers=srv.auth, params={"shard": corpus.shards[1]}
        )
        assert other.status_code == 200 and other.json()["documents"]
