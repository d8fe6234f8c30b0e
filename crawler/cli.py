"""The `mmc4-crawl` command and its subcommands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson

from core import config as config_mod
from core import early, heartbeat, logs, runtime, status
from core.config import Config
from core.connection import connected
from core.errors import CommandError, ReportingGroup
from core.exitcodes import ExitCode
from core.keys import Keys
from crawler import monitor


class State:
    def __init__(self, config_path: str | None, overrides: list[str]) -> None:
        self.config_path = config_path
        self.overrides = overrides

    def load(self) -> Config:
        cfg = config_mod.load(self.config_path, overrides=self.overrides)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # for the one-line error of a failing command
            ctx.meta["mmc4.redis_url"] = cfg.redis.url
        return cfg

    def argv(self) -> list[str]:
        """The group options, to start worker processes with the same configuration."""
        out: list[str] = []
        if self.config_path:
            out += ["--config", self.config_path]
        for item in self.overrides:
            out += ["--set", item]
        return out


pass_state = click.make_pass_decorator(State)


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
    _check_bucket(cfg)
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
    from crawler.ingest import expand_sources, missing_message

    cfg = state.load()
    if shards:
        cfg.ingest.shards = list(shards)
    _guard(cfg)
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
    _guard(cfg)
    if check:
        sys.exit(runtime.run(_check(cfg, paused_ok=alive)))
    _check_bucket(cfg)
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
    _guard(cfg)

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
    _guard(cfg)

    async def go() -> None:
        async with (
            connected(cfg) as client,
            runtime.serving(make_app(client, Keys(cfg.redis.namespace)), host, port),
        ):
            click.echo(f"status page on http://{host}:{port}/")
            with runtime.StopSignals() as signals:
                await signals.event.wait()

    runtime.run(go())


@main.command(name="serve-dataset")
@click.option("--host", help="Address to listen on (dataset.host).")
@click.option("--port", type=int, help="Port (dataset.port; 0: any free port).")
@pass_state
def serve_dataset(state: State, host: str | None, port: int | None) -> None:
    """Serve the crawled corpus read-only from OUTPUT: the dataset API (/datasets/mmc4,
    bearer tokens from dataset.token_hashes) and /openapi.json. No Redis needed; shards
    appear as the crawl indexes them."""
    from crawler.dataset.serve import serve

    cfg = state.load()
    sys.exit(
        runtime.run(
            serve(cfg, host or cfg.dataset.host, cfg.dataset.port if port is None else port)
        )
    )


@main.command(name="dataset-token")
def dataset_token() -> None:
    """Print a new bearer token for the dataset API and the hash to put in
    dataset.token_hashes (the server keeps only hashes)."""
    from crawler.dataset.auth import new_token, token_hash

    token = new_token()
    click.echo(f"token: {token}")
    click.echo(f"hash:  {token_hash(token)}")
    click.echo("add the hash to dataset.token_hashes; give the token to its user", err=True)


@main.command(name="dataset-index")
@click.option("--shard", "only", multiple=True, help="Only these shards (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild indexes that are up to date.")
@pass_state
def dataset_index(state: State, only: tuple[str, ...], force: bool) -> None:
    """(Re)build the dataset index of every rewritten shard under OUTPUT (the crawl builds
    it as each shard's rewrite completes)."""
    from assign.index import index_shard, shard_files
    from assign.tree import open_tree

    cfg = state.load()
    output = open_tree(cfg.paths.output, cfg.storage)
    shards, where = (
        (open_tree(cfg.assign.output, cfg.storage), "")
        if cfg.assign.output
        else (output, status.SHARDS_DIR)
    )
    done = failed = 0
    for shard, name in shard_files(shards, where):
        if only and shard not in only:
            continue
        try:
            index_shard(output, shard, shards.url(name), force=force)
            done += 1
        except (OSError, ValueError) as exc:
            failed += 1
            click.echo(f"{shard}: {exc}", err=True)
    click.echo(f"{done} shards indexed, {failed} failed")
    sys.exit(ExitCode.FAILURE if failed else ExitCode.OK)


@main.command()
@click.argument("out")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["webdataset"]),
    default="webdataset",
    help="Output format: WebDataset tar shards of whole documents.",
)
@click.option(
    "--images",
    "layout",
    type=click.Choice(["base64", "members"]),
    default="base64",
    help="base64: inside image_info[i].image_base64 (OpenFlamingo's MMC4 loader); members: "
    "each image a tar member of its own (smaller, faster).",
)
@click.option("--all-stored", is_flag=True, help="Only documents whose images were all stored.")
@click.option(
    "--min-stored",
    type=click.IntRange(0, 0xFFFF),
    default=1,
    help="Only documents with at least this many stored images.",
)
@click.option(
    "--min-images",
    type=click.IntRange(0, 0xFFFF),
    default=0,
    help="Only documents naming at least this many images.",
)
@click.option(
    "--max-docs", type=click.IntRange(min=1), default=1000, help="Documents per tar at most."
)
@click.option(
    "--max-tar-mb",
    type=click.FloatRange(min=0.01),
    default=1024.0,
    help="Size of a tar at most, in MB (a single larger document gets a tar alone).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=0,
    help="Shards exported at once (0: one per CPU).",
)
@click.option("--shard", "only", multiple=True, help="Only these shards (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@pass_state
def export(
    state: State,
    out: str,
    fmt: str,
    layout: str,
    all_stored: bool,
    min_stored: int,
    min_images: int,
    max_docs: int,
    max_tar_mb: float,
    processes: int,
    only: tuple[str, ...],
    no_progress: bool,
) -> None:
    """Write the indexed corpus under OUTPUT as training-ready tar shards in OUT, a directory
    or s3://bucket/prefix (one sample per document). Resumable: a rerun skips finished tars.
    corpus.skip_url_duplicates leaves out flagged documents."""
    from dataclasses import asdict

    from crawler.dataset.export import ExportSettings
    from crawler.dataset.export import export as run_export

    cfg = state.load()
    settings = ExportSettings(
        out=out,
        layout=layout,
        min_stored=min_stored,
        all_stored=all_stored,
        min_images=min_images,
        skip_url_duplicates=cfg.corpus.skip_url_duplicates,
        max_docs=max_docs,
        max_bytes=int(max_tar_mb * 1e6),
    )
    summary = run_export(
        cfg.paths.output,
        settings,
        processes=processes,
        progress=not no_progress,
        only=list(only) or None,
        storage=cfg.storage,
    )
    for error in summary.errors:
        click.echo(f"error: {error}", err=True)
    click.echo(orjson.dumps(asdict(summary) | {"errors": len(summary.errors)}).decode())
    sys.exit(ExitCode.FAILURE if summary.failed_shards else ExitCode.OK)


@main.command()
@click.option(
    "--status", "statuses", required=True,
    help="Comma-separated statuses to re-queue, e.g. timeout,connection_error,http_503.",
)  # fmt: skip
@click.option("--shard", "only", multiple=True, help="Only these shards (repeatable).")
@pass_state
def retry(state: State, statuses: str, only: tuple[str, ...]) -> None:
    """Re-queue images of the chosen statuses, from shards in flight and from reports of
    earlier runs. Workers (or the next `run`) then fetch them again."""
    from core.embedded import EmbeddedRedis, running_url
    from core.runtime import StopSignals, failure, until_stopped
    from core.storage import output_storage
    from crawler.queue import WorkQueue
    from crawler.shards import Shards

    cfg = state.load()
    wanted = {s.strip() for s in statuses.split(",") if s.strip()}
    unknown = sorted(s for s in wanted if not status.is_failure_status(s))
    if unknown or not wanted:
        raise CommandError(
            ExitCode.NOT_FOUND,
            f"unknown status {', '.join(unknown) or repr(statuses)}: choose from "
            f"{', '.join(status.FAILURE_STATUSES)} or http_<code> (e.g. http_503)",
        )
    embedded = None
    if not cfg.redis.url:
        url = running_url(Path(cfg.paths.data_dir))
        if url is None:  # no `run` is running: open its Redis (its AOF) for the change
            embedded = EmbeddedRedis(Path(cfg.paths.data_dir))
            url = embedded.start()
        cfg.redis.url = url

    moved: dict[str, int] = {}
    storage = output_storage(cfg)

    async def requeue(shards: Shards, signals: StopSignals) -> None:
        await shards.queue.ensure_group()
        names = set(await shards.open())
        reports = await storage.names(status.STATUS_DIR)  # one listing
        names |= {n[: -len(".jsonl.gz")] for n in reports if n.endswith(".jsonl.gz")}
        for shard in sorted(names):
            if signals.event.is_set():
                return  # each shard is re-queued whole or not at all: a rerun goes on
            if only and shard not in only:
                continue
            n = await shards.reopen(shard, wanted)
            if n:
                moved[shard] = n

    async def go() -> int:
        with StopSignals() as signals:
            async with connected(cfg) as client:
                keys = Keys(cfg.redis.namespace)
                queue = WorkQueue(client, keys, cfg.queue)
                exc = failure(
                    await until_stopped(
                        requeue(Shards(client, keys, queue, storage), signals),
                        signals.event,
                    )
                )
                if exc is not None:
                    raise exc
            return signals.code or ExitCode.OK

    try:
        code = runtime.run(go())
    finally:
        if embedded is not None:
            embedded.stop()
    total = sum(moved.values())
    for shard, n in moved.items():
        click.echo(f"{shard}: {n} re-queued")
    click.echo(f"{total} images re-queued from {len(moved)} shards")
    if code:
        click.echo("stopped by a signal: run the same command again to re-queue the rest", err=True)
    sys.exit(code)


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def clear(state: State, yes: bool) -> None:
    """Delete every Redis key of the crawl's namespace (redis.namespace): queue, leases,
    counters, shards in flight, history. Files in the output directory (images, reports,
    rewritten shards) stay; a later `run` or `enqueue` skips the shards reported there.
    Stop the crawl's workers first."""
    cfg = state.load()
    _guard(cfg)
    keys = Keys(cfg.redis.namespace)

    async def count() -> int:
        async with connected(cfg) as client:
            return len([k async for k in client.scan_iter(match=keys.all_pattern, count=1000)])

    async def delete() -> int:
        deleted = 0
        async with connected(cfg) as client:
            batch: list[Any] = []
            async for key in client.scan_iter(match=keys.all_pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(await client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await client.unlink(*batch))
        return deleted

    from core.errors import redact

    where = f"namespace {cfg.redis.namespace!r} at {redact(cfg.redis.url)}"
    n = runtime.run(count())
    if n == 0:
        raise CommandError(ExitCode.NOT_FOUND, f"{where} has no keys: nothing to clear")
    if not yes:
        click.confirm(f"Delete the {n} keys of {where}?", abort=True, err=True)
    click.echo(f"deleted {runtime.run(delete())} keys of {where}")


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


def _check_bucket(cfg: Config) -> None:
    """An output in object storage that cannot be written (a missing bucket, refused
    credentials, an unreachable endpoint) stops the command before it starts. (A local
    output that cannot be written pauses the workers until it can: a full disk clears.)"""
    from core.storage import output_storage
    from crawler.store import output_problem

    storage = output_storage(cfg)
    if storage.remote:
        problem = output_problem(storage)
        if problem:
            raise CommandError(
                ExitCode.OUTPUT_UNAVAILABLE,
                f"cannot write the output: {problem}; check paths.output, the bucket and "
                "AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
            )


def _guard(cfg: Config) -> None:
    """Find the crawl's Redis: redis.url, else the private Redis of a `run` that is running
    with the same paths.data_dir."""
    if cfg.redis.url:
        return
    from core.embedded import running_url

    url = running_url(Path(cfg.paths.data_dir))
    if url is None:
        raise CommandError(
            ExitCode.USAGE,
            "redis.url is not set (use --redis-url, MMC4_REDIS__URL or config.toml) and no "
            f"`run` is running with data directory {cfg.paths.data_dir} (paths.data_dir)",
        )
    cfg.redis.url = url
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta["mmc4.redis_url"] = url


if __name__ == "__main__":  # pragma: no cover
    main()
