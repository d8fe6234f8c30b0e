"""The fetch rules that need no network: address policy, Retry-After, X-Robots-Tag opt-outs."""

from __future__ import annotations

import asyncio
import email.utils

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core import fetch, guard
from core.budget import Slots
from core.config import FetchConfig
from core.responses import opted_out, parse_retry_after
from core.session import client_session
from testweb import ImageWeb

AGENTS = ["googlebot-image", "googlebot", "mmc4-crawler"]


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("127.0.0.5", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("not-an-ip", False),
    ],
)
def test_only_public_addresses_count_as_public(ip: str, public: bool) -> None:
    assert guard.is_public_address(ip) is public


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("120") == 120.0
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("values", "out"),
    [
        (["noai"], True),
        (["noimageai"], True),
        (["noindex, noai"], True),
        (["googlebot: noai"], True),
        (["googlebot-image: noimageai, nofollow"], True),
        (["otherbot: noai"], False),
        (["otherbot: noai", "noimageai"], True),
        (["max-image-preview:large, noai"], True),
        (["max-image-preview:large"], False),
        (["noindex, nofollow"], False),
        (["NOAI"], True),
    ],
)
def test_x_robots_tag_opt_outs(values: list[str], out: bool) -> None:
    assert opted_out(values, AGENTS) is out


async def test_waiting_for_a_free_connection_does_not_count_against_the_deadline(
    web: ImageWeb,
) -> None:
    """One connection, six 0.4 s responses, a 1 s deadline: the last request waits ~2 s for
    the connection, but its own deadline starts only when it can go out."""
    cfg = FetchConfig(total_timeout_s=1.0, allow_private_addresses=True)
    session = client_session(cfg, max_connections=1)
    fetcher = fetch.Fetcher(cfg, session, max_connections=1)
    try:
        urls = [web.url(i, f"/fault/slow/400/32x32/queue-{i}.jpg") for i in range(6)]
        results = await asyncio.gather(*(fetcher.fetch(u) for u in urls))
    finally:
        await session.close()
    assert [r.status for r in results] == ["ok"] * 6


async def test_a_deadline_error_says_how_far_the_request_got(web: ImageWeb) -> None:
    cfg = FetchConfig(total_timeout_s=0.5, allow_private_addresses=True)
    session = client_session(cfg, max_connections=4)
    fetcher = fetch.Fetcher(cfg, session, max_connections=4)
    try:
        silent = await fetcher.fetch(web.url(0, "/fault/slow/3000/32x32/silent.jpg"))
        trickle = await fetcher.fetch(web.url(1, "/fault/trickle/2000/1200x900/slow.jpg"))
    finally:
        await session.close()
    assert silent.status == trickle.status == "timeout"
    assert silent.error == "deadline exceeded (no response headers)"
    assert trickle.error.startswith("deadline exceeded (") and "body bytes read" in trickle.error


async def test_no_cookie_set_by_a_response_is_sent_with_a_later_request() -> None:
    """A crawl keeps no cookie jar (named host: aiohttp's jar ignores cookies of IP hosts)."""
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        resp = web.Response(body=b"x")
        resp.set_cookie("session", "abc")
        return resp

    app = web.Application()
    app.router.add_get("/{name}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    cfg = FetchConfig(allow_private_addresses=True)
    session = client_session(cfg, max_connections=2)
    fetcher = fetch.Fetcher(cfg, session, max_connections=2)
    try:
        for name in ("a", "b"):
            res = await fetcher.fetch(f"http://localhost:{server.port}/{name}")
            assert res.ok and res.body == b"x"
    finally:
        await session.close()
        await server.close()
    assert seen == [None, None]


async def test_connection_slots_are_handed_out_first_come_first_served_and_never_leak() -> None:
    slots = Slots(2)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(i: int) -> None:
        async with slots:
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and slots.free == 0
    tasks[2].cancel()  # cancelled while waiting: never served, takes no slot
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4, 5]
    assert slots.free == 2


async def test_a_slot_handed_to_a_request_cancelled_at_that_moment_goes_to_the_next() -> None:
    slots = Slots(1)
    await slots.__aenter__()
    first = asyncio.create_task(slots.__aenter__())
    second = asyncio.create_task(slots.__aenter__())
    await asyncio.sleep(0.01)
    await slots.__aexit__()  # the slot goes to `first`...
    first.cancel()  # ...which is cancelled before it runs: `second` gets the slot
    await asyncio.sleep(0.01)
    assert first.cancelled() and second.done() and slots.free == 0
    await slots.__aexit__()
    assert slots.free == 1
