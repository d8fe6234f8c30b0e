"""Fleet benchmark: how much of one Redis a crawl fleet uses, per image and per worker.

Usage::

    .venv/bin/python bench/fleet_bench.py [--fleets 2,6] [--seconds 20] [--hosts 500]

For each fleet size N it:

1. starts a private ``redis-server`` with the flags of a fleet's Redis (AOF, fsync always), so
   its INFO counters and CPU belong to the crawl alone;
2. enqueues ``--images`` tiny images (16x16 JPEGs from the loopback image web,
   ``testweb``, spread over ``--hosts`` hosts: image work and HTTP cost little, so the
   workers drive Redis as hard as a real fleet's would per image) with ``mmc4-crawl enqueue``,
   and measures ingest's Redis cost per image;
3. starts N ``mmc4-crawl worker`` processes (one image process each); the per-host limits stay
   on, fleet-wide in Redis, with rates that do not bind;
4. after ``--warmup`` s, measures ``--seconds`` s of crawling: images recorded, Redis commands
   (INFO commandstats), round trips (INFO stats ``total_reads_processed``: one read of a client
   socket, i.e. one command or one pipeline), Redis CPU (INFO cpu, main thread and children),
   and samples ``XINFO GROUPS`` for the autoscaler's view (lag, pending);
5. stops the workers with SIGTERM.

Redis CPU over a run is ``a * images + b * worker-seconds`` (per-image work: lease, permits,
record; per-worker work: heartbeats, lease renewal, reclaim scans, blocking reads). Two fleet
sizes give ``a`` and ``b``; from them the bench prints how many images/s one Redis core
sustains for a fleet of workers of a given speed (``--worker-rate``, images/s of one worker
pod in production) and the fleet size at which Redis saturates (``--redis-budget`` of a core,
leaving the rest for AOF fsyncs, rewrites and the status server).

The workers here share the machine's cores, so each crawls far slower than a production worker
and flushes smaller batches: the per-image figures are upper bounds (the bench prints the mean
RECORD batch so the reader can judge).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from crawl_bench import PrivateRedis, Web, clean_env, make_workload  # noqa: E402

import testweb  # noqa: E402
from core.keys import CRAWL_GROUP, Keys  # noqa: E402

BIN = Path(sys.executable).parent
NS = "fleet"
# Commands the bench itself sends while measuring (by INFO commandstats name): they are taken
# out of every figure, with their measured cost.
OWN: dict[str, int] = {}
OWN_LOCK = threading.Lock()


def own(*names: str) -> None:
    with OWN_LOCK:
        for name in names:
            OWN[name] = OWN.get(name, 0) + 1


def say(msg: str) -> None:
    print(msg, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--fleets", default="2,6", help="fleet sizes (worker processes), comma-separated"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per fleet")
    p.add_argument("--warmup", type=float, default=12.0, help="seconds before measuring")
    p.add_argument("--images", type=int, default=0, help="images enqueued per fleet (0: enough)")
    p.add_argument("--hosts", type=int, default=500, help="loopback hosts of the image web")
    p.add_argument("--side", type=int, default=16, help="side of the served images, px")
    p.add_argument(
        "--worker-rate", type=float, default=500.0,
        help="images/s of one production worker pod (2 image processes; README, Performance)",
    )  # fmt: skip
    p.add_argument(
        "--redis-budget", type=float, default=0.7,
        help="share of one core the crawl may use on Redis's main thread",
    )  # fmt: skip
    p.add_argument("--set", dest="extra", action="append", default=[], help="worker setting")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------


def worker_command(rds: PrivateRedis, out: Path, extra: list[str]) -> list[str]:
    sets = [
        f"redis.namespace={NS}",
        f"paths.data_dir={out / '_data'}",
        "fetch.allow_private_addresses=true",
        # fleet-wide permits are requested from Redis as in production, at rates that never bind
        "limits.host_rate=100000",
        "limits.host_burst=100000",
        "limits.local_host_rate=0",
        "limits.host_concurrency=8",
        "worker.image_processes=1",
        *extra,
    ]
    cmd = [str(BIN / "mmc4-crawl"), "--redis-url", rds.url, "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@dataclass
class Counters:
    t: float
    images: int
    commands: int
    reads: int
    cpu_main: float
    cpu_children: float
    calls: dict[str, int]
    usec: dict[str, int]

    own_calls: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, client: redis.Redis) -> Counters:
        own("info", "info", "info", "hgetall")
        with OWN_LOCK:
            own_calls = dict(OWN)
        stats: Any = client.info("stats")
        cpu: Any = client.info("cpu")
        cmds: Any = client.info("commandstats")
        counts: Any = client.hgetall(Keys(NS).counts)
        images = sum(int(v) for k, v in counts.items() if k != b"bytes")
        return cls(
            time.monotonic(),
            images,
            int(stats["total_commands_processed"]),
            int(stats.get("total_reads_processed", 0)),
            float(cpu["used_cpu_sys_main_thread"]) + float(cpu["used_cpu_user_main_thread"]),
            float(cpu["used_cpu_sys_children"]) + float(cpu["used_cpu_user_children"]),
            {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()},
            {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in cmds.items()},
            own_calls,
        )


@dataclass
class Run:
    workers: int
    seconds: float
    images: int
    commands: int
    reads: int
    cpu_main: float
    cpu_children: float
    calls: dict[str, int]
    usec: dict[str, int]
    lag_samples: list[int | None] = field(default_factory=list)
    undelivered_samples: list[int] = field(default_factory=list)
    ingest: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def per_image(self, n: float) -> float:
        return n / max(1, self.images)


def delta(a: Counters, b: Counters, workers: int) -> Run:
    """The fleet's share of Redis between two readings: the bench's own commands (each one
    round trip) and their measured time are taken out."""
    names = set(b.calls)
    calls = {n: b.calls[n] - a.calls.get(n, 0) for n in names}
    usec = {n: b.usec[n] - a.usec.get(n, 0) for n in names}
    mine = {n: b.own_calls.get(n, 0) - a.own_calls.get(n, 0) for n in b.own_calls}
    mine_usec = 0.0
    for n, k in mine.items():
        if calls.get(n):
            share = usec[n] * min(1.0, k / calls[n])
            mine_usec += share
            usec[n] -= int(share)
            calls[n] = max(0, calls[n] - k)
    total = sum(mine.values())
    return Run(
        workers,
        b.t - a.t,
        b.images - a.images,
        b.commands - a.commands - total,
        b.reads - a.reads - total,
        b.cpu_main - a.cpu_main - mine_usec / 1e6,
        b.cpu_children - a.cpu_children,
        calls,
        usec,
    )


def sample_group(
    client: redis.Redis,
    lag_samples: list[int | None],
    undelivered: list[int],
    stop: threading.Event,
) -> None:
    """What KEDA's redis-streams scaler reads: the group's lag (None when Redis cannot tell)
    and, for comparison, the exact number of undelivered entries (XLEN - pending)."""
    keys = Keys(NS)
    while not stop.wait(0.5):
        try:
            own("xinfo|groups", "xlen")
            groups: Any = client.xinfo_groups(keys.queue)
            length = int(client.xlen(keys.queue))
        except redis.RedisError:
            continue
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == CRAWL_GROUP:
                lag = g.get("lag")
                lag_samples.append(None if lag is None else int(lag))
                undelivered.append(length - int(g["pending"]))


def run_fleet(n: int, args: argparse.Namespace, web: Web, work: Path, images: int) -> Run:
    base = work / f"fleet{n}"
    out = base / "out"
    out.mkdir(parents=True)
    rds = PrivateRedis.start(base, "always")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pool = [f"/img/{args.side}x{args.side}/p{i}.jpg" for i in range(64)]
        wl = make_workload(web, pool, images, 7 + n, 5000, base / "shards")
        client = rds.client
        # ingest
        before = Counters.read(client)
        cmd = worker_command(rds, out, args.extra)
        t0 = time.monotonic()
        ingest_cmd = [*cmd, "--set", f"ingest.max_queue_depth={images + 1}", "enqueue"]
        subprocess.run(
            [*ingest_cmd, *map(str, wl.shards)],
            check=True,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
        )
        ingest_s = time.monotonic() - t0
        after = Counters.read(client)
        ingest = {
            "images/s": images / ingest_s,
            "commands": (after.commands - before.commands) / images,
            "round trips": (after.reads - before.reads) / images,
            "cpu_us": (after.cpu_main - before.cpu_main) / images * 1e6,
        }
        # crawl
        for i in range(n):
            with open(base / f"worker{i}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [*cmd, "worker"], env=clean_env(), stdout=subprocess.DEVNULL, stderr=log
                    )
                )
        time.sleep(args.warmup)
        a = Counters.read(client)
        if a.images >= images:
            raise SystemExit("the fleet finished during the warm-up: raise --images")
        lag_samples: list[int | None] = []
        undelivered: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(
            target=sample_group, args=(client, lag_samples, undelivered, stop), daemon=True
        )
        sampler.start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(1.0)
            own("xlen")
            if int(client.xlen(Keys(NS).queue)) == 0:
                raise SystemExit("the queue ran dry while measuring: raise --images")
        b = Counters.read(client)
        stop.set()
        sampler.join()
        run = delta(a, b, n)
        run.lag_samples, run.undelivered_samples = lag_samples, undelivered
        run.ingest = ingest
        return run
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        rds.stop()


# ---------------------------------------------------------------------------------------------


def report(runs: list[Run], args: argparse.Namespace) -> None:
    say("")
    say("fleet (worker processes)        " + "".join(f"{r.workers:>12}" for r in runs))
    rows: list[tuple[str, list[str]]] = [
        ("images/s (whole fleet)", [f"{r.rate:.0f}" for r in runs]),
        ("Redis commands per image", [f"{r.per_image(r.commands):.2f}" for r in runs]),
        ("Redis round trips per image", [f"{r.per_image(r.reads):.3f}" for r in runs]),
        ("Redis CPU us per image (main)", [f"{r.per_image(r.cpu_main) * 1e6:.1f}" for r in runs]),
        ("Redis CPU, share of a core", [f"{r.cpu_main / r.seconds:.3f}" for r in runs]),
        ("AOF rewrite CPU s (children)", [f"{r.cpu_children:.2f}" for r in runs]),
        ("images per script call", [f"{1 / r.per_image(r.calls.get('evalsha', 0)):.1f}"
                                    if r.calls.get("evalsha") else "-" for r in runs]),
        ("host permits (SET) per image", [f"{r.per_image(r.calls.get('set', 0)):.2f}"
                                          for r in runs]),
        ("lag samples NULL, %", [f"{pct_null(r):.1f}" for r in runs]),
        ("lag vs undelivered, median", [lag_error(r) for r in runs]),
    ]  # fmt: skip
    for name, cells in rows:
        say(f"{name:<32}" + "".join(f"{c:>12}" for c in cells))
    say("")
    say("Redis commands per image, by command (largest fleet):")
    big = runs[-1]
    top = sorted(big.calls, key=lambda c: -big.usec.get(c, 0))[:10]
    for c in top:
        say(
            f"  {c:<18} {big.per_image(big.calls[c]):7.3f} calls  "
            f"{big.per_image(big.usec[c]):7.1f} us"
        )
    ing = runs[-1].ingest
    say("")
    say(
        f"ingest: {ing['images/s']:.0f} images/s, {ing['commands']:.3f} commands, "
        f"{ing['round trips']:.4f} round trips, {ing['cpu_us']:.1f} us Redis CPU per image"
    )
    if len(runs) < 2:
        return
    # cpu = a * images + b * worker-seconds, from the two extreme fleets
    lo, hi = runs[0], runs[-1]
    m = [[lo.images, lo.workers * lo.seconds], [hi.images, hi.workers * hi.seconds]]
    y = [lo.cpu_main, hi.cpu_main]
    det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
    if abs(det) < 1e-9:
        say("fit: the two runs are not independent")
        return
    a = (y[0] * m[1][1] - m[0][1] * y[1]) / det
    b = (m[0][0] * y[1] - m[1][0] * y[0]) / det
    a = max(a, 0.0)
    b = max(b, 0.0)
    say("")
    say(f"fit: Redis CPU = {a * 1e6:.1f} us per image + {b * 1e3:.2f} ms per worker-second")
    per_worker = a * args.worker_rate + b  # core-seconds per second, per production worker
    workers = args.redis_budget / per_worker
    say(
        f"at {args.worker_rate:.0f} images/s per worker: {per_worker * 100:.2f} % of a Redis core "
        f"per worker; {args.redis_budget:.0%} of a core saturates at {workers:.0f} workers, "
        f"{workers * args.worker_rate:,.0f} images/s"
    )
    say(f"Redis's per-image ceiling (no per-worker cost): {args.redis_budget / a:,.0f} images/s")


def pct_null(r: Run) -> float:
    if not r.lag_samples:
        return 0.0
    return 100 * sum(1 for lag in r.lag_samples if lag is None) / len(r.lag_samples)


def lag_error(r: Run) -> str:
    pairs = [
        (lag, u)
        for lag, u in zip(r.lag_samples, r.undelivered_samples, strict=True)
        if lag is not None
    ]
    if not pairs:
        return "-"
    return f"{statistics.median(lag - u for lag, u in pairs):+.0f}"


def main() -> int:
    args = parse_args()
    fleets = [int(x) for x in args.fleets.split(",") if x.strip()]
    say(
        f"fleet bench: fleets {fleets}, {args.seconds:.0f} s each, {args.hosts} hosts, "
        f"{args.side}x{args.side} JPEGs, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        served = testweb.start_subprocess(args.hosts, 0, timeout=120, cwd=ROOT, env=clean_env())
        web = Web("tiny", served)
        runs = []
        try:
            for n in fleets:
                # every worker leases a full window, and the fleet must not run dry while measured
                images = args.images or int(2000 * n + 10_000 + 1000 * (args.seconds + args.warmup))
                say(f"fleet of {n}: enqueueing {images:,} images ...")
                run = run_fleet(n, args, web, Path(tmp), images)
                say(
                    f"fleet of {n}: {run.rate:.0f} images/s, "
                    f"{run.per_image(run.cpu_main) * 1e6:.1f} us Redis CPU per image"
                )
                runs.append(run)
        finally:
            web.stop()
    report(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
