"""Every command fails with one line naming what failed and what to check, a distinct exit
code (core/exitcodes.py) and no traceback unless -vv: driven through the real CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from crawling import TEST_REDIS_URL

from core.embedded import EmbeddedRedis
from core.exitcodes import ExitCode

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def cli(*args: str, cwd: Path, program: str = "crawler", stdin: str = "", timeout: float = 60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    return subprocess.run(
        [sys.executable, "-m", program, *args],
        cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], code: ExitCode, *words: str) -> str:
    """The command failed with `code` and one line, its last, naming the failure (log lines
    of what it tried before giving up may precede it)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for word in words:
        assert word in errors[0]
    return errors[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"],
     ["--set", "ingest.redis_wait_s=1", "enqueue", "shard.jsonl"],
     ["retry", "--status", "timeout"], ["clear", "--yes"]],
    ids=["status", "status-json", "enqueue", "retry", "clear"],
)  # fmt: skip
def test_an_unreachable_redis_is_one_line_and_exit_code_3(
    command: list[str], tmp_path: Path
) -> None:
    (tmp_path / "shard.jsonl").write_text("")
    result = cli("--redis-url", DOWN, *command, cwd=tmp_path)
    one_line_error(result, ExitCode.REDIS_UNAVAILABLE, "Redis", "127.0.0.1:1", "redis.url")


def test_a_wrong_redis_password_is_named_without_printing_it(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    assert binary
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", "right",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis(port=port, password="right", socket_connect_timeout=0.5) as c:
                    c.ping()
                break
            except (redis.RedisError, OSError):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        result = cli("--redis-url", f"redis://:wrong@127.0.0.1:{port}/0", "status", cwd=tmp_path)
        line = one_line_error(result, ExitCode.REDIS_UNAVAILABLE, "refused", "password")
        assert "wrong" not in line and "***" in line
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_port_in_use_is_exit_code_6_for_serve_and_worker_metrics(
    busy_port: int, namespace: str, tmp_path: Path
) -> None:
    serve = cli("--redis-url", TEST_REDIS_URL, "serve", "--port", str(busy_port), cwd=tmp_path)
    one_line_error(serve, ExitCode.ADDRESS_IN_USE, str(busy_port), "--port")
    worker = cli(
        "--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}",
        "--set", f"metrics.port={busy_port}", "worker", cwd=tmp_path,
    )  # fmt: skip
    one_line_error(worker, ExitCode.ADDRESS_IN_USE, str(busy_port), "metrics.port")


def test_serve_answers_503_with_a_json_error_while_redis_is_down(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMC4_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler", "--redis-url", DOWN, "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "status page on" in proc.stdout.readline()
        for path in ("/api/status", "/metrics", "/healthz"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30)
            assert caught.value.code == 503
            assert "cannot reach Redis" in orjson.loads(caught.value.read())["error"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200  # the page itself loads and shows the error
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err


def test_minus_vv_adds_the_traceback(tmp_path: Path) -> None:
    result = cli("-vv", "--redis-url", DOWN, "status", cwd=tmp_path)
    assert result.returncode == ExitCode.REDIS_UNAVAILABLE
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: cannot reach Redis")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["run", "--workers", "0"], ["--workers", "0"]),
        (["run", "--workers", "-1"], ["--workers", "-1"]),
        (["--set", "worker.processes=0", "run"], ["worker.processes = 0", "1..1024"]),
        (["--set", "worker.processes=-1", "run"], ["worker.processes = -1"]),
        (["--set", "metrics.port=99999", "worker"], ["metrics.port = 99999", "0..65535"]),
        (["--set", "worker.image_processes=-2", "run"], ["worker.image_processes = -2"]),
        (["--set", "limits.host_rate=fast", "status"], ["limits.host_rate", "expected float"]),
        (["--set", "nope.key=1", "demo"], ["unknown section [nope]"]),
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2_before_anything_starts(
    args: list[str], words: list[str], tmp_path: Path
) -> None:
    one_line_error(cli(*args, cwd=tmp_path), ExitCode.USAGE, *words)
    assert not (tmp_path / "mmc4_data").exists()  # no Redis was started


def test_the_assign_worker_reports_a_bad_value_in_one_line(tmp_path: Path) -> None:
    result = cli("worker", "--set", "queue.max_deliveries=0", cwd=tmp_path, program="assign")
    one_line_error(result, ExitCode.USAGE, "queue.max_deliveries = 0")


def test_retry_of_an_unknown_status_lists_the_valid_ones(namespace: str, tmp_path: Path) -> None:
    result = cli(
        "--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}",
        "retry", "--status", "conection_error", cwd=tmp_path,
    )  # fmt: skip
    one_line_error(
        result, ExitCode.NOT_FOUND, "unknown status conection_error", "connection_error", "http_"
    )


def test_clear_deletes_the_namespace_after_confirmation(namespace: str, tmp_path: Path) -> None:
    base = ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}"]
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        client.set(f"{namespace}:history", "x")
        client.hset(f"{namespace}:counts", "ok", 3)
        client.set(f"{namespace}x:other", "kept")  # another namespace sharing the prefix
        try:
            refused = cli(*base, "clear", cwd=tmp_path, stdin="n\n")
            assert refused.returncode != 0
            assert client.exists(f"{namespace}:history", f"{namespace}:counts") == 2
            done = cli(*base, "clear", "--yes", cwd=tmp_path)
            assert done.returncode == 0 and "deleted 2 keys" in done.stdout, done.stderr
            assert client.exists(f"{namespace}:history", f"{namespace}:counts") == 0
            assert client.get(f"{namespace}x:other") == b"kept"
        finally:
            client.delete(f"{namespace}x:other")
    empty = cli(*base, "clear", "--yes", cwd=tmp_path)
    one_line_error(empty, ExitCode.NOT_FOUND, "no keys", namespace)


def test_commands_find_the_private_redis_of_a_running_run(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path / "state")  # what `run` starts without a redis.url
    embedded.start()
    try:
        status = cli("--set", "paths.data_dir=state", "status", "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert orjson.loads(status.stdout)["done"] == 0
    finally:
        embedded.stop()
    gone = cli("--set", "paths.data_dir=state", "status", cwd=tmp_path)
    one_line_error(gone, ExitCode.USAGE, "redis.url is not set", "state")


def test_the_demo_on_a_port_in_use_is_exit_code_6(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))  # the sample web's first host
        s.listen()
        port = s.getsockname()[1]
        result = cli("demo", "--port", str(port), "--output", "out", cwd=tmp_path)
    one_line_error(result, ExitCode.ADDRESS_IN_USE, f"port {port}", "--port")
