"""Every command that reads or writes the corpus in a bucket stops at start, before any work,
with one line and exit code 4 when the bucket is missing, the credentials are refused or the
endpoint cannot be reached (a real SeaweedFS on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from crawling import TEST_REDIS_URL
from redis_server import free_port

from core.exitcodes import ExitCode
from crawler.cli import main

# Each command as it is started, and which location is the bucket: the output
# (paths.output) or, for `export`, also its destination OUT with the output on disk.
COMMANDS: dict[str, tuple[list[str], str]] = {
    "worker": (["worker"], "output"),
    "run": (["run", "--no-progress"], "output"),
    "enqueue": (["enqueue"], "output"),
    "retry": (["retry", "--status", "timeout"], "output"),
    "assign worker": (["assign", "worker"], "output"),
    "serve-dataset": (["serve-dataset", "--port", "0"], "output"),
    "dataset-index": (["dataset-index"], "output"),
    "export": (["export", "{local}"], "output"),
    "export to a bucket": (["export", "{bucket}"], "out"),
}
# Each failure: what it changes, and what the line says.
FAILURES = {
    "missing bucket": "the bucket does not exist (NoSuchBucket)",
    "refused credentials": "the secret key does not match (AWS_SECRET_ACCESS_KEY)",
    "unreachable endpoint": "cannot reach the endpoint",
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_on_a_bucket_it_cannot_use_stops_at_start_with_one_line(
    s3_output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, failure: str
) -> None:
    bucket = "s3://no-such-bucket/x" if failure == "missing bucket" else s3_output
    if failure == "refused credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    if failure == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    args, where = COMMANDS[command]
    local = tmp_path / "local"
    args = [a.format(local=local, bucket=bucket) for a in args]
    output = bucket if where == "output" else str(tmp_path / "corpus")
    done = CliRunner().invoke(
        main,
        ["--redis-url", TEST_REDIS_URL, "--output", output,
         "--set", f"paths.data_dir={tmp_path / 'data'}", "--set", "storage.max_retries=0",
         *args],
    )  # fmt: skip
    assert done.exit_code == ExitCode.OUTPUT_UNAVAILABLE, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot ") and bucket in lines[0], lines[0]
    assert FAILURES[failure] in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), "work was done before the check"
