"""The `mmc4-crawl` commands that change what the crawl's Redis holds: retry (re-queue images
of chosen statuses) and clear (delete the namespace)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from core import runtime, status
from core.config import Config
from core.connection import connected
from core.errors import CommandError
from core.exitcodes import ExitCode
from core.keys import Keys
from core.preflight import check_bucket
from crawler.cli_common import State, find_redis, pass_state

if TYPE_CHECKING:
    from core.embedded import EmbeddedRedis


@click.command()
@click.option(
    "--status", "statuses", required=True,
    help="Comma-separated statuses to re-queue, e.g. timeout,connection_error,http_503.",
)  # fmt: skip
@click.option("--shard", "only", multiple=True, help="Only these shards (repeatable).")
@pass_state
def retry(state: State, statuses: str, only: tuple[str, ...]) -> None:
    """Re-queue images of the chosen statuses, from shards in flight and from reports of
    earlier runs. Workers (or the next `run`) then fetch them again."""
    from core.runtime import StopSignals, failure, until_stopped
    from core.storage import output_storage
    from crawler.queue import WorkQueue
    from crawler.shards import Shards

    cfg = state.load()
    wanted = _wanted(statuses)
    check_bucket(cfg.paths.output, cfg.storage)
    embedded = _open_redis(cfg)

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


def _wanted(statuses: str) -> set[status.Status]:
    """The statuses named by --status; a name that is not a failure status is an error."""
    named = {s.strip() for s in statuses.split(",") if s.strip()}
    wanted = {s for s in named if status.is_failure_status(s)}
    unknown = sorted(named - wanted)
    if unknown or not wanted:
        raise CommandError(
            ExitCode.NOT_FOUND,
            f"unknown status {', '.join(unknown) or repr(statuses)}: choose from "
            f"{', '.join(status.FAILURE_STATUSES)} or http_<code> (e.g. http_503)",
        )
    return wanted


def _open_redis(cfg: Config) -> EmbeddedRedis | None:
    """Point cfg at the crawl's Redis: redis.url, else the private Redis of a `run` that is
    running, else that Redis started from its AOF for the change (returned: stop it after)."""
    if cfg.redis.url:
        return None
    from core.embedded import EmbeddedRedis, running_url

    embedded = None
    url = running_url(Path(cfg.paths.data_dir))
    if url is None:  # no `run` is running: open its Redis (its AOF) for the change
        embedded = EmbeddedRedis(Path(cfg.paths.data_dir))
        url = embedded.start()
    cfg.redis.url = url
    return embedded


@click.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def clear(state: State, yes: bool) -> None:
    """Delete every Redis key of the crawl's namespace (redis.namespace): queue, leases,
    counters, shards in flight, history. Files in the output directory (images, reports,
    rewritten shards) stay; a later `run` or `enqueue` skips the shards reported there.
    Stop the crawl's workers first."""
    cfg = state.load()
    find_redis(cfg)
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


COMMANDS = (retry, clear)
