"""The loopback image web: real HTTP over 127.0.0.x with aiohttp's client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from testweb import (
    Arrival,
    ImageWeb,
    Latency,
    check_concurrency,
    check_rate,
    make_docs,
    max_concurrency,
    min_interval,
    read_arrivals,
    start_subprocess,
    write_shard,
)
from testweb.__main__ import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tw() -> Iterator[ImageWeb]:
    """One web for the module, on its own loop in a thread (tests run in their own loops)."""
    with ImageWeb(hosts=3).running_in_thread() as web:
        yield web


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def fetch(
    session: aiohttp.ClientSession, url: str, **kw: object
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp, await resp.read()


def test_addresses(tw: ImageWeb) -> None:
    assert tw.port > 0
    assert tw.host_urls == [f"http://127.0.0.{i}:{tw.port}" for i in (2, 3, 4)]
    assert tw.url(2, "img/1x1/a.jpg") == f"http://127.0.0.4:{tw.port}/img/1x1/a.jpg"


@pytest.mark.parametrize(
    ("path", "fmt", "size", "mode", "frames"),
    [
        ("/img/320x240/a.jpg", "JPEG", (320, 240), "RGB", 1),
        ("/img/200x300/a.png", "PNG", (200, 300), "RGB", 1),
        ("/img/150x100/a.webp", "WEBP", (150, 100), "RGB", 1),
        ("/img/120x90/a.gif", "GIF", (120, 90), "P", 1),
        ("/img/90x60/a.jpg?mode=cmyk", "JPEG", (90, 60), "CMYK", 1),
        ("/img/90x60/a.png?mode=P&transparency=1", "PNG", (90, 60), "P", 1),
        ("/img/90x60/a.png?mode=I;16", "PNG", (90, 60), "I;16", 1),
        ("/img/90x60/a.png?mode=I%3B16", "PNG", (90, 60), "I;16", 1),
        ("/img/90x60/a.png?mode=RGBA", "PNG", (90, 60), "RGBA", 1),
        ("/img/90x60/a.webp?mode=RGBA", "WEBP", (90, 60), "RGBA", 1),
        ("/img/90x60/a.png?mode=L", "PNG", (90, 60), "L", 1),
        ("/img/64x48/a.gif?frames=5", "GIF", (64, 48), "P", 5),
        ("/img/64x48/a.webp?frames=5", "WEBP", (64, 48), "RGB", 5),
    ],
)
async def test_image_kinds(
    tw: ImageWeb,
    session: aiohttp.ClientSession,
    path: str,
    fmt: str,
    size: tuple[int, int],
    mode: str,
    frames: int,
) -> None:
    resp, body = await fetch(session, tw.url(1, path))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == Image.MIME[fmt]
    with Image.open(io.BytesIO(body)) as im:
        assert (im.format, im.size, im.mode) == (fmt, size, mode)
        assert getattr(im, "n_frames", 1) == frames
        im.load()
        if "transparency=1" in path:
            assert "transparency" in im.info


async def test_exif_orientation(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    _, body = await fetch(session, tw.url(0, "/img/120x80/r.jpg?exif=6"))
    with Image.open(io.BytesIO(body)) as im:
        assert im.size == (120, 80)
        assert im.getexif()[0x0112] == 6
        assert ImageOps.exif_transpose(im).size == (80, 120)


async def test_jpeg_size_is_realistic_and_deterministic(
    tw: ImageWeb, session: aiohttp.ClientSession
) -> None:
    _, a = await fetch(session, tw.url(0, "/img/800x600/photo.jpg"))
    _, b = await fetch(session, tw.url(2, "/img/800x600/photo.jpg"))
    _, c = await fetch(session, tw.url(0, "/img/800x600/other.jpg"))
    assert a == b != c
    assert 30_000 < len(a) < 250_000  # roughly 0.5-4 bits per pixel, like a photo


async def test_wrong_content_type(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    resp, body = await fetch(session, tw.url(0, "/img/50x50/x.jpg?ctype=text/html"))
    assert resp.headers["Content-Type"] == "text/html"
    assert Image.open(io.BytesIO(body)).format == "JPEG"


async def test_bad_spec_is_400(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    for path in ("/img/10x10/a.bmp", "/img/10x10/a.jpg?mode=RGBA", "/img/axb/a.jpg", "/nope"):
        resp, _ = await fetch(session, tw.url(0, path))
        assert resp.status in (400, 404), path


@pytest.mark.parametrize("code", [404, 403, 410, 500, 502, 503])
async def test_status(tw: ImageWeb, session: aiohttp.ClientSession, code: int) -> None:
    resp, _ = await fetch(session, tw.url(0, f"/fault/status/{code}/anything"))
    assert resp.status == code


@pytest.mark.parametrize(("code", "seconds"), [(429, "3"), (503, "7")])
async def test_retry_after(
    tw: ImageWeb, session: aiohttp.ClientSession, code: int, seconds: str
) -> None:
    resp, _ = await fetch(session, tw.url(0, f"/fault/retry-after/{code}/{seconds}"))
    assert resp.status == code
    assert resp.headers["Retry-After"] == seconds


async def test_flaky_turns_good(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    statuses = []
    for i in range(4):
        resp, body = await fetch(session, tw.url(i % 3, "/fault/flaky/2/fl-one"))
        statuses.append(resp.status)
    assert statuses == [503, 503, 200, 200]
    assert Image.open(io.BytesIO(body)).format == "JPEG"
    resp, _ = await fetch(session, tw.url(0, "/fault/flaky/1/fl-two/30x20.png?status=500"))
    assert resp.status == 500
    resp, body = await fetch(session, tw.url(0, "/fault/flaky/1/fl-two/30x20.png?status=500"))
    assert resp.status == 200
    assert Image.open(io.BytesIO(body)).size == (30, 20)


async def test_redirects(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    resp, body = await fetch(session, tw.url(0, "/fault/redirect/3/40x30/r.png?mode=L"))
    assert resp.status == 200
    assert len(resp.history) == 3
    with Image.open(io.BytesIO(body)) as im:
        assert (im.format, im.size, im.mode) == ("PNG", (40, 30), "L")
    resp, _ = await fetch(session, tw.url(0, "/fault/redirect/1"), allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/fault/redirect/0"
    with pytest.raises(aiohttp.TooManyRedirects):
        await fetch(session, tw.url(0, "/fault/redirect-loop"), max_redirects=6)


async def test_redirect_to_other_host(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    target = tw.url(2, "/img/33x22/moved.jpg")
    resp, body = await fetch(session, tw.url(0, "/fault/redirect-to/" + quote(target, safe="")))
    assert resp.status == 200
    assert str(resp.url) == target
    assert Image.open(io.BytesIO(body)).size == (33, 22)
    moved = tw.wait_for_arrivals(
        1, where=lambda a: a.host == "127.0.0.4" and a.path == "/img/33x22/moved.jpg"
    )
    assert len(moved) == 1
    refused = "/fault/redirect-to/" + quote("http://10.1.2.3/x.jpg", safe="")
    resp, _ = await fetch(session, tw.url(0, refused), allow_redirects=False)
    assert resp.status == 400


@pytest.mark.parametrize("path", ["/fault/reset", "/fault/reset/500x400/big.jpg", "/fault/drop"])
async def test_broken_connections(tw: ImageWeb, session: aiohttp.ClientSession, path: str) -> None:
    with pytest.raises(aiohttp.ClientError):
        await fetch(session, tw.url(1, path))
    # The web keeps serving afterwards.
    resp, _ = await fetch(session, tw.url(1, "/img/10x10/ok.jpg"))
    assert resp.status == 200


async def test_flaky_reset_turns_good(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    path = "/fault/flaky-reset/1/fr-one/40x30/fr.jpg"
    with pytest.raises(aiohttp.ClientError):
        await fetch(session, tw.url(0, path))
    resp, body = await fetch(session, tw.url(1, path))
    assert resp.status == 200
    assert Image.open(io.BytesIO(body)).size == (40, 30)


async def test_hang_never_answers_and_lets_go_when_the_client_leaves(
    tw: ImageWeb, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fetch(session, tw.url(2, "/fault/hang/h-one")), 0.5)
    [hung] = tw.wait_for_arrivals(1, 5.0, where=lambda a: a.path == "/fault/hang/h-one")
    assert hung.status == 0
    resp, _ = await fetch(session, tw.url(2, "/img/10x10/after-hang.jpg"))
    assert resp.status == 200


async def test_redirects_wait_when_asked(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    resp, _ = await fetch(session, tw.url(0, "/fault/redirect/2/8x8.jpg?wait_ms=150"))
    assert resp.status == 200
    assert time.monotonic() - t0 >= 0.3


async def test_slow_and_trickle(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    resp, body = await fetch(session, tw.url(0, "/fault/slow/300/20x20.png"))
    assert time.monotonic() - t0 >= 0.29
    assert Image.open(io.BytesIO(body)).size == (20, 20)
    _, full = await fetch(session, tw.url(0, "/img/64x64/trickle-2000.jpg"))
    t0 = time.monotonic()
    resp, body = await fetch(session, tw.url(0, "/fault/trickle/2000"))
    elapsed = time.monotonic() - t0
    assert resp.status == 200
    assert body == full  # default image: 64x64 JPEG named after the fault
    assert elapsed >= 0.8 * (len(body) / 2000) - 0.1
    assert Image.open(io.BytesIO(body)).size == (64, 64)


@pytest.mark.parametrize("cl", [True, False])
async def test_huge(tw: ImageWeb, session: aiohttp.ClientSession, cl: bool) -> None:
    size = 3_000_000
    url = tw.url(0, f"/fault/huge/{size}" + ("" if cl else "?cl=0"))
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_length == (size if cl else None)
        head = await resp.content.read(4)
        total = len(head) + len(await resp.read())
    assert head == b"\xff\xd8\xff\xe0"
    assert total == size


async def test_body_faults(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    resp, body = await fetch(session, tw.url(0, "/fault/html"))
    assert resp.status == 200 and resp.content_type == "text/html" and b"<html" in body
    resp, body = await fetch(session, tw.url(0, "/fault/svg"))
    assert resp.content_type == "image/svg+xml" and b"<svg" in body
    resp, body = await fetch(session, tw.url(0, "/fault/empty"))
    assert resp.status == 200 and body == b""
    resp, body = await fetch(session, tw.url(0, "/fault/corrupt?bytes=5000"))
    assert body[:3] == b"\xff\xd8\xff" and len(body) == 5000
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


@pytest.mark.parametrize("fmt", ["jpg", "png"])
async def test_truncated(tw: ImageWeb, session: aiohttp.ClientSession, fmt: str) -> None:
    _, full = await fetch(session, tw.url(0, f"/img/200x150/truncated.{fmt}"))
    resp, body = await fetch(session, tw.url(0, f"/fault/truncated/200x150.{fmt}"))
    assert resp.status == 200
    assert body == full[: len(full) // 2]
    with Image.open(io.BytesIO(body)) as im:
        assert im.size == (200, 150)
        with pytest.raises(OSError):
            im.load()


async def test_bomb(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    _, body = await fetch(session, tw.url(0, "/fault/bomb"))
    assert len(body) < 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))
    _, body = await fetch(session, tw.url(0, "/fault/bomb?size=20000x10000"))
    assert body[16:24] == (20000).to_bytes(4, "big") + (10000).to_bytes(4, "big")


async def test_gzip(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    resp, body = await fetch(session, tw.url(0, "/fault/gzip/70x50.webp"))
    assert resp.headers["Content-Encoding"] == "gzip"
    assert Image.open(io.BytesIO(body)).size == (70, 50)  # the client decompressed it
    async with aiohttp.ClientSession(auto_decompress=False) as raw_session:
        _, raw = await fetch(raw_session, tw.url(0, "/fault/gzip/70x50.webp"))
    assert gzip.decompress(raw) == body


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/fault/optout/noai", "noai"),
        ("/fault/optout/noimageai/30x30/o.png", "noimageai"),
        ("/fault/optout/googlebot%3A%20noai", "googlebot: noai"),
        ("/fault/optout/x?tag=otherbot:%20noai", "otherbot: noai"),
    ],
)
async def test_optout(tw: ImageWeb, session: aiohttp.ClientSession, path: str, header: str) -> None:
    resp, body = await fetch(session, tw.url(0, path))
    assert resp.status == 200
    assert resp.headers["X-Robots-Tag"] == header
    Image.open(io.BytesIO(body)).load()


async def test_arrivals_and_concurrency(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    log = tmp_path / "arrivals.jsonl"
    async with ImageWeb(hosts=2, log_path=log) as web:
        urls = [web.url(0, f"/fault/slow/200/{i}") for i in range(5)]
        urls += [web.url(1, f"/fault/slow/200/{i}") for i in range(2)]
        results = await asyncio.gather(*(fetch(session, u) for u in urls))
        assert all(r.status == 200 for r, _ in results)
        arrivals = web.arrivals
        assert web.max_concurrency_per_host() == {"127.0.0.2": 5, "127.0.0.3": 2}
        assert web.peak_in_flight == {"127.0.0.2": 5, "127.0.0.3": 2}
    assert len(arrivals) == 7
    assert {a.host for a in arrivals} == {"127.0.0.2", "127.0.0.3"}
    assert all(a.end - a.start >= 0.19 and a.status == 200 for a in arrivals)
    assert sorted(read_arrivals(log), key=lambda a: a.start) == sorted(
        arrivals, key=lambda a: a.start
    )
    assert check_concurrency(arrivals, 5) == []
    assert check_concurrency(arrivals, 4) == ["127.0.0.2: 5 requests in flight at once, limit 4"]


def _arr(host: str, *starts: float) -> list[Arrival]:
    return [Arrival(host, "/", t, t + 0.01, 200) for t in starts]


def test_check_rate() -> None:
    # rate 2/s, burst 3: three at once, then one every 0.5 s is exactly compliant.
    ok = _arr("h", 0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0) + _arr("g", 5.0)
    assert check_rate(ok, rate=2, burst=3) == []
    assert check_rate(ok, rate=2, burst=3, tolerance=0.0) == []
    # A fourth at t=0 exceeds the bucket.
    assert len(check_rate(_arr("h", 0, 0, 0, 0), rate=2, burst=3)) == 1
    # A violation in the middle of a long, mostly slow sequence (sliding window).
    mid = _arr("h", 0.0, 1.0, 2.0, 3.0, 3.1, 5.0, 6.0)
    errors = check_rate(mid, rate=1, burst=1)
    assert len(errors) == 1 and errors[0].startswith("h: 2 requests in 0.1000s (#3..#4)")
    assert check_rate(mid, rate=1, burst=2) == []
    # Until the bucket has refilled, every later window containing the burst is overfull too.
    assert len(check_rate(_arr("h", 0.0, 1.0, 2.0, 3.0, 3.1, 4.0), rate=1, burst=1)) == 2
    # Jitter (±4 ms around a 0.5 s grid) passes with the default 10 ms tolerance, not without;
    # a sustained rate 1% too high is caught whatever the tolerance.
    jitter = _arr("h", *(i * 0.5 + (0.004 if i % 2 else -0.004) for i in range(10)))
    assert check_rate(jitter, rate=2, burst=1) == []
    assert check_rate(jitter, rate=2, burst=1, tolerance=0.0) != []
    assert check_rate(_arr("h", *(i * 0.495 for i in range(10))), rate=2, burst=1) != []
    # Sustained overload: 20 requests in 1 s at 5/s with burst 5 is caught; capped reports.
    flood = _arr("h", *(i * 0.05 for i in range(20)))
    errors = check_rate(flood, rate=5, burst=5, max_reports=3)
    assert len(errors) == 4 and errors[-1].startswith("h: ... and")
    assert min_interval(flood)["h"] == pytest.approx(0.05)
    assert max_concurrency(_arr("h", 0.0, 0.005, 0.01, 0.02)) == {"h": 2}


async def test_latency_and_slow_hosts(session: aiohttp.ClientSession) -> None:
    latency = Latency(median_ms=60, sigma=0.0, slow_hosts=(1,), slow_delay_ms=600)
    async with ImageWeb(hosts=2, latency=latency) as web:
        assert web.slow_hosts == frozenset({1})
        for host, low, high in ((0, 0.055, 0.6), (1, 0.65, 3.0)):
            t0 = time.monotonic()
            resp, _ = await fetch(session, web.url(host, "/img/16x16/l.jpg"))
            assert resp.status == 200
            assert low <= time.monotonic() - t0 <= high
    picked = Latency(slow_host_share=0.25).pick_slow_hosts(8, seed=3)
    assert len(picked) == 2 and picked == Latency(slow_host_share=0.25).pick_slow_hosts(8, 3)


async def test_make_docs_schema_and_fetchable(tw: ImageWeb, session: aiohttp.ClientSession) -> None:
    docs = make_docs(tw, 12, seed=5, sizes="small", images_per_doc=(1, 4))
    assert docs == make_docs(tw, 12, seed=5, sizes="small", images_per_doc=(1, 4))
    assert len(docs) == 12
    for i, doc in enumerate(docs):
        assert set(doc) == {
            "text_list",
            "url",
            "image_info",
            "similarity_matrix",
            "could_have_url_duplicate",
        }
        assert doc["url"] == f"http://example.invalid/doc/{i}"
        assert doc["could_have_url_duplicate"] == 0
        assert 1 <= len(doc["image_info"]) <= 4
        assert len(doc["similarity_matrix"]) == len(doc["image_info"])
        for row, info in zip(doc["similarity_matrix"], doc["image_info"], strict=True):
            assert len(row) == len(doc["text_list"])
            assert all(isinstance(x, float) for x in row)
            assert set(info) == {
                "image_name",
                "raw_url",
                "matched_text_index",
                "matched_sim",
                "face_detections",
            }
            assert (
                info["image_name"]
                == hashlib.sha256(info["raw_url"].encode()).hexdigest()[:12] + ".jpg"
            )
            assert 0 <= info["matched_text_index"] < len(doc["text_list"])
            assert row[info["matched_text_index"]] == info["matched_sim"]
            assert info["face_detections"] is None
    urls = [info["raw_url"] for doc in docs for info in doc["image_info"]]
    assert {urlsplit(u).netloc for u in urls} <= {urlsplit(b).netloc for b in tw.host_urls}
    for url in urls:
        resp, body = await fetch(session, url)
        assert resp.status == 200, url
        with Image.open(io.BytesIO(body)) as im:
            im.load()
            assert f"/img/{im.size[0]}x{im.size[1]}/" in url


def test_make_docs_faults_and_mix() -> None:
    bases = [f"http://127.0.0.{i}:18650" for i in range(2, 10)]
    docs = make_docs(bases, 300, seed=1, faults={"404": 0.1, "flaky": 0.05})
    urls = [i["raw_url"] for d in docs for i in d["image_info"]]
    assert 800 < len(urls) < 1300
    n404 = sum("/fault/status/404/" in u for u in urls)
    nflaky = sum("/fault/flaky/" in u for u in urls)
    assert 0.05 < n404 / len(urls) < 0.15 and 0.02 < nflaky / len(urls) < 0.09
    assert len(set(urls)) == len(urls)
    clean = [u for u in urls if "/img/" in u]
    sides = [max(map(int, u.split("/img/")[1].split("/")[0].split("x"))) for u in clean]
    assert 0.02 < sum(s >= 1600 for s in sides) / len(sides) < 0.12
    assert sum(u.split("?")[0].endswith(".jpg") for u in clean) / len(clean) > 0.6
    mixed = make_docs(bases, 200, seed=2, faults=0.2)
    assert sum("/fault/" in i["raw_url"] for d in mixed for i in d["image_info"]) > 60
    with pytest.raises(ValueError):
        make_docs(bases, 1, faults={"nope": 0.1})


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz"])
def test_write_shard(tmp_path: Path, name: str) -> None:
    docs = make_docs(["http://127.0.0.2:1"], 5, seed=0)
    assert write_shard(tmp_path / name, docs) == 5
    raw = (tmp_path / name).read_bytes()
    text = gzip.decompress(raw) if name.endswith(".gz") else raw
    assert [orjson.loads(line) for line in text.splitlines()] == docs


def test_cli_shard(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    result = CliRunner().invoke(
        cli, ["shard", str(out), "--port", "18650", "--hosts", "4", "--docs", "20", "--faults"]
    )
    assert result.exit_code == 0, result.output
    docs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(docs) == 20
    hosts = {urlsplit(i["raw_url"]).netloc for d in docs for i in d["image_info"]}
    assert hosts <= {f"127.0.0.{i}:18650" for i in range(2, 6)}


async def test_serve_subprocess(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    log = tmp_path / "arr.jsonl"
    with start_subprocess(hosts=2, port=0, log_path=log) as served:
        urls = served.urls
        assert len(urls) == 2 and urls[0].startswith("http://127.0.0.2:")
        resp, _ = await fetch(session, urls[1] + "/img/8x8/p.gif")
        assert resp.status == 200
        deadline = time.monotonic() + 5
        while not (arrivals := read_arrivals(log)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert [(a.host, a.path, a.status) for a in arrivals] == [("127.0.0.3", "/img/8x8/p.gif", 200)]


def test_sample_shard() -> None:
    path = REPO / "samples" / "sample_shard.jsonl"
    assert path.stat().st_size < 1_600_000
    docs = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    urls = [i["raw_url"] for d in docs for i in d["image_info"]]
    assert len(docs) >= 250 and len(urls) >= 800
    assert {urlsplit(u).netloc for u in urls} == {f"127.0.0.{i}:18650" for i in range(2, 10)}
    faults = [u for u in urls if "/fault/" in u]
    assert 0.01 < len(faults) / len(urls) < 0.1
    for kind in ("status/404", "html", "truncated", "redirect/", "flaky"):
        assert any(f"/fault/{kind}" in u for u in faults), kind
