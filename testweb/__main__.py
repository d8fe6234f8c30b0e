"""``python -m testweb serve|shard``: the test web as a process, and shards for it."""

from __future__ import annotations

import sys
from typing import Literal

import click

from core import runtime
from testweb.server import ImageWeb, Latency
from testweb.shards import make_docs, write_shard


@click.group()
def cli() -> None:
    """A loopback image web for mmc4-crawler tests, demo and benchmark."""


@cli.command()
@click.option("--hosts", default=8, show_default=True, help="Number of loopback hosts.")
@click.option("--port", default=18650, show_default=True, help="Port for all hosts (0: any).")
@click.option("--first-host", default=2, show_default=True, help="First address 127.0.0.N.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="JSONL arrival log.")
@click.option("--seed", default=0, show_default=True)
@click.option("--latency-median-ms", type=float, default=None, help="Enable lognormal latency.")
@click.option("--latency-sigma", type=float, default=0.5, show_default=True)
@click.option("--slow-host-share", type=float, default=0.0, show_default=True)
@click.option(
    "--slow-mode", type=click.Choice(["delay", "trickle"]), default="delay", show_default=True
)
@click.option("--slow-delay-ms", type=float, default=5000.0, show_default=True)
@click.option("--slow-bytes-per-s", type=int, default=20000, show_default=True)
def serve(
    hosts: int,
    port: int,
    first_host: int,
    log_path: str | None,
    seed: int,
    latency_median_ms: float | None,
    latency_sigma: float,
    slow_host_share: float,
    slow_mode: Literal["delay", "trickle"],
    slow_delay_ms: float,
    slow_bytes_per_s: int,
) -> None:
    """Serve until SIGTERM/SIGINT; prints the base URLs, then READY."""
    latency = None
    if latency_median_ms is not None or slow_host_share > 0:
        latency = Latency(
            median_ms=latency_median_ms or 0.0,
            sigma=latency_sigma,
            slow_host_share=slow_host_share,
            slow_mode=slow_mode,
            slow_delay_ms=slow_delay_ms,
            slow_bytes_per_s=slow_bytes_per_s,
        )
    imageweb = ImageWeb(
        hosts, port, first_host=first_host, latency=latency, seed=seed, log_path=log_path
    )
    runtime.run(_serve_until_signal(imageweb))


async def _serve_until_signal(imageweb: ImageWeb) -> None:
    with runtime.StopSignals() as signals:
        async with imageweb:
            for url in imageweb.host_urls:
                click.echo(url)
            if imageweb.slow_hosts:
                click.echo(f"slow hosts: {sorted(imageweb.slow_hosts)}")
            click.echo("READY")
            sys.stdout.flush()
            await signals.event.wait()


@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--port", default=18650, show_default=True)
@click.option("--hosts", default=8, show_default=True)
@click.option("--first-host", default=2, show_default=True)
@click.option("--docs", "n_docs", default=200, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--images-per-doc", default="1-6", show_default=True, help="N or MIN-MAX.")
@click.option("--sizes", type=click.Choice(["realistic", "small"]), default="realistic")
@click.option("--faults/--no-faults", default=False, help="Mix in faults (see --fault-rate).")
@click.option("--fault-rate", type=float, default=0.04, show_default=True)
def shard(
    out: str,
    port: int,
    hosts: int,
    first_host: int,
    n_docs: int,
    seed: int,
    images_per_doc: str,
    sizes: Literal["realistic", "small"],
    faults: bool,
    fault_rate: float,
) -> None:
    """Write an MMC4-shaped shard (.jsonl or .jsonl.gz) whose images live on the test web."""
    lo_s, _, hi_s = images_per_doc.partition("-")
    per_doc = (int(lo_s), int(hi_s or lo_s))
    bases = [f"http://{addr}:{port}" for addr in ImageWeb(hosts, first_host=first_host).host_addrs]
    docs = make_docs(
        bases,
        n_docs,
        seed=seed,
        images_per_doc=per_doc,
        sizes=sizes,
        faults=fault_rate if faults else None,
    )
    n = write_shard(out, docs)
    images = sum(len(d["image_info"]) for d in docs)
    click.echo(f"wrote {n} documents, {images} images to {out}")


if __name__ == "__main__":
    cli()
