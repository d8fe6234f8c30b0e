"""End to end: shards in, one correct terminal record per image, correct files, polite hosts.

Real Redis, real HTTP against the loopback image web, in-process workers.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any
from urllib.parse import quote

import magic
import pytest
from crawling import crawl, crawl_config, image_doc, report, write_docs
from PIL import Image

from core.config import Config
from testweb import ImageWeb, check_concurrency, check_rate

# path on the web -> expected terminal status
CASES: dict[str, str] = {
    "/img/2400x1600/big.jpg": "ok",
    "/img/640x480/mid.jpg": "ok",
    "/img/300x200/small.png": "ok",
    "/img/1200x900/wide.webp": "ok",
    "/img/900x1500/tall.png?mode=RGBA": "ok",
    "/img/1000x800/anim.gif?frames=4": "ok",
    "/img/1600x1200/cmyk.jpg?mode=cmyk": "ok",
    "/img/1000x600/rotated.jpg?exif=6": "ok",
    "/img/500x400/wrongtype.jpg?ctype=text/html": "ok",
    "/fault/gzip/700x500/gz.jpg": "ok",
    "/fault/redirect/2/800x600/hop.jpg": "ok",
    "/fault/flaky/1/e2e-flaky/400x300/fl.jpg": "ok",
    "/fault/optout/otherbot%3A%20noai/300x300/other.jpg": "ok",
    "/fault/status/404": "http_404",
    "/fault/status/410": "http_410",
    "/fault/status/500": "http_500",
    "/fault/retry-after/429/1": "http_429",
    "/fault/html": "not_an_image",
    "/fault/svg": "not_an_image",
    "/fault/empty": "not_an_image",
    "/fault/truncated/800x600.jpg": "decode_error",
    "/fault/truncated/640x480.png": "decode_error",
    "/fault/corrupt": "decode_error",
    "/fault/bomb": "too_many_pixels",
    "/fault/huge/3000000": "too_large",
    "/fault/huge/3000000?cl=0": "too_large",
    "/fault/redirect-loop": "too_many_redirects",
    "/fault/redirect/9": "too_many_redirects",
    "/fault/optout/noai/300x300/a.jpg": "opted_out",
    "/fault/optout/noimageai/300x300/b.jpg": "opted_out",
    "/fault/optout/googlebot%3A%20noai/300x300/c.jpg": "opted_out",
    "/fault/reset/900x700/r.jpg": "connection_error",
    "/fault/drop": "connection_error",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cases_shard(web: ImageWeb, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A shard with every case, spread over the hosts; returns (path, name->status, name->url)."""
    web.reset_flaky()
    urls = [web.url(i % 6, path) for i, path in enumerate(CASES)]
    expected = dict(zip(urls, CASES.values(), strict=True))
    docs = [image_doc(urls[i : i + 4]) for i in range(0, len(urls), 4)]
    names = {info["image_name"]: info["raw_url"] for d in docs for info in d["image_info"]}
    path = write_docs(tmp_path / "cases_shard_0.jsonl", docs)
    by_name = {n: expected[u] for n, u in names.items()}
    return path, by_name, names


async def crawl_cases(
    namespace: str, tmp_path: Path, path: Path
) -> tuple[Config, dict[str, dict[str, Any]]]:
    """Crawl the cases shard (two attempts); its configuration and report. No case waits for
    a deadline: theirs (30 s) only bounds a hang, however busy the machine."""
    deadline = {"total_timeout_s": 30.0, "min_timeout_s": 30.0, "connect_timeout_s": 30.0}
    cfg = crawl_config(namespace, tmp_path, fetch={"max_attempts": 2, **deadline})
    await crawl(cfg, [str(path)])
    return cfg, report(cfg, "cases_shard_0")


async def test_every_image_gets_exactly_one_correct_terminal_record(
    web: ImageWeb,
    namespace: str,
    tmp_path: Path,
    cases_shard: tuple[Path, dict[str, str], dict[str, str]],
) -> None:
    path, expected, urls = cases_shard
    cfg, records = await crawl_cases(namespace, tmp_path, path)
    assert set(records) == set(expected)
    got = {name: rec["status"] for name, rec in records.items()}
    assert got == expected
    for name, rec in records.items():
        assert rec["raw_url"] == urls[name]
        assert rec["time"] > 0
        if rec["status"] != "ok":
            assert rec["path"] == "" and not (cfg.output_dir / "cases_shard_0" / name).exists()
            assert rec["error"], name


async def test_a_body_that_trickles_past_the_deadline_gets_one_timeout_record(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    url = web.url(2, f"/fault/trickle/2000/1200x900/{namespace}.jpg")  # a minute's worth
    shard = write_docs(tmp_path / "trickle_shard.jsonl", [image_doc([url], ["t.jpg"])])
    cfg = crawl_config(namespace, tmp_path, fetch={"max_attempts": 2, "total_timeout_s": 1.0})
    await crawl(cfg, [str(shard)])
    (rec,) = report(cfg, "trickle_shard").values()
    assert rec["status"] == "timeout" and rec["path"] == ""
    assert rec["error"].startswith("deadline exceeded (") and "body bytes read" in rec["error"]
    assert not (cfg.output_dir / "trickle_shard" / "t.jpg").exists()


async def test_stored_files_are_whole_images_within_bounds(
    web: ImageWeb,
    namespace: str,
    tmp_path: Path,
    cases_shard: tuple[Path, dict[str, str], dict[str, str]],
) -> None:
    path, _expected, _urls = cases_shard
    cfg, records = await crawl_cases(namespace, tmp_path, path)
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == 13
    for rec in ok:
        data = (cfg.output_dir / rec["path"]).read_bytes()
        assert rec["path"] == f"cases_shard_0/{rec['image_name']}"
        assert len(data) == rec["bytes"] and sha256(data) == rec["sha256"]
        assert magic.from_buffer(data, mime=True) == rec["mimetype"]
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.size == (rec["width"], rec["height"])
        assert max(rec["width"], rec["height"]) <= 800
        assert max(rec["width"], rec["height"]) == min(
            800, max(rec["orig_width"], rec["orig_height"])
        )
        ratio_in = rec["orig_width"] / rec["orig_height"]
        assert rec["width"] / rec["height"] == pytest.approx(ratio_in, rel=0.01)
    by_url = {r["raw_url"].split("/", 3)[3]: r for r in ok}
    assert (
        by_url["img/1000x600/rotated.jpg?exif=6"]["width"],
        by_url["img/1000x600/rotated.jpg?exif=6"]["height"],
    ) == (480, 800)
    assert (
        by_url["img/300x200/small.png"]["bytes"] == by_url["img/300x200/small.png"]["source_bytes"]
    )
    assert by_url["fault/flaky/1/e2e-flaky/400x300/fl.jpg"]["attempts"] == 2
    assert not list(cfg.output_dir.glob("cases_shard_0/.*")), "temporary files left behind"


async def test_transient_failures_are_retried_up_to_the_cap_and_permanent_ones_never(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """The 503 is alone on its host: a host that serves nothing gets every attempt (one that
    serves others meanwhile gets two: test_deadlines)."""
    paths = ["/fault/status/503/cap", "/fault/status/404/once", "/fault/html/once"]
    urls = [web.url(h, p) for h, p in zip((0, 5, 5), paths, strict=True)]
    shard = write_docs(tmp_path / "retry_shard.jsonl", [image_doc(urls)])
    cfg = crawl_config(namespace, tmp_path, fetch={"max_attempts": 3})
    await crawl(cfg, [str(shard)])
    records = {r["raw_url"]: r for r in report(cfg, "retry_shard").values()}
    assert [records[u]["attempts"] for u in urls] == [3, 1, 1]
    hits = web.arrivals
    assert [sum(1 for a in hits if a.path == p) for p in paths] == [3, 1, 1]


async def test_per_host_rate_and_concurrency_hold(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    rate, burst, concurrency = 10.0, 2, 2
    tag = namespace
    urls = [
        web.url(h, f"/fault/slow/50/64x64/{tag}-{h}-{i}.jpg") for h in range(3) for i in range(25)
    ]
    docs = [image_doc(urls[i : i + 5]) for i in range(0, len(urls), 5)]
    shard = write_docs(tmp_path / "polite_shard.jsonl", docs)
    cfg = crawl_config(
        namespace, tmp_path,
        limits={"host_rate": rate, "host_burst": burst, "local_host_rate": rate,
                "host_concurrency": concurrency},
    )  # fmt: skip
    await crawl(cfg, [str(shard)], workers=2)
    mine = [a for a in web.arrivals if tag in a.path]
    assert len(mine) == len(urls)
    assert check_rate(mine, rate, burst) == []
    # two workers, each capped locally: the fleet-wide GCRA keeps the rate, and each
    # worker's cap keeps the concurrency at most 2 x 2
    assert check_concurrency(mine, 2 * concurrency) == []
    statuses = {r["status"] for r in report(cfg, "polite_shard").values()}
    assert statuses == {"ok"}


async def test_a_slow_host_does_not_hold_up_the_others(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    tag = namespace
    slow = [web.url(0, f"/fault/slow/400/64x64/{tag}-s{i}.jpg") for i in range(10)]
    fast = [web.url(1 + i % 5, f"/img/64x64/{tag}-f{i}.jpg") for i in range(50)]
    shard = write_docs(tmp_path / "hol_shard.jsonl", [image_doc(slow + fast)])
    cfg = crawl_config(
        namespace, tmp_path, limits={"host_concurrency": 1, "host_rate": 100.0,
                                     "local_host_rate": 100.0},
    )  # fmt: skip
    await crawl(cfg, [str(shard)])
    arrivals = [a for a in web.arrivals if tag in a.path]
    slow_end = max(a.end for a in arrivals if "-s" in a.path)
    fast_end = max(a.end for a in arrivals if "-f" in a.path)
    # the slow host needs ~4 s one at a time; the others finish long before it does
    assert fast_end < slow_end - 2.0


async def test_private_destinations_are_refused_unless_allowed(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    tag = namespace
    port = web.port
    urls = [
        web.url(0, f"/img/64x64/{tag}-literal.jpg"),
        f"http://localhost:{port}/img/64x64/{tag}-name.jpg",
        web.url(1, "/fault/redirect-to/" + quote(web.url(2, f"/img/64x64/{tag}-hop.jpg"), safe="")),
    ]
    shard = write_docs(tmp_path / "ssrf_shard.jsonl", [image_doc(urls)])
    cfg = crawl_config(namespace, tmp_path, fetch={"allow_private_addresses": False})
    await crawl(cfg, [str(shard)])
    statuses = sorted(r["status"] for r in report(cfg, "ssrf_shard").values())
    assert statuses == ["blocked_address"] * 3
    assert not [a for a in web.arrivals if tag in a.path]


async def test_retry_after_slows_the_host_down(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    tag = namespace
    urls = [web.url(3, f"/fault/flaky/1/{tag}/64x64/x.jpg?status=429&retry_after=1")]
    urls += [web.url(3, f"/img/64x64/{tag}-after{i}.jpg") for i in range(3)]
    shard = write_docs(tmp_path / "ra_shard.jsonl", [image_doc(urls)])
    cfg = crawl_config(namespace, tmp_path, limits={"host_concurrency": 1})
    await crawl(cfg, [str(shard)])
    arrivals = sorted((a for a in web.arrivals if tag in a.path), key=lambda a: a.start)
    first_429 = next(a for a in arrivals if a.status == 429)
    later = [a for a in arrivals if a.start > first_429.start]
    assert later and min(a.start for a in later) >= first_429.end + 0.9
    assert {r["status"] for r in report(cfg, "ra_shard").values()} == {"ok"}


async def test_bodies_waiting_for_image_work_stay_within_the_budget(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """Unlimited hosts on loopback: fetching outruns the one image process. Once the waiting
    bodies pass the budget no new request starts, so at most the budget plus the requests
    already in flight (six hosts, one each) ever wait, not the whole window."""
    tag = namespace
    urls = [web.url(i % 6, f"/img/1600x1200/{tag}-{i}.png") for i in range(60)]
    docs = [image_doc(urls[i : i + 6]) for i in range(0, len(urls), 6)]
    shard = write_docs(tmp_path / "budget_shard.jsonl", docs)
    cfg = crawl_config(
        namespace, tmp_path,
        worker={"max_waiting_image_mb": 1},
        limits={"host_rate": 0, "local_host_rate": 0, "host_concurrency": 1},
    )  # fmt: skip
    [worker] = await crawl(cfg, [str(shard)])
    records = report(cfg, "budget_shard").values()
    assert {r["status"] for r in records} == {"ok"}
    largest = max(r["source_bytes"] for r in records)
    bound = (1 << 20) + 6 * largest  # six hosts, one request each
    assert sum(r["source_bytes"] for r in records) > 4 * bound
    assert worker.stats.peak_waiting_bytes <= bound


async def test_a_redirect_to_another_host_is_held_to_that_hosts_limits(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """Ten images on five hosts all redirect to a sixth: the sixth host's rate holds, although
    each origin host alone would allow its requests at once."""
    rate, burst = 4.0, 1
    tag = namespace
    targets = [web.url(5, f"/img/64x64/{tag}-target-{i}.jpg") for i in range(10)]
    urls = [
        web.url(i % 5, "/fault/redirect-to/" + quote(t, safe="")) for i, t in enumerate(targets)
    ]
    shard = write_docs(tmp_path / "hop_shard.jsonl", [image_doc(urls[:5]), image_doc(urls[5:])])
    cfg = crawl_config(
        namespace, tmp_path,
        limits={"host_rate": rate, "host_burst": burst, "local_host_rate": rate,
                "host_concurrency": 4},
    )  # fmt: skip
    await crawl(cfg, [str(shard)])
    records = report(cfg, "hop_shard").values()
    assert {r["status"] for r in records} == {"ok"}
    at_target = [a for a in web.arrivals if a.path.startswith(f"/img/64x64/{tag}-target-")]
    assert len(at_target) == 10
    # Arrivals are stamped by the test web in this test's process: on a loaded machine the time
    # from a permit to its request's arrival varies by tens of ms. Without the limit, four
    # requests (host_concurrency) would arrive together and still fail by far.
    assert check_rate(at_target, rate, burst, tolerance=0.05) == []
