"""Deadlines of an attempt: adapted to what its host has shown, one across all its hops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import pytest
from crawling import crawl, crawl_config, image_doc, report, within, write_docs

from core import fetch
from core.config import FetchConfig
from core.deadlines import ResponseTimes
from core.session import client_session
from testweb import ImageWeb


def hop_chain(web: ImageWeb, tag: str, wait_ms: int) -> str:
    """host 0 -> host 1 -> host 2 -> an image on host 3; each redirect answers after wait_ms."""
    url = web.url(3, f"/img/64x64/{tag}.jpg")
    for host in (2, 1, 0):
        url = web.url(host, f"/fault/redirect-to/{quote(url, safe='')}?wait_ms={wait_ms}")
    return url


async def test_one_deadline_covers_an_attempt_across_its_cross_host_redirects(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """Three cross-host hops of 0.6 s each: within a 3 s deadline the image is fetched; with a
    1.5 s deadline every hop alone would fit, but the attempt as a whole does not."""
    urls = [hop_chain(web, f"{namespace}-fits", 600), hop_chain(web, f"{namespace}-late", 600)]
    docs = [image_doc([urls[0]]), image_doc([urls[1]])]
    fits = write_docs(tmp_path / "hops_fit.jsonl", docs[:1])
    late = write_docs(tmp_path / "hops_late.jsonl", docs[1:])
    cfg = crawl_config(namespace, tmp_path, fetch={"total_timeout_s": 3.0, "max_attempts": 1})
    await crawl(cfg, [str(fits)])
    [ok] = report(cfg, "hops_fit").values()
    assert ok["status"] == "ok"
    cfg = crawl_config(namespace, tmp_path, fetch={"total_timeout_s": 1.5, "max_attempts": 1})
    await crawl(cfg, [str(late)])
    [timed_out] = report(cfg, "hops_late").values()
    assert timed_out["status"] == "timeout"
    assert "(hop 3)" in timed_out["error"]
    target = f"/img/64x64/{namespace}-late.jpg"
    assert not [a for a in web.arrivals if a.path == target]


def test_a_hosts_deadline_follows_its_slowest_recent_responses_within_floor_and_ceiling() -> None:
    times = ResponseTimes(floor_s=1.0, ceiling_s=30.0)
    assert times.deadline_s("fast.example") is None  # nothing heard: the ceiling applies
    for _ in range(3):
        times.observe("fast.example", 0.1)
        times.observe("slow.example", 2.0)
    assert times.deadline_s("fast.example") == 1.0  # 2 x 0.1 s, raised to the floor
    assert times.deadline_s("slow.example") == 4.0  # 2 x 2 s
    times.observe("slow.example", 20.0)
    assert times.deadline_s("slow.example") == 30.0  # capped by the ceiling


def test_a_host_not_heard_from_gets_the_workers_usual_deadline_not_the_slowest_hosts() -> None:
    times = ResponseTimes(floor_s=0.5, ceiling_s=30.0)
    for i in range(50):
        times.observe(f"host{i}.example", 0.3)
    times.observe("slow.example", 25.0)
    assert times.deadline_s("new.example") == pytest.approx(0.6)  # 2 x the 90th percentile


async def test_a_server_that_never_answers_is_given_up_at_its_hosts_deadline(
    web: ImageWeb,
) -> None:
    """A 30 s ceiling, but the host has answered in milliseconds: the request that never gets
    an answer ends at the host's own deadline (the floor, 0.5 s)."""
    cfg = FetchConfig(total_timeout_s=30.0, min_timeout_s=0.5, allow_private_addresses=True)
    session = client_session(cfg, max_connections=8)
    fetcher = fetch.Fetcher(cfg, session, max_connections=8)
    try:
        for i in range(3):
            assert (await fetcher.fetch(web.url(5, f"/img/8x8/quick-{i}.jpg"))).ok
        hung = await within(10, fetcher.fetch(web.url(5, "/fault/hang/never")))
    finally:
        await session.close()
    assert hung.status == "timeout" and hung.transient  # the host answered nothing meanwhile
    assert hung.error == "deadline exceeded (no response headers; 0.5 s for this host)"


async def test_a_request_started_before_anything_was_heard_gets_the_deadline_learnt_meanwhile(
    web: ImageWeb,
) -> None:
    cfg = FetchConfig(total_timeout_s=30.0, min_timeout_s=0.5, allow_private_addresses=True)
    session = client_session(cfg, max_connections=8)
    fetcher = fetch.Fetcher(cfg, session, max_connections=8)
    try:
        hang = asyncio.ensure_future(fetcher.fetch(web.url(4, "/fault/hang/first")))
        for i in range(3):
            assert (await fetcher.fetch(web.url(4, f"/img/8x8/then-{i}.jpg"))).ok
        hung = await within(10, hang)
    finally:
        await session.close()
    assert hung.status == "timeout"
    assert "s for this host" in hung.error  # the learnt deadline ended it, not the 30 s


async def test_a_url_that_times_out_while_its_host_answers_others_is_retried_once_only(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """One URL of a host never answers while the host serves its other images: the fault is
    that URL's, and it gets two attempts of the five; a flaky 503 on the same host is still
    retried."""
    tag = namespace
    urls = [web.url(2, f"/fault/hang/{tag}")]
    urls += [web.url(2, f"/fault/slow/300/16x16/{tag}-{i}.jpg") for i in range(12)]
    urls += [web.url(2, f"/fault/flaky/1/{tag}/16x16/flaky.jpg")]
    shard = write_docs(tmp_path / "hang_shard.jsonl", [image_doc(urls)])
    cfg = crawl_config(
        namespace, tmp_path,
        fetch={"total_timeout_s": 20.0, "min_timeout_s": 1.5, "max_attempts": 5},
        limits={"host_concurrency": 4},
    )  # fmt: skip
    await crawl(cfg, [str(shard)])
    records = {r["raw_url"]: r for r in report(cfg, "hang_shard").values()}
    hung = records.pop(urls[0])
    assert (hung["status"], hung["attempts"]) == ("timeout", 2)
    assert {r["status"] for r in records.values()} == {"ok"}
    assert records[urls[-1]]["attempts"] == 2
    assert len([a for a in web.arrivals if a.path == f"/fault/hang/{tag}"]) == 2


async def test_a_url_that_fails_while_its_host_serves_others_gets_two_requests_only(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """A reset and a 503 that stay so, queued behind images their host serves: two requests
    each of the five attempts, the 503's second after its Retry-After; a one-off reset and a
    one-off 429 on the same host are recovered by their second request."""
    tag = namespace
    reset = f"/fault/reset/16x16/{tag}-reset.jpg"
    unavailable = f"/fault/retry-after/503/1/{tag}"
    urls = [web.url(1, f"/fault/slow/300/16x16/{tag}-{i}.jpg") for i in range(8)]
    urls += [web.url(1, p) for p in (reset, unavailable)]
    urls += [
        web.url(1, f"/fault/flaky-reset/1/{tag}/16x16/flaky-reset.jpg"),
        web.url(1, f"/fault/flaky/1/{tag}/16x16/flaky.jpg?status=429&retry_after=1"),
    ]
    shard = write_docs(tmp_path / "fail_shard.jsonl", [image_doc(urls)])
    cfg = crawl_config(
        namespace, tmp_path, fetch={"max_attempts": 5}, limits={"host_concurrency": 4}
    )
    await crawl(cfg, [str(shard)])
    records = {r["raw_url"]: r for r in report(cfg, "fail_shard").values()}
    assert (records[urls[8]]["status"], records[urls[8]]["attempts"]) == ("connection_error", 2)
    assert (records[urls[9]]["status"], records[urls[9]]["attempts"]) == ("http_503", 2)
    assert "the host served other requests meanwhile" in records[urls[9]]["error"]
    assert [records[u]["attempts"] for u in urls[10:]] == [2, 2]
    assert {records[u]["status"] for u in urls[:8] + urls[10:]} == {"ok"}
    assert len([a for a in web.arrivals if a.path == reset]) == 2
    first, second = [a for a in web.arrivals if a.path == unavailable]
    assert second.start - first.end >= 1.0  # its Retry-After


async def test_a_slow_host_keeps_getting_its_images(web: ImageWeb) -> None:
    """Every answer takes 0.4 s, twice the floor: the host's deadline grows with what it has
    shown, so none of its images is cut off."""
    cfg = FetchConfig(total_timeout_s=10.0, min_timeout_s=0.2, allow_private_addresses=True)
    session = client_session(cfg, max_connections=8)
    fetcher = fetch.Fetcher(cfg, session, max_connections=8)
    try:
        results = [
            await fetcher.fetch(web.url(3, f"/fault/slow/400/8x8/patient-{i}.jpg"))
            for i in range(6)
        ]
    finally:
        await session.close()
    assert [r.status for r in results] == ["ok"] * 6
