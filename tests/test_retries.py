"""When a failed attempt is tried again: the attempt cap, backoff and Retry-After."""

from __future__ import annotations

import random

import pytest

from core import status
from core.config import FetchConfig
from core.fetch import FetchResult
from crawler.retries import Retries

CFG = FetchConfig(max_attempts=5, backoff_base_s=1.0, backoff_max_s=4.0, retry_after_max_s=60.0)

RESET = FetchResult(status.CONNECTION_ERROR, error="reset", transient=True)
UNAVAILABLE = FetchResult(status.http_status(503), http_code=503, transient=True, retry_after=7.0)
TIMEOUT = FetchResult(status.TIMEOUT, error="deadline exceeded", transient=True)


def served_others(res: FetchResult) -> FetchResult:
    return FetchResult(
        res.status, res.http_code, res.error, transient=True, retry_after=res.retry_after,
        host_answered=True,
    )  # fmt: skip


def waits(res: FetchResult, cfg: FetchConfig = CFG, seed: int = 0) -> list[float]:
    """The waits between attempts of an image that fails with `res` every time."""
    retries = Retries(cfg, random.Random(seed))
    out: list[float] = []
    while (delay := retries.after(res)) is not None:
        out.append(delay)
    assert retries.attempts == len(out) + 1
    return out


@pytest.mark.parametrize("seed", range(20))
def test_a_host_that_serves_nothing_gets_every_attempt_with_jittered_exponential_backoff(
    seed: int,
) -> None:
    delays = waits(RESET, seed=seed)
    assert len(delays) == CFG.max_attempts - 1
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(CFG.backoff_max_s, CFG.backoff_base_s * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling


def test_retry_after_is_honoured_up_to_its_cap() -> None:
    assert waits(UNAVAILABLE) == [7.0] * (CFG.max_attempts - 1)
    capped = FetchConfig(max_attempts=3, retry_after_max_s=2.0, backoff_base_s=0.1)
    assert waits(UNAVAILABLE, capped) == [2.0, 2.0]


def test_a_timeout_is_tried_again_at_once() -> None:
    assert waits(TIMEOUT) == [0.0] * (CFG.max_attempts - 1)


@pytest.mark.parametrize("res", [RESET, UNAVAILABLE, TIMEOUT], ids=["reset", "503", "timeout"])
def test_a_failure_while_the_host_served_others_gets_one_more_attempt_only(
    res: FetchResult,
) -> None:
    """The fault is most likely the URL's: a second attempt recovers a one-off fault, a third
    would only load the host again."""
    delays = waits(served_others(res))
    assert len(delays) == 1
    if res.retry_after is not None:
        assert delays == [res.retry_after]


def test_a_failure_of_another_kind_after_that_goes_on_to_the_next_attempt() -> None:
    """A one-off reset, then a timeout while the crawler was busy: not the same fault twice."""
    retries = Retries(CFG)
    assert retries.after(served_others(RESET)) is not None
    assert retries.after(TIMEOUT) is not None
    assert retries.after(served_others(TIMEOUT)) is not None
    assert retries.after(TIMEOUT) is None  # the same as the last, which came as the host served
    assert retries.attempts == 4 < CFG.max_attempts


@pytest.mark.parametrize(
    "res",
    [
        FetchResult(status.OK, 200, body=b"x"),
        FetchResult(status.http_status(404), 404),
        FetchResult(status.TOO_LARGE, 200, "too big"),
    ],
    ids=["ok", "404", "too_large"],
)
def test_success_and_permanent_failures_are_never_retried(res: FetchResult) -> None:
    assert waits(res) == []


def test_max_attempts_one_means_no_retry() -> None:
    assert waits(RESET, FetchConfig(max_attempts=1)) == []
