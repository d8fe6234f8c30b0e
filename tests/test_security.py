"""Attacks a hostile web or a hostile shard can try, each tried on loopback: the crawl refuses
them with a terminal status and the rest of the crawl is undisturbed."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import operator
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import redis
from crawling import crawl, crawl_config, image_doc, report, write_docs
from PIL import Image
from redis_server import RedisProcess
from yarl import URL

from core import connection, fetch, guard, status
from core import embedded as embedded_module
from core.budget import BodyBudget
from core.config import Config, FetchConfig
from core.embedded import EmbeddedRedis
from core.keys import EMBEDDED_IDENTITY
from core.session import client_session, guarded_socket
from core.storage import LocalStorage
from crawler import documents, images, store
from crawler.images import ImageSettings
from crawler.pool import ImageJobTimeout, ImagePool
from testweb import ImageWeb, gif_of_frames

# Spellings of 127.0.0.1 that the C library (and so `connect`) accepts.
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0177.0.0.1", "017700000001", "0x7f.1",
    "0x7f000001", "0x7F.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "localhost",
]  # fmt: skip


@pytest.fixture(scope="module")
def web1() -> Iterator[ImageWeb]:
    """An image web that also answers on 127.0.0.1 (host 0) and 127.0.0.2 (host 1)."""
    with ImageWeb(hosts=2, first_host=1, seed=3).running_in_thread() as w:
        yield w


async def _fetch_all(cfg: FetchConfig, urls: list[str]) -> list[fetch.FetchResult]:
    session = client_session(cfg, max_connections=4)
    fetcher = fetch.Fetcher(cfg, session, max_connections=4)
    try:
        return list(await asyncio.gather(*(fetcher.fetch(u) for u in urls)))
    finally:
        await session.close()


def _arrivals_on(web: ImageWeb, addr: str) -> int:
    return sum(1 for a in web.arrivals if a.host == addr)


# ---- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.1", "0", "2130706433", "0177.0.0.1", "017700000001", "0x7f.1", "2852039166",
     "0251.0376.0251.0376", "10.1", "[::1]", "[::ffff:127.0.0.1]", "[::127.0.0.1]",
     "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[2002:a9fe:a9fe::]", "[fec0::1]", "[fe80::1]",
     "[64:ff9b:1::a00:1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]"],
)  # fmt: skip
def test_a_url_naming_a_non_public_address_in_any_spelling_is_refused_at_ingest(
    host: str,
) -> None:
    refused = guard.check_url(f"http://{host}/a.jpg")
    assert refused is not None and refused[0] == status.BLOCKED_ADDRESS
    line = image_doc([f"http://{host}:8080/a.jpg"], ["a.jpg"])
    entries = documents.parse_line(orjson.dumps(line)).entries
    assert [e.problem_status for e in entries] == [status.BLOCKED_ADDRESS]


@pytest.mark.parametrize(
    "ip, public",
    [("64:ff9b::808:808", True), ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False),
     ("2002:808:808::1", True), ("2002:7f00:1::", False), ("2002:c0a8:1::", False),
     ("::127.0.0.1", False), ("::8.8.8.8", False), ("fec0::1", False), ("feff::1", False),
     ("64:ff9b:1::808:808", False), ("2001:4860:4860::8888", True), ("::ffff:8.8.8.8", True),
     ("::ffff:169.254.169.254", False), ("ff02::1", False), ("8.8.8.8", True)],
)  # fmt: skip
def test_ipv6_forms_that_carry_or_hide_a_private_address_are_not_public(
    ip: str, public: bool
) -> None:
    assert guard.is_public_address(ip) is public


def test_public_addresses_and_names_pass_the_url_check() -> None:
    for url in ("http://8.8.8.8/a.jpg", "http://134744072/a.jpg", "https://example.com/x.png",
                "http://[2001:4860:4860::8888]/a", "http://1e3.example/a"):  # fmt: skip
        assert guard.check_url(url) is None, url


@pytest.mark.parametrize(
    "url, requested",
    [("http://127.1:81/a.jpg?x=1", "http://127.0.0.1:81/a.jpg?x=1"),
     ("http://2130706433/a", "http://127.0.0.1/a"), ("https://0x7f.1/a", "https://127.0.0.1/a"),
     ("http://0177.0.0.1/a", "http://127.0.0.1/a"), ("http://134744072/a", "http://8.8.8.8/a"),
     ("http://0/a", "http://0.0.0.0/a"), ("http://8.8.8.8/a", "http://8.8.8.8/a"),
     ("http://1e3.example/a", "http://1e3.example/a"), ("http://[::ffff:7f00:1]/a",
     "http://[::ffff:7f00:1]/a"), ("http://example.com/a", "http://example.com/a")],
)  # fmt: skip
def test_a_host_spelling_an_address_another_way_is_requested_as_that_address(
    url: str, requested: str
) -> None:
    """What is requested is what the guard judged, whichever spellings the HTTP client
    itself accepts."""
    assert str(guard.canonical(URL(url))) == requested


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.1", "0", "::ffff:127.0.0.1", "::1"])
def test_the_socket_factory_refuses_to_make_a_socket_for_a_non_public_address(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    make = guarded_socket(guard.CLOSED)
    with pytest.raises(guard.BlockedAddress):
        make((family, socket.SOCK_STREAM, 6, "", (host, 80)))
    everything = (ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0"))
    opened = guarded_socket(guard.AddressPolicy(networks=everything))
    opened((family, socket.SOCK_STREAM, 6, "", (host, 80))).close()


async def test_every_spelling_of_loopback_is_blocked_before_any_connection(
    web1: ImageWeb,
) -> None:
    web1.clear_arrivals()
    urls = [f"http://{h}:{web1.port}/img/32x32/a.jpg" for h in LOOPBACK_SPELLINGS]
    results = await _fetch_all(FetchConfig(), urls)
    assert [r.status for r in results] == [status.BLOCKED_ADDRESS] * len(urls)
    assert web1.arrivals == []
    # The same URLs reach the server when loopback is opened: the refusal was the guard's.
    opened = await _fetch_all(FetchConfig(allow_networks=["127.0.0.0/8", "::ffff:0:0/96"]), urls)
    assert [r.status for r in opened] == [status.OK] * len(urls)


async def test_a_redirect_to_any_spelling_of_a_refused_address_is_not_followed(
    web1: ImageWeb,
) -> None:
    """127.0.0.2 (the redirector) is opened; 127.0.0.1 is not, however the redirect spells it."""
    web1.clear_arrivals()
    cfg = FetchConfig(allow_networks=["127.0.0.2/32"])
    targets = [h for h in LOOPBACK_SPELLINGS if h != "localhost"] + ["0"]
    urls = [
        web1.url(1, "/fault/redirect-to/" + quote(f"http://{h}:{web1.port}/img/32x32/r.jpg", ""))
        for h in targets
    ]
    results = await _fetch_all(cfg, urls)
    assert [r.status for r in results] == [status.BLOCKED_ADDRESS] * len(urls)
    assert all(r.http_code == 302 for r in results)
    redirector = await asyncio.to_thread(
        web1.wait_for_arrivals, len(urls), where=lambda a: a.host == "127.0.0.2"
    )
    assert len(redirector) == len(urls)
    assert _arrivals_on(web1, "127.0.0.1") == 0


async def test_a_name_that_resolves_to_loopback_is_blocked() -> None:
    (res,) = await _fetch_all(FetchConfig(), ["http://localhost:9/a.jpg"])
    assert res.status == status.BLOCKED_ADDRESS


async def test_a_crawl_records_refused_addresses_and_fetches_everything_else(
    namespace: str, tmp_path: Path, web: ImageWeb
) -> None:
    """Loopback opened only for the image web's hosts (127.0.0.2-7): every other spelling of
    a loopback or metadata address gets one blocked_address record; the images are ok."""
    opened = ["127.0.0.2/31", "127.0.0.4/30"]
    cfg = crawl_config(
        namespace, tmp_path, fetch={"allow_private_addresses": False, "allow_networks": opened}
    )
    good = [web.url(i % 6, f"/img/40x30/good{i}.jpg") for i in range(8)]
    bad = [f"http://{h}:{web.port}/img/32x32/b.jpg" for h in LOOPBACK_SPELLINGS]
    bad += [f"http://2852039166:{web.port}/latest/meta-data/"]
    bad += [web.url(0, "/fault/redirect-to/" + quote(f"http://127.1:{web.port}/x.jpg", ""))]
    names = [f"g{i}.jpg" for i in range(len(good))] + [f"b{i}.jpg" for i in range(len(bad))]
    shard = write_docs(tmp_path / "sec.jsonl", [image_doc(good + bad, names)])
    await crawl(cfg, [str(shard)])
    recs = report(cfg, "sec")
    assert len(recs) == len(names)
    assert {recs[f"g{i}.jpg"]["status"] for i in range(len(good))} == {status.OK}
    assert {recs[f"b{i}.jpg"]["status"] for i in range(len(bad))} == {status.BLOCKED_ADDRESS}
    assert not (cfg.output_dir / "sec" / "b0.jpg").exists()


# ---- paths ----------------------------------------------------------------------------------


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "shard, name",
    [("s", "../../escaped.png"), ("../../escaped_dir", "a.jpg"), ("s", ".."), ("..", "x"),
     ("s", "a/b.jpg"), ("s", ".hidden.jpg"), ("s", "nul\0.jpg"), ("", "a.jpg"), ("s", ""),
     ("_status", "s.jsonl.gz"), ("_status", "s.summary.json"), ("_shards", "a.jpg"),
     ("s", "x" * 256)],
)  # fmt: skip
def test_the_store_refuses_any_target_that_is_not_one_name_under_a_shard_directory(
    tmp_path: Path, shard: str, name: str
) -> None:
    root = tmp_path / "out"
    root.mkdir()
    status_dir = root / status.STATUS_DIR
    status_dir.mkdir()
    (status_dir / "s.jsonl.gz").write_bytes(b"report")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = store.shrink_and_store(_jpeg(), ImageSettings(), (str(root), shard, name))
    assert result.status == status.WRITE_ERROR and "refused" in result.error
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (status_dir / "s.jsonl.gz").read_bytes() == b"report"


def test_a_symlinked_shard_directory_is_not_followed(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "s").symlink_to(elsewhere, target_is_directory=True)
    result = store.shrink_and_store(_jpeg(), ImageSettings(), (str(root), "s", "a.jpg"))
    assert result.status == status.WRITE_ERROR
    assert list(elsewhere.iterdir()) == []
    (elsewhere / "b.jpg").write_bytes(_jpeg())
    assert store.verify_stored((str(root), "s", "b.jpg"), ImageSettings()) is None


def test_a_link_at_the_final_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    root, victim = tmp_path / "out", tmp_path / "victim.txt"
    (root / "s").mkdir(parents=True)
    victim.write_text("keep me")
    (root / "s" / "a.jpg").symlink_to(victim)
    assert store.verify_stored((str(root), "s", "a.jpg"), ImageSettings()) is None
    result = store.shrink_and_store(_jpeg(), ImageSettings(), (str(root), "s", "a.jpg"))
    assert result.status == status.OK
    assert victim.read_text() == "keep me"
    assert not (root / "s" / "a.jpg").is_symlink()


def test_reports_are_written_only_as_plain_files_in_a_plain_status_directory(
    tmp_path: Path,
) -> None:
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    for bad in ("../escaped", ".hidden", "a/b", ""):
        with pytest.raises(OSError):
            status.write_report(LocalStorage(str(root)), bad, [], {})
    (root / status.STATUS_DIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError):
        status.write_report(LocalStorage(str(root)), "s", [], {})
    assert list(elsewhere.iterdir()) == []


async def test_a_crawl_into_a_symlinked_shard_directory_records_write_errors_only_there(
    namespace: str, tmp_path: Path, web: ImageWeb
) -> None:
    cfg = crawl_config(namespace, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg.output_dir.mkdir(parents=True)
    (cfg.output_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    urls = [web.url(i % 6, f"/img/40x30/l{i}.jpg") for i in range(6)]
    names = [f"i{i}.jpg" for i in range(6)]
    linked = write_docs(tmp_path / "linked.jsonl", [image_doc(urls, names)])
    fine = write_docs(tmp_path / "fine.jsonl", [image_doc(urls, names)])
    await crawl(cfg, [str(linked), str(fine)])
    assert {r["status"] for r in report(cfg, "linked").values()} == {status.WRITE_ERROR}
    assert len(report(cfg, "linked")) == 6
    assert {r["status"] for r in report(cfg, "fine").values()} == {status.OK}
    assert list(elsewhere.iterdir()) == []


# ---- the embedded Redis ---------------------------------------------------------------------


def test_the_embedded_redis_requires_its_generated_password_kept_private(
    tmp_path: Path,
) -> None:
    embedded = EmbeddedRedis(tmp_path / "state")
    url = embedded.start()
    try:
        box = tmp_path / "state" / "redis"
        assert stat.S_IMODE(box.stat().st_mode) == 0o700
        for name in ("password", "identity", "url", "redis.conf"):
            assert stat.S_IMODE((box / name).stat().st_mode) == 0o600, name
        password = (box / "password").read_text().strip()
        assert len(password) >= 32 and f":{password}@127.0.0.1:" in url
        assert (box / "url").read_text().strip() == url
        anonymous = redis.Redis(host="127.0.0.1", port=int(url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        assert embedded_module.running_url(tmp_path / "state") == url
    finally:
        embedded.stop()


def test_a_reused_url_file_pointing_at_another_redis_is_not_trusted(tmp_path: Path) -> None:
    """A Redis that answers at the URL of a killed run, without this directory's password or
    identity, is never used: a fresh private Redis is started instead."""
    stranger = RedisProcess(tmp_path / "stranger")
    stranger.start()
    embedded = EmbeddedRedis(tmp_path / "state")
    try:
        box = tmp_path / "state" / "redis"
        box.mkdir(parents=True)
        for stale in (stranger.url, f"redis://:wrong@127.0.0.1:{stranger.port}/0"):
            (box / "url").write_text(stale)
            assert embedded_module.running_url(tmp_path / "state") is None
            url = embedded.start()
            assert f":{stranger.port}/" not in url
            client = redis.Redis.from_url(url)
            assert client.get(EMBEDDED_IDENTITY) == (box / "identity").read_text().strip().encode()
            client.close()
            embedded.stop()
        with redis.Redis.from_url(stranger.url) as c:
            assert c.get(EMBEDDED_IDENTITY) is None  # nothing was written to the stranger
    finally:
        embedded.stop()
        stranger.stop()


def test_a_url_file_of_a_live_embedded_redis_is_reused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "state")
    url = first.start()
    try:
        assert EmbeddedRedis(tmp_path / "state").start() == url
    finally:
        first.stop()


async def test_a_password_file_authenticates_a_url_without_a_password(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "state")
    url = embedded.start()
    try:
        cfg = Config()
        cfg.redis.url = "redis://" + url.split("@", 1)[1]
        with pytest.raises(redis.AuthenticationError):
            await connection.connect(cfg).ping()
        cfg.redis.password_file = str(tmp_path / "state" / "redis" / "password")
        client = connection.connect(cfg)
        assert await client.ping()
        await client.aclose()
    finally:
        embedded.stop()


# ---- image work -----------------------------------------------------------------------------


async def test_a_runaway_image_job_kills_only_its_process_and_the_rest_carry_on() -> None:
    """One process, depth 2: a job that never ends, with two jobs queued behind it. It fails
    with ImageJobTimeout; its process is replaced; the others run to completion."""
    pool = ImagePool(1, depth=2, job_timeout_s=0.5)
    await pool.start()
    try:
        (pid,) = pool.pids
        hung = asyncio.ensure_future(pool.run(time.sleep, 60))
        await asyncio.sleep(0.05)
        behind = [asyncio.ensure_future(pool.run(operator.add, i, 1)) for i in range(2)]
        with pytest.raises(ImageJobTimeout):
            await asyncio.wait_for(hung, 20)
        assert await asyncio.wait_for(asyncio.gather(*behind), 30) == [1, 2]
        assert pool.timeouts == 1 and pool.restarts == 1 and pool.pids != [pid]
        assert await pool.run(operator.mul, 6, 7) == 42
    finally:
        await pool.close()


def test_an_animation_with_more_frames_than_allowed_is_too_many_frames() -> None:
    settings = ImageSettings(max_frames=50)
    assert images.process_image(gif_of_frames(50), settings).status == status.OK
    bomb = images.process_image(gif_of_frames(20_000), settings)
    assert bomb.status == status.TOO_MANY_FRAMES and "50" in bomb.error
    webp = io.BytesIO()
    tiles = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(60)]
    tiles[0].save(webp, "WEBP", save_all=True, append_images=tiles[1:], lossless=True)
    assert images.process_image(webp.getvalue(), settings).status == status.TOO_MANY_FRAMES


# ---- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("enc", ["gzip", "deflate"])
async def test_a_compressed_body_that_inflates_past_the_cap_is_too_large_not_retried(
    web: ImageWeb, enc: str
) -> None:
    cfg = FetchConfig(allow_private_addresses=True, max_body_bytes=2_000_000)
    small, huge = await _fetch_all(
        cfg,
        [web.url(0, f"/fault/zip-bomb/3000000?enc={enc}"),
         web.url(1, f"/fault/zip-bomb/60000000?enc={enc}")],
    )  # fmt: skip
    for res in (small, huge):
        assert res.status == status.TOO_LARGE and not res.transient, res.error


async def test_bodies_count_against_the_budget_while_they_arrive(web: ImageWeb) -> None:
    """A 1 MiB budget, twelve 3.9 MB bodies at once: while they arrive, no more than the
    budget, plus the oldest body, plus what each waiting read had buffered (aiohttp pauses a
    connection at ~512 KiB; 768 KiB allowed) is held, not all twelve; all arrive whole."""
    cfg = FetchConfig(allow_private_addresses=True, max_body_bytes=4_000_000)
    budget = BodyBudget(1 << 20)
    session = client_session(cfg, max_connections=12)
    fetcher = fetch.Fetcher(cfg, session, max_connections=12, budget=budget)
    urls = [web.url(i % 6, f"/fault/huge/3900000?n=budget{i}") for i in range(12)]

    async def fetch_and_release(url: str) -> fetch.FetchResult:
        res = await fetcher.fetch(url)
        await asyncio.sleep(0.05)  # the image work
        budget.give_back(len(res.body))
        return res

    try:
        results = await asyncio.gather(*(fetch_and_release(u) for u in urls))
    finally:
        await session.close()
    assert [len(r.body) for r in results] == [3_900_000] * 12
    assert budget.used == 0
    assert budget.peak <= (1 << 20) + 3_900_000 + 12 * (768 << 10) < 12 * 3_900_000 // 3


async def test_a_crawl_with_bombs_records_each_once_and_fetches_everything_else(
    namespace: str, tmp_path: Path, web: ImageWeb
) -> None:
    # no deadline is meant to strike (30 s bounds a hang): a bomb ends at the cap, whatever
    # the time the test web takes to make it on a busy machine
    cfg = crawl_config(
        namespace,
        tmp_path,
        fetch={"total_timeout_s": 30.0, "min_timeout_s": 30.0, "connect_timeout_s": 30.0},
    )
    good = [web.url(i % 6, f"/img/48x32/bombs{i}.jpg") for i in range(8)]
    bombs = {
        "gzip.jpg": (web.url(0, "/fault/zip-bomb/60000000"), status.TOO_LARGE),
        "deflate.jpg": (web.url(1, "/fault/zip-bomb/5000000?enc=deflate"), status.TOO_LARGE),
        "frames.gif": (web.url(2, "/fault/frames/80000"), status.TOO_MANY_FRAMES),
        "pixels.png": (web.url(3, "/fault/bomb/x.png"), status.TOO_MANY_PIXELS),
    }
    names = [f"g{i}.jpg" for i in range(len(good))] + list(bombs)
    urls = good + [u for u, _ in bombs.values()]
    shard = write_docs(tmp_path / "bombs.jsonl", [image_doc(urls, names)])
    await crawl(cfg, [str(shard)])
    recs = report(cfg, "bombs")
    assert len(recs) == len(names)
    assert {recs[f"g{i}.jpg"]["status"] for i in range(len(good))} == {status.OK}
    for name, (_url, expected) in bombs.items():
        assert recs[name]["status"] == expected, recs[name]
        assert recs[name]["attempts"] <= 1, recs[name]


async def test_a_read_paused_for_the_workers_budget_is_not_charged_to_its_deadline(
    web: ImageWeb,
) -> None:
    """The budget is spent by a body waiting for image work for 2 s; a read meanwhile waits
    for room, past its 1 s deadline, and still ends ok."""
    cfg = FetchConfig(allow_private_addresses=True, total_timeout_s=1.0)
    budget = BodyBudget(1000)
    waiting = budget.start_read()
    budget.take(5000)
    budget.end_read(waiting, 5000)  # read whole, waiting for its image work
    session = client_session(cfg, max_connections=2)
    fetcher = fetch.Fetcher(cfg, session, max_connections=2, budget=budget)
    try:
        read = asyncio.ensure_future(fetcher.fetch(web.url(0, "/img/400x300/paused.png")))
        await asyncio.sleep(2.0)
        assert not read.done()
        budget.give_back(5000)
        res = await asyncio.wait_for(read, 10)
    finally:
        await session.close()
    assert res.status == status.OK, res.error
    budget.give_back(len(res.body))
    assert budget.used == 0
