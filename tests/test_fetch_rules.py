"""The fetch rules that need no network: address policy, Retry-After, X-Robots-Tag opt-outs."""

from __future__ import annotations

import email.utils

import pytest

from crawler import fetch

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
    assert fetch.is_public_address(ip) is public


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert fetch.parse_retry_after("120") == 120.0
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert fetch.parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)
    assert fetch.parse_retry_after("soon") is None
    assert fetch.parse_retry_after(None) is None


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
    assert fetch.opted_out(values, AGENTS) is out
