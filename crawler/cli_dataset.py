"""The dataset commands of `mmc4-crawl`: serve-dataset, dataset-token, dataset-index, export.
None of them needs Redis."""

from __future__ import annotations

import sys

import click
import orjson

from core import runtime, status
from core.exitcodes import ExitCode
from core.preflight import check_bucket
from crawler.cli_common import State, pass_state


@click.command(name="serve-dataset")
@click.option("--host", help="Address to listen on (dataset.host).")
@click.option("--port", type=int, help="Port (dataset.port; 0: any free port).")
@pass_state
def serve_dataset(state: State, host: str | None, port: int | None) -> None:
    """Serve the crawled corpus read-only from OUTPUT: the dataset API (/datasets/mmc4,
    bearer tokens from dataset.token_hashes) and /openapi.json. No Redis needed; shards
    appear as the crawl indexes them."""
    from assign.index import INDEX_DIR
    from crawler.dataset.serve import serve

    cfg = state.load()
    check_bucket(cfg.paths.output, cfg.storage, write=False, directory=INDEX_DIR)
    sys.exit(
        runtime.run(
            serve(cfg, host or cfg.dataset.host, cfg.dataset.port if port is None else port)
        )
    )


@click.command(name="dataset-token")
def dataset_token() -> None:
    """Print a new bearer token for the dataset API and the hash to put in
    dataset.token_hashes (the server keeps only hashes)."""
    from crawler.dataset.auth import new_token, token_hash

    token = new_token()
    click.echo(f"token: {token}")
    click.echo(f"hash:  {token_hash(token)}")
    click.echo("add the hash to dataset.token_hashes; give the token to its user", err=True)


@click.command(name="dataset-index")
@click.option("--shard", "only", multiple=True, help="Only these shards (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild indexes that are up to date.")
@pass_state
def dataset_index(state: State, only: tuple[str, ...], force: bool) -> None:
    """(Re)build the dataset index of every rewritten shard under OUTPUT (the crawl builds
    it as each shard's rewrite completes)."""
    from assign.index import INDEX_DIR, index_shard, shard_files
    from assign.tree import open_tree

    cfg = state.load()
    check_bucket(cfg.paths.output, cfg.storage, directory=INDEX_DIR)
    check_bucket(cfg.assign.output, cfg.storage, write=False, setting="assign.output")
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


@click.command()
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

    from assign.index import INDEX_DIR
    from crawler.dataset.export import PROGRESS_DIR
    from crawler.dataset.export import export as run_export
    from crawler.dataset.exportjob import ExportSettings

    cfg = state.load()
    check_bucket(cfg.paths.output, cfg.storage, write=False, directory=INDEX_DIR)
    check_bucket(out, cfg.storage, directory=PROGRESS_DIR, setting="OUT")
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


COMMANDS = (serve_dataset, dataset_token, dataset_index, export)
