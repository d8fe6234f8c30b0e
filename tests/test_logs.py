"""Logs: INFO by default, a level from MMC4_LOG_LEVEL, JSON lines with --log-format json in
every command, and a worker's summary and failures once per host and kind per interval."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from crawling import TEST_REDIS_URL

from core.exitcodes import ExitCode
from core.logs import FailureLog, LogStats
from testweb import ImageWeb, make_docs, write_shard


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    return subprocess.run(
        [sys.executable, "-m", "crawler", *args],
        cwd=cwd, env=base | env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_json_logs_are_one_object_per_line_including_the_error(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text("")
    result = cli(
        "--log-format", "json", "--redis-url", "redis://127.0.0.1:1/0",
        "--set", "ingest.redis_wait_s=1", "enqueue", "s.jsonl", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == ExitCode.REDIS_UNAVAILABLE
    lines = [orjson.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 2  # the warnings while it retried, then the error
    assert all({"level", "message"} <= set(line) for line in lines)
    assert lines[-1]["level"] == "ERROR" and lines[-1]["exit_code"] == 3


def test_the_log_level_comes_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text("")
    args = ["--redis-url", "redis://127.0.0.1:1/0", "--set", "ingest.redis_wait_s=1",
            "enqueue", "s.jsonl"]  # fmt: skip
    quiet = cli(*args, cwd=tmp_path, MMC4_LOG_LEVEL="error")
    assert "WARNING" not in quiet.stderr and "error: " in quiet.stderr
    assert "WARNING" in cli(*args, cwd=tmp_path).stderr  # INFO by default
    bad = cli("--redis-url", "redis://127.0.0.1:1/0", "status", cwd=tmp_path,
              MMC4_LOG_LEVEL="chatty")  # fmt: skip
    assert bad.returncode == ExitCode.USAGE and "MMC4_LOG_LEVEL" in bad.stderr


def test_a_failure_kind_is_logged_once_per_host_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = FailureLog(logging.getLogger("t"), interval_s=3600)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(50):
            failures.failure("a.example", "http_404", "Not Found")
        failures.failure("a.example", "timeout", "")
        failures.failure("b.example", "http_404", "Not Found")
    assert len(caplog.records) == 3
    assert failures.suppressed == 49
    assert "http_404 from a.example: Not Found" in caplog.records[0].getMessage()


def test_the_summary_names_done_rate_and_failures_by_kind() -> None:
    stats = LogStats()
    stats.line({"ok": 10}, held=5)
    line = stats.line({"ok": 15, "timeout": 3, "http_404": 7}, held=2)
    assert line.startswith("25 images done (+15 in ")
    assert "ok 5, failures http_404 7, timeout 3; holding 2" in line


def test_run_with_json_logs_writes_only_json_lines(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    docs = make_docs(web, 3, seed=5, sizes="small")
    write_shard(tmp_path / "json_shard.jsonl", docs)
    result = cli(
        "--log-format", "json", "--redis-url", TEST_REDIS_URL,
        "--set", f"redis.namespace={namespace}", "--set", "fetch.allow_private_addresses=true",
        "--set", "worker.image_processes=1", "--output", "out",
        "run", "--no-assign", "json_shard.jsonl", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [orjson.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert any(line["message"] == "run ended" and line["status"]["finished"] for line in lines)
    assert any(line.get("logger") == "crawler.worker" for line in lines)  # the workers' too
