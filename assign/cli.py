"""``mmc4-crawl assign`` (also ``mmc4-assign``): rewrite shards' image-to-sentence assignments,
by hand or as a worker."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click
import orjson

from assign.document import AssignOptions
from assign.index import INDEX_DIR
from assign.rewrite import ShardReport, describe, rewrite_shard
from assign.solve import SOLVERS, Solver
from assign.status import load_stored_images
from core import logs, runtime
from core.config import Config
from core.errors import ReportingGroup
from core.exitcodes import ExitCode
from core.preflight import check_bucket
from core.shardfiles import is_shard_file, output_name

log = logging.getLogger("assign.worker")


@click.group(cls=ReportingGroup)
def main() -> None:
    """Recompute MMC4 image-to-sentence assignments (lapjv, as the reference does)."""


URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")  # Path("s3://b/p") is "s3:/b/p"


def _local(_ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """`assign shard` works on local files: a URL (s3://…) would become a local directory."""
    if value is not None and URL_SCHEME.match(str(value)):
        raise click.BadParameter(
            f"{value} is a URL; `assign shard` reads and writes local paths (a bucket's shards "
            "are rewritten by `mmc4-crawl assign worker`)",
            param=param,
        )
    return value


@main.command("shard")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    callback=_local,
    help="Directory for rewritten shards (default: beside each input; a .jsonl input is "
    "replaced atomically).",
)
@click.option("--solver", type=click.Choice(SOLVERS), default="lapjv", show_default=True)
@click.option(
    "--report",
    "status_report",
    type=click.Path(exists=True, path_type=Path),
    help="Crawler status report (.jsonl.gz) for downloaded-only mode; with several shards, "
    "the directory holding <shard>.jsonl.gz reports.",
)
@click.option(
    "--images-dir",
    type=click.Path(file_okay=False, path_type=Path),
    callback=_local,
    help="Crawler output directory, prefixed to each stored image's path in local_path.",
)
@click.option(
    "--keep-empty/--drop-empty",
    default=False,
    show_default=True,
    help="Downloaded-only mode: keep documents left with no image.",
)
@click.option("--force", is_flag=True, help="Rewrite even shards already complete.")
def shard_command(
    paths: tuple[Path, ...],
    output: Path | None,
    solver: Solver,
    status_report: Path | None,
    images_dir: Path | None,
    keep_empty: bool,
    force: bool,
) -> None:
    """Rewrite shards (.jsonl, .jsonl.gz, .jsonl.zip files or directories of them)."""
    plan = _plan(paths, output)
    if status_report is not None and status_report.is_file() and len(plan) > 1:
        raise click.UsageError("--report FILE goes with one shard; pass a directory for several")
    failed = 0
    for source, target in plan:
        try:
            report = _rewrite_one(
                source, target, solver, status_report, images_dir, keep_empty, force
            )
        except (OSError, ValueError) as exc:
            failed += 1
            click.echo(f"{source}: {exc}", err=True)
            continue
        click.echo(orjson.dumps(report.to_dict()).decode())
    if failed:
        sys.exit(1)


@main.command("worker")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, help="section.key=value (repeatable).")
@click.option("--once", is_flag=True, help="Rewrite what is waiting, then exit.")
@click.option(
    "--check", is_flag=True, help="Health check: exit 0 if an assign worker on this host is alive."
)
@click.pass_context
def worker_command(
    ctx: click.Context,
    config_path: Path | None,
    overrides: tuple[str, ...],
    once: bool,
    check: bool,
) -> None:
    """Rewrite every shard the crawler announces on Redis (consumer group "assign").

    --check (container health check): exit 0 when an assign worker on this host (hostname)
    has a fresh heartbeat in Redis, 1 when it is missing or stale.
    """
    from core.config import ConfigError, load

    try:
        logs.setup()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    outer_path, outer_overrides = _outer_configuration(ctx)
    try:
        cfg = load(config_path or outer_path, overrides=[*outer_overrides, *overrides])
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if check:
        sys.exit(runtime.run(_check(cfg)))
    check_bucket(cfg.paths.output, cfg.storage, directory=INDEX_DIR)
    check_bucket(cfg.assign.output, cfg.storage, setting="assign.output")
    runtime.run_and_exit(_work(cfg, once=once))


async def _work(cfg: Config, *, once: bool) -> int:
    """The worker until a signal: the shard in hand is finished within
    worker.grace_period_s, else left to be rewritten again (its entry is still pending), and
    the worker exits 0; a second signal exits at once."""
    from assign.worker import run_assign_worker

    with runtime.StopSignals() as signals:
        work = run_assign_worker(cfg, stop=signals.event, once=once)
        task = await runtime.until_stopped(work, signals.event, cfg.worker.grace_period_s)
    if task.cancelled() or not task.done():
        log.warning(
            "assign: a shard was not finished within the grace period (%gs): it is rewritten "
            "again by the next worker",
            cfg.worker.grace_period_s,
        )
    exc = runtime.failure(task)
    if exc is not None:
        raise exc
    return ExitCode.OK


def _outer_configuration(ctx: click.Context) -> tuple[str | Path | None, list[str]]:
    """Under ``mmc4-crawl [--config F] [--set K=V] [--redis-url U] assign worker``, the outer
    command's configuration (its context object carries ``config_path`` and ``overrides``);
    this command's own ``--config`` and ``--set`` come on top."""
    outer = ctx.find_root().obj
    return getattr(outer, "config_path", None), list(getattr(outer, "overrides", []))


async def _check(cfg: Config) -> int:
    from core.heartbeat import check_heartbeat
    from core.keys import Keys

    ok, why = await check_heartbeat(cfg, Keys(cfg.redis.namespace).assign_worker_pattern)
    if not ok:
        click.echo(why, err=True)
    return 0 if ok else 1


def _plan(paths: tuple[Path, ...], output: Path | None) -> list[tuple[Path, Path]]:
    """(source, destination) pairs; two sources may not share a destination."""
    sources: list[Path] = []
    for path in paths:
        if path.is_dir():
            sources.extend(sorted(p for p in path.iterdir() if is_shard_file(p)))
        else:
            sources.append(path)
    plan: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    for source in sources:
        target = (output if output is not None else source.parent) / output_name(source.name)
        key = target.resolve()
        if key in seen:
            raise click.UsageError(
                f"{seen[key]} and {source} would both be written to {target}; pass --output"
            )
        seen[key] = source
        plan.append((source, target))
    return plan


def _rewrite_one(
    source: Path,
    target: Path,
    solver: Solver,
    status_report: Path | None,
    images_dir: Path | None,
    keep_empty: bool,
    force: bool,
) -> ShardReport:
    report_file = _status_report_for(target, status_report)
    stored = None
    if report_file is not None:
        stored = load_stored_images(report_file, images_dir)
    options = AssignOptions(solver=solver, stored=stored, keep_empty_documents=keep_empty)
    settings = describe(options, str(report_file) if report_file is not None else None)
    return rewrite_shard(source, target, options, settings=settings, force=force)


def _status_report_for(target: Path, status_report: Path | None) -> Path | None:
    if status_report is None or status_report.is_file():
        return status_report
    candidate = status_report / f"{target.name[: -len('.jsonl')]}.jsonl.gz"
    if not candidate.is_file():
        raise ValueError(f"no status report {candidate}")
    return candidate
