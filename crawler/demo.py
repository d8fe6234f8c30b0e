"""The README's first command: crawl the shipped sample shard from a local image web.

The sample's URLs point at 127.0.0.2-9 on one port; the demo starts that web (a separate
process serving generated images and a few faults), then runs the whole job against the
embedded Redis. Nothing leaves the machine.

The web (testweb/) and the sample (samples/) are test tooling, not part of the installed
package: the demo runs from a checkout of the repository (an editable install, as `make demo`
makes), and finds both beside this package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.config import Config
from core.errors import CommandError
from core.exitcodes import ExitCode

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository the demo runs from
SAMPLE = CHECKOUT / "samples" / "sample_shard.jsonl"
WEB_PACKAGE = CHECKOUT / "testweb"
SAMPLE_PORT = 18650  # the port in the sample's URLs


def start_web(port: int, log: Path, hosts: int = 8) -> subprocess.Popen[str]:
    """The loopback image web, its own log in `log` (not on the demo's terminal)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # `python -m testweb` imports the package from the checkout, wherever the demo runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p
    )}  # fmt: skip
    with log.open("ab") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testweb", "serve", "--hosts", str(hosts),
             "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
            process_group=0,  # a Ctrl-C stops the crawl (which drains), not the web under it
        )  # fmt: skip
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "READY" in line:
            return proc
    proc.kill()
    raise CommandError(
        ExitCode.ADDRESS_IN_USE,
        f"the local image web did not start on port {port}: is the port in use? (--port; "
        f"its log: {log})",
    )


def sample_for(port: int, data_dir: Path) -> Path:
    """The sample shard, its URLs on `port` (a copy in `data_dir` unless it is SAMPLE_PORT)."""
    if port == SAMPLE_PORT:
        return SAMPLE
    copy = data_dir / SAMPLE.name
    data_dir.mkdir(parents=True, exist_ok=True)
    text = SAMPLE.read_text(encoding="utf-8").replace(f":{SAMPLE_PORT}/", f":{port}/")
    copy.write_text(text, encoding="utf-8")
    return copy


def run_demo(cfg: Config, argv: Sequence[str], *, port: int, output: str) -> int:
    from core.runtime import run
    from crawler.runner import run_all

    for needed in (SAMPLE, WEB_PACKAGE / "__main__.py"):
        if not needed.is_file():
            raise CommandError(
                ExitCode.NOT_FOUND,
                f"{needed} not found: the demo runs from a checkout of the repository "
                "(git clone, then `make demo`), where the sample shard and the test web live",
            )
    cfg.paths.output = output
    if cfg.paths.data_dir == "mmc4_data":
        cfg.paths.data_dir = "mmc4_data/demo"
    cfg.ingest.shards = [str(sample_for(port, Path(cfg.paths.data_dir)))]
    cfg.fetch.allow_private_addresses = True  # the sample web lives on loopback
    cfg.limits.host_rate = max(cfg.limits.host_rate, 20.0)
    cfg.limits.local_host_rate = max(cfg.limits.local_host_rate, 20.0)
    cfg.limits.host_concurrency = max(cfg.limits.host_concurrency, 8)
    cfg.fetch.total_timeout_s = min(cfg.fetch.total_timeout_s, 10.0)
    cfg.fetch.backoff_base_s = min(cfg.fetch.backoff_base_s, 0.2)
    overrides = [
        "fetch.allow_private_addresses=true",
        f"limits.host_rate={cfg.limits.host_rate}",
        f"limits.local_host_rate={cfg.limits.local_host_rate}",
        f"limits.host_concurrency={cfg.limits.host_concurrency}",
        f"fetch.total_timeout_s={cfg.fetch.total_timeout_s}",
        f"fetch.backoff_base_s={cfg.fetch.backoff_base_s}",
        f"paths.output={cfg.paths.output}",
        f"paths.data_dir={cfg.paths.data_dir}",
    ]
    args = [*argv]
    for item in overrides:
        args += ["--set", item]
    web = start_web(port, Path(cfg.paths.data_dir) / "demo-web.log")
    try:
        code = run(run_all(cfg, args))
    finally:
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(timeout=10)
        except subprocess.TimeoutExpired:
            web.kill()
    print(f"images in {Path(output).resolve()}, reports in {Path(output).resolve() / '_status'}")
    return code
