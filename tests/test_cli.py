"""The command line: `run` all-in-one on an embedded Redis, `status`, `worker --check`, help."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis
from click.testing import CliRunner
from crawling import (
    TEST_REDIS_URL,
    alive,
    children,
    crawl,
    crawl_config,
    heartbeats,
    report,
    write_slow_shard,
)
from redis_server import free_port

from core.status import read_report
from crawler.cli import main
from testweb import ImageWeb, make_docs, write_shard


def mmc4(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    return subprocess.run(
        [sys.executable, "-m", "crawler", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_run_crawls_shards_to_the_end_on_its_own_embedded_redis(
    web: ImageWeb, tmp_path: Path
) -> None:
    docs = make_docs(web, 40, seed=3, sizes="small", faults=0.1)
    write_shard(tmp_path / "cli_shard_0.jsonl", docs[:20])
    write_shard(tmp_path / "cli_shard_1.jsonl.gz", docs[20:])
    args = [
        "--set", "fetch.allow_private_addresses=true", "--set", "fetch.total_timeout_s=3",
        "--set", "fetch.backoff_base_s=0.05", "--set", "fetch.retry_after_max_s=0.5",
        "--set", "limits.host_rate=50", "--set", "limits.local_host_rate=50",
        "--set", "worker.image_processes=1", "--set", "worker.processes=2",
        "--output", "out", "--set", "paths.data_dir=state",
        "run", "--no-progress", "cli_shard_{0.jsonl,1.jsonl.gz}",
    ]  # fmt: skip
    done = mmc4(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for shard, part in (("cli_shard_0", docs[:20]), ("cli_shard_1", docs[20:])):
        names = {i["image_name"] for d in part for i in d["image_info"]}
        summary = orjson.loads(
            (tmp_path / "out" / "_status" / f"{shard}.summary.json").read_bytes()
        )
        assert summary["records"] == summary["total"] == len(names)
    assert (tmp_path / "state" / "redis" / "appendonlydir").is_dir()  # AOF persistence
    assert "by status:" in done.stderr
    again = mmc4(*args, cwd=tmp_path)  # everything reported: nothing to do, exits at once
    assert again.returncode == 0
    assert "2 skipped" in again.stderr
    assert "nothing to do: the 2 shards given are already reported" in again.stderr


def test_workers_of_a_killed_run_stop_instead_of_living_on(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    write_slow_shard(web, tmp_path / "slow_shard.jsonl", 40)  # still crawling when killed
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    run = subprocess.Popen(
        [sys.executable, "-m", "crawler", "--redis-url", TEST_REDIS_URL,
         "--set", f"redis.namespace={namespace}", "--set", "fetch.allow_private_addresses=true",
         "--set", "worker.processes=2", "--set", "worker.image_processes=1",
         "--set", "worker.grace_period_s=3", "--output", "out",
         "run", "--no-progress", "--no-assign", "slow_shard.jsonl"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        deadline = time.monotonic() + 120  # a bound for a hang, not for a start on a busy machine
        while len(workers := children(run.pid)) < 2 or heartbeats(client, namespace) < 2:
            assert time.monotonic() < deadline, f"run's workers did not start: {workers}"
            time.sleep(0.1)
        assert all(alive(w) for w in workers)
        run.kill()
        run.wait()
        deadline = time.monotonic() + 40  # grace period, final flush, and a margin
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers outlived their run"
    finally:
        client.close()
        run.kill()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def test_status_reports_counts_and_shards_as_json(
    web: ImageWeb, namespace: str, tmp_path: Path
) -> None:
    docs = make_docs(web, 5, seed=9, sizes="small")
    write_shard(tmp_path / "st_shard.jsonl", docs)
    cfg = crawl_config(namespace, tmp_path)
    asyncio.run(crawl(cfg, [str(tmp_path / "st_shard.jsonl")]))
    n = len(report(cfg, "st_shard"))
    result = CliRunner().invoke(
        main, ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}",
               "status", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    snap = orjson.loads(result.output)
    assert snap["done"] == n and snap["remaining"] == 0
    assert sum(snap["by_status"].values()) == n
    text = CliRunner().invoke(
        main, ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}", "status"]
    )
    assert f"done: {n} images" in text.output


def test_worker_check_needs_a_fresh_heartbeat_from_this_host(namespace: str) -> None:
    base = ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}"]
    assert CliRunner().invoke(main, [*base, "worker", "--check"]).exit_code == 1
    me = socket.gethostname()
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        client.hset(f"{namespace}:worker:w1", mapping={"host": me, "seen": time.time() - 60})
        client.expire(f"{namespace}:worker:w1", 10)
        stale = CliRunner().invoke(main, [*base, "worker", "--check"])
        assert stale.exit_code == 1 and "stale" in stale.output
        client.hset(f"{namespace}:worker:w2", mapping={"host": "elsewhere", "seen": time.time()})
        assert CliRunner().invoke(main, [*base, "worker", "--check"]).exit_code == 1
        client.hset(f"{namespace}:worker:w1", "seen", time.time())
        assert CliRunner().invoke(main, [*base, "worker", "--check"]).exit_code == 0
        client.hset(f"{namespace}:worker:w1", "paused", "output cannot be written: disk full")
        paused = CliRunner().invoke(main, [*base, "worker", "--check"])
        assert paused.exit_code == 1 and "paused" in paused.output
        assert CliRunner().invoke(main, [*base, "worker", "--check", "--alive"]).exit_code == 0
    assert CliRunner().invoke(main, [*base, "worker", "--alive"]).exit_code == 2


@pytest.mark.parametrize(
    "command", ["run", "enqueue", "worker", "status", "retry", "demo", "assign"]
)
def test_every_subcommand_says_what_it_does(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert len(result.output.splitlines()) > 4


def test_assign_shard_rewrites_a_shard_under_the_one_cli(tmp_path: Path) -> None:
    images = [{"image_name": n, "matched_text_index": 0, "matched_sim": 0} for n in "xy"]
    doc = {
        "text_list": ["a", "b"],
        "similarity_matrix": [[0.1, 0.3], [0.2, 0.4]],
        "image_info": images,
    }
    source = tmp_path / "s.jsonl"
    source.write_bytes(b"".join(orjson.dumps(doc) + b"\n" for _ in range(3)))
    result = CliRunner().invoke(main, ["assign", "shard", str(source), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output)["rewritten"] == 3
    assert (tmp_path / "o" / "s.jsonl").is_file() and (tmp_path / "o" / "s.report.json").is_file()


def test_assign_worker_takes_the_outer_commands_configuration(namespace: str) -> None:
    outer = ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}"]
    assert CliRunner().invoke(main, [*outer, "assign", "worker", "--check"]).exit_code == 1
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        key = f"{namespace}:assign-worker:a1"
        client.hset(key, mapping={"host": socket.gethostname(), "seen": time.time()})
        client.expire(key, 10)
    assert CliRunner().invoke(main, [*outer, "assign", "worker", "--check"]).exit_code == 0


def test_the_crawlers_commands_do_not_load_the_assignment_engine() -> None:
    probe = "import sys, crawler.cli; print(sorted(m for m in sys.modules if m in WATCH))"
    watch = "WATCH = {'assign', 'assign.cli', 'lapjv'}; "
    done = subprocess.run([sys.executable, "-c", watch + probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_bad_config_value_is_a_clear_usage_error() -> None:
    result = CliRunner().invoke(main, ["--set", "limits.host_rate=fast", "status"])
    assert result.exit_code == 2
    assert "limits.host_rate" in result.output


def test_commands_that_need_redis_say_so_without_a_url() -> None:
    env = {"MMC4_REDIS__URL": ""}
    result = CliRunner().invoke(main, ["worker"], env=env)
    assert result.exit_code == 2 and "redis.url is not set" in result.output


def test_a_shard_rewrite_follows_its_latest_report_after_retry(
    web: ImageWeb, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    docs = [  # four images answer 503 once (fetched once: recorded http_503), then serve
        {"image_info": [{"image_name": f"i{i}.jpg",
                         "raw_url": web.url(i % 6, f"/fault/flaky/1/{tag}-{i}/x{i}.jpg"
                                            if i < 4 else f"/fault/slow/1/x{i}.jpg")}],
         "text_list": ["t"], "similarity_matrix": [[0.5]]}
        for i in range(10)
    ]  # fmt: skip
    write_shard(tmp_path / "stale_shard.jsonl", docs)
    base = [
        "--set", "fetch.allow_private_addresses=true", "--set", "fetch.max_attempts=1",
        "--set", "limits.host_rate=50", "--set", "limits.local_host_rate=50",
        "--set", "worker.image_processes=1", "--set", "assign.downloaded_only=true",
        "--output", "out", "--set", "paths.data_dir=state",
    ]  # fmt: skip
    rewrite_report = tmp_path / "out" / "_shards" / "stale_shard.report.json"

    def kept() -> tuple[int, int]:
        records = read_report(tmp_path / "out" / "_status" / "stale_shard.jsonl.gz")
        ok = sum(1 for r in records if r.status == "ok")
        return ok, orjson.loads(rewrite_report.read_bytes())["kept_images"]

    first = mmc4(*base, "run", "--no-progress", "stale_shard.jsonl", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert kept() == (6, 6)
    retried = mmc4(*base, "retry", "--status", "http_503", cwd=tmp_path)
    assert retried.returncode == 0 and "4 images re-queued" in retried.stdout, retried.stderr
    second = mmc4(*base, "run", "--no-progress", "stale_shard.jsonl", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert kept() == (10, 10)  # the rewrite follows the new report


@pytest.mark.timeout(900)  # the two runs' own bounds (a whole crawl of the sample) and more
def test_the_demo_crawls_on_any_port_and_a_rerun_says_there_is_nothing_to_do(
    tmp_path: Path,
) -> None:
    port = str(free_port(host="127.0.0.2"))
    first = mmc4("demo", "--port", port, "--output", "out", cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = orjson.loads(
        (tmp_path / "out" / "_status" / "sample_shard.summary.json").read_bytes()
    )
    # the web answered on that port (every image would be a refused connection on another);
    # how many are ok depends on how busy the machine is (timeouts)
    by_status = summary["by_status"]
    assert summary["records"] == 1007 and by_status.get("ok", 0) > 0
    assert by_status.get("connection_error", 0) < summary["records"] * 0.05, by_status
    again = mmc4("demo", "--port", port, "--output", "out", cwd=tmp_path, timeout=240)
    assert again.returncode == 0
    assert "nothing to do" in again.stderr
