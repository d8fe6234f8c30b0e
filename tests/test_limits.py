"""Per-host politeness that needs a crawl to show: deferral of a busy host's excess items."""

from __future__ import annotations

import itertools
from pathlib import Path

from crawling import crawl, crawl_config, image_doc, report, write_docs
from yarl import URL

from core.config import LimitsConfig
from crawler.limits import DEFERRAL_MIN_S, HostGate, deferral_s
from testweb import ImageWeb


def test_deferral_is_half_the_backlogs_drain_time_within_bounds() -> None:
    assert deferral_s(200, 2.0) == 50.0
    assert deferral_s(200, 10_000.0) == DEFERRAL_MIN_S
    assert deferral_s(200, None) == DEFERRAL_MIN_S  # limits off, nothing finished yet
    assert deferral_s(1_000_000, 0.5) == 300.0


async def test_a_batch_takes_each_host_up_to_its_backlog_and_defers_the_rest() -> None:
    gate = HostGate(LimitsConfig(host_backlog=2, host_rate=0, local_host_rate=0), None, None)
    async with gate.slot("a.test"):  # one request of a.test already running here
        urls = [f"http://{h}.test/{i}" for i, h in enumerate("aaabbbc")]
        admitted = gate.admit(urls, lambda url: URL(url).host or "")
    assert admitted.taken == [
        ("http://a.test/0", "a.test"), ("http://b.test/3", "b.test"),
        ("http://b.test/4", "b.test"), ("http://c.test/6", "c.test"),
    ]  # fmt: skip
    assert admitted.deferred == {
        "a.test": ["http://a.test/1", "http://a.test/2"], "b.test": ["http://b.test/5"]
    }  # fmt: skip


async def test_with_limits_off_deferred_items_are_back_within_seconds_once_the_host_frees_up(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    """Rates off, a backlog of two per host, one request at a time: most of the shard's items
    are deferred, and each comes back as soon as the host has served what the worker held (at
    the rate the host was answering), not after a delay derived from a disabled rate."""
    tag = namespace
    urls = [web.url(4, f"/fault/slow/100/64x64/{tag}-{i}.jpg") for i in range(12)]
    shard = write_docs(tmp_path / "defer_shard.jsonl", [image_doc(urls[:6]), image_doc(urls[6:])])
    cfg = crawl_config(
        namespace, tmp_path,
        limits={"host_rate": 0, "local_host_rate": 0, "host_concurrency": 1, "host_backlog": 2},
    )  # fmt: skip
    [worker] = await crawl(cfg, [str(shard)])
    assert {r["status"] for r in report(cfg, "defer_shard").values()} == {"ok"}
    assert worker.stats.deferred >= 10
    starts = sorted(a.start for a in web.arrivals if tag in a.path)
    assert len(starts) == 12
    longest_idle = max(b - a for a, b in itertools.pairwise(starts))
    assert longest_idle < 10 * DEFERRAL_MIN_S  # seconds, not the minutes a rate of 1/s gave
