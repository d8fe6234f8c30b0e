"""The `mmc4-crawl` command and its subcommands."""

from __future__ import annotations

import sys
from typing import Any

import click
import orjson

from core import early, heartbeat, logs, runtime
from core.config import Config
from core.connection import connected
from core.errors import CommandError, ReportingGroup
from core.exitcodes import ExitCode
from core.keys import Keys
from core.preflight import check_bucket
from crawler import cli_dataset, cli_queue, monitor
from crawler.cli_common import State, find_redis, pass_state


@click.group(
    cls=ReportingGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False),
    help="TOML config file (default: ./config.toml if present, or $MMC4_CONFIG).",
)  # fmt: skip
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override one setting, e.g. --set limits.host_rate=5 (repeatable).",
)  # fmt: skip
@click.option("--redis-url", help="Redis URL (redis://, rediss://); same as redis.url.")
@click.option("--output", help="Output directory; same as paths.output.")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Debug logging (-vv: also the traceback of a failure). Default level: INFO, or "
    "$MMC4_LOG_LEVEL.",
)
@click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    help="Log lines as text or JSON objects (default: text, or $MMC4_LOG_FORMAT).",
)
@click.version_option(package_name="mmc4-crawler")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    overrides: tuple[str, ...],
    redis_url: str | None,
    output: str | None,
    verbose: int,
    log_format: str | None,
) -> None:
    """Crawl the images of MMC4 shards into a local corpus, politely and resumably."""
    ctx.meta["mmc4.verbose"] = verbose
    try:
        logs.setup(verbose, log_format)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    extra = list(overrides)
    if redis_url:
        extra.append(f"redis.url={redis_url}")
    if output:
        extra.append(f"paths.output={output}")
    ctx.obj = State(config_path, extra)


@main.command()
@click.argument("shards", nargs=-1)
@click.option(
    "--workers", type=click.IntRange(min=1), help="Crawl worker processes (worker.processes)."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-assign", is_flag=True, help="Do not run the assignment companion.")
@pass_state
def run(
    state: State, shards: tuple[str, ...], workers: int | None, no_progress: bool, no_assign: bool
) -> None:
    """All-in-one on this machine: Redis (embedded unless a URL is set), ingest, workers and
    the assignment companion, until every image of SHARDS has a status.

    SHARDS are .jsonl/.jsonl.gz/.jsonl.zip paths, directories or URLs, with brace patterns
    ("docs_shard_{0..9}_v2.jsonl.zip"); default: ingest.shards. Restarting the same command
    after a crash resumes where it stopped.
    """
    from crawler.runner import run_all

    cfg = state.load()
    if shards:
        cfg.ingest.shards = list(shards)
    if workers is not None:
        cfg.worker.processes = workers
    check_bucket(cfg.paths.output, cfg.storage)
    argv = state.argv()
    code = runtime.run(run_all(cfg, argv, progress=not no_progress, with_assign=not no_assign))
    sys.exit(code)


@main.command()
@click.argument("shards", nargs=-1)
@pass_state
def enqueue(state: State, shards: tuple[str, ...]) -> None:
    """Stream SHARDS into the queue (with backpressure), then exit. Needs redis.url.

    Safe to re-run: shards already reported or enqueued are skipped, a partly enqueued
    shard resumes at its next line. Prints a JSON summary on stdout.

    SIGTERM or SIGINT (also while waiting for room in the queue, for a download or for
    Redis) stops at the last enqueued batch, exit code 143 or 130; a second signal exits at
    once. Exit code 1 when a shard was unreadable, 3 when Redis stayed unreachable for
    ingest.redis_wait_s, 5 when a local shard path does not exist.
    """
    from crawler.sources import expand_sources, missing_message

    cfg = state.load()
    if shards:
        cfg.ingest.shards = list(shards)
    find_redis(cfg)
    check_bucket(cfg.paths.output, cfg.storage, write=False)  # (ingest only reads reports)
    sources = expand_sources(cfg.ingest.shards)
    missing = missing_message(sources)
    if missing:
        raise CommandError(ExitCode.NOT_FOUND, missing)
    sys.exit(runtime.run(_enqueue(cfg, sources)))


async def _enqueue(cfg: Config, sources: list[Any]) -> int:
    from core.connection import RedisRetry, RedisUnavailable
    from core.embedded import where
    from core.runtime import StopSignals, failure, until_stopped
    from crawler.ingest import Ingest
    from crawler.queue import WorkQueue

    with StopSignals() as signals:
        async with connected(cfg) as client:
            ingest = Ingest(cfg, client, redis_wait_s=cfg.ingest.redis_wait_s)
            queue = WorkQueue(client, Keys(cfg.redis.namespace), cfg.queue)

            async def work() -> None:
                retry = RedisRetry.from_config(
                    cfg, "enqueue", give_up_after_s=cfg.ingest.redis_wait_s
                )
                await retry.call(queue.ensure_group)
                await ingest.run(sources, signals.event)

            # Stopped: ingest ends at its next check (a wait for room, a batch); a download
            # or a wait for Redis is cancelled, which leaves no half-applied batch either
            # (each batch and its resume point are one transaction).
            exc = failure(await until_stopped(work(), signals.event))
            if isinstance(exc, RedisUnavailable):
                raise CommandError(
                    ExitCode.REDIS_UNAVAILABLE,
                    f"{exc}; check redis.url ({where(cfg.redis.url)}) and that Redis is running",
                )
            if exc is not None:
                raise exc
        if signals.code is not None:
            ingest.stats.stopped = True
        click.echo(orjson.dumps(ingest.stats.__dict__).decode())
        if signals.code is not None:
            return signals.code
        return ExitCode.FAILURE if ingest.stats.shards_unreadable else ExitCode.OK


@main.command()
@click.option("--check", is_flag=True, help="Exit 0 if a live worker heartbeat is in Redis.")
@click.option(
    "--alive", is_flag=True,
    help="With --check: a paused worker passes too (a liveness probe, not readiness).",
)  # fmt: skip
@click.option("--until-idle", is_flag=True, help="Exit when the queue is empty.")
@click.option(
    "--parent-pid", type=int, default=0, hidden=True,
    help="Stop (gracefully) when this process, the worker's parent, dies (set by `run`).",
)  # fmt: skip
@pass_state
def worker(state: State, check: bool, alive: bool, until_idle: bool, parent_pid: int) -> None:
    """A crawl worker: lease items, fetch, shrink, store, record. Needs redis.url.

    --check (container health check): exit 0 when a worker on this host (hostname) has a
    fresh heartbeat in Redis, 1 when it is missing or stale, or the worker is paused because
    its output cannot be written (the reason is printed). With --alive, a paused worker
    passes: its process runs and beats, and it resumes by itself once its output has room,
    so a liveness probe must not restart it (readiness uses --check alone).

    SIGTERM: stop taking work, finish or hand back in-flight items within
    worker.grace_period_s, flush results, exit 0. A second signal exits at once.
    """
    if alive and not check:
        raise click.UsageError("--alive goes with --check")
    if parent_pid:
        early.stop_with_parent(parent_pid)
    cfg = state.load()
    find_redis(cfg)
    if check:
        sys.exit(runtime.run(_check(cfg, paused_ok=alive)))
    check_bucket(cfg.paths.output, cfg.storage)
    from crawler.worker import run_worker

    async def work() -> int:
        await run_worker(cfg, until_idle=until_idle)
        return ExitCode.OK  # a stop is how a worker ends

    # Results are flushed and leftovers handed back when it returns: no interpreter-exit
    # joins of pool threads hold a stopping container past its grace period.
    runtime.run_and_exit(work())


async def _check(cfg: Config, *, paused_ok: bool) -> int:
    pattern = Keys(cfg.redis.namespace).worker_pattern
    ok, why = await heartbeat.check_heartbeat(cfg, pattern, paused_ok=paused_ok)
    if not ok:
        click.echo(why, err=True)
    return 0 if ok else 1


@main.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def status_cmd(state: State, as_json: bool) -> None:
    """Queue depth, leased, done by status, rate, ETA, shards in flight, workers."""
    cfg = state.load()
    find_redis(cfg)

    async def go() -> monitor.Snapshot:
        async with connected(cfg) as client:
            return await monitor.snapshot(client, Keys(cfg.redis.namespace))

    snap = runtime.run(go())
    if as_json:
        click.echo(orjson.dumps(snap.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(monitor.render_text(snap))


@main.command()
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", type=int, default=8080, help="Port of the status page.")
@pass_state
def serve(state: State, host: str, port: int) -> None:
    """Serve the status page (/), its JSON (/api/status), fleet metrics for Prometheus
    (/metrics) and /healthz, from the crawl's Redis."""
    from crawler.statuspage import make_app

    cfg = state.load()
    find_redis(cfg)

    async def go() -> None:
        async with (
            connected(cfg) as client,
            runtime.serving(make_app(client, Keys(cfg.redis.namespace)), host, port),
        ):
            click.echo(f"status page on http://{host}:{port}/")
            with runtime.StopSignals() as signals:
                await signals.event.wait()

    runtime.run(go())


@main.command()
@click.option("--port", type=int, default=18650, help="Port of the local image web.")
@click.option("--output", "out", default="mmc4_output/demo", help="Output directory.")
@pass_state
def demo(state: State, port: int, out: str) -> None:
    """Crawl the shipped sample shard from a local image web on loopback (offline), with
    the embedded Redis: the README's first command."""
    from crawler.demo import run_demo

    cfg = state.load()
    sys.exit(run_demo(cfg, state.argv(), port=port, output=out))


class _AssignCommands(click.Group):
    """The commands of `assign.cli` (installed as `mmc4-assign` too), imported when used: the
    crawler's own commands do not load numpy and lapjv."""

    def _group(self) -> click.Group:
        from assign.cli import main as assign_main

        return assign_main

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


main.add_command(
    _AssignCommands(
        "assign",
        help="Recompute MMC4 image-to-sentence assignments as the reference does (lapjv): "
        "`assign shard` rewrites shard files, `assign worker` every shard the crawl announces. "
        "`mmc4-assign` is the same.",
    )
)


for command in (*cli_dataset.COMMANDS, *cli_queue.COMMANDS):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
