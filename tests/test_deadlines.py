"""Deadlines of an attempt: one deadline across all of an attempt's redirect hops."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from crawling import crawl, crawl_config, image_doc, report, write_docs

from crawler.testweb import ImageWeb


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
