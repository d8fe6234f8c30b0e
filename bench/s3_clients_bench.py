"""Which S3 client library the crawl uses, by measurement: PUT N objects of 40 kB (a shrunk
image's typical size) with bounded concurrency to a SeaweedFS server on loopback, with each of
obstore, aiobotocore and s3fs; print objects/s and CPU per object (user+sys of this process,
every thread included) of each, and their ratios to obstore.

    make bench-s3-clients                     # N=3000, 32 in flight
    .venv-s3bench/bin/python bench/s3_clients_bench.py --objects 3000 --concurrency 32

The clients run in a venv of their own (`.venv-s3bench`): aiobotocore needs an aiohttp the
crawler does not use. The server's CPU is not counted (it is the same for every client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (core.early, without installing the crawler here)
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS  # noqa: E402

BUCKET = "bench-clients"
Put = Callable[[str, bytes], Awaitable[Any]]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_puts(put: Put, prefix: str, n: int, concurrency: int, body: bytes) -> float:
    """Seconds to PUT n objects, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await put(f"{prefix}/{i:07d}.jpg", body)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start


async def with_obstore(endpoint: str, run: Callable[[Put], Awaitable[float]]) -> float:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET, endpoint=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
        region=REGION, client_options={"allow_http": True},
    )  # fmt: skip
    return await run(lambda key, data: obstore.put_async(store, key, data))


async def with_aiobotocore(endpoint: str, run: Callable[[Put], Awaitable[float]]) -> float:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=64, retries={"mode": "standard"})
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name=REGION, config=config,
    ) as client:  # fmt: skip
        return await run(lambda key, data: client.put_object(Bucket=BUCKET, Key=key, Body=data))


async def with_s3fs(endpoint: str, run: Callable[[Put], Awaitable[float]]) -> float:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY, secret=SECRET_KEY, asynchronous=True,
        client_kwargs={"endpoint_url": endpoint, "region_name": REGION},
    )  # fmt: skip
    session = await fs.set_session()
    try:
        return await run(lambda key, data: fs._pipe_file(f"{BUCKET}/{key}", data))
    finally:
        await session.close()


CLIENTS = {"obstore": with_obstore, "aiobotocore": with_aiobotocore, "s3fs": with_s3fs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--size", type=int, default=40_000, help="bytes per object")
    args = ap.parse_args()
    body = os.urandom(args.size)
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="s3-clients-") as tmp:
        server = SeaweedFS(Path(tmp))
        server.start()
        try:
            server.create_bucket(BUCKET)
            for name, client in CLIENTS.items():

                async def run(put: Put, name: str = name) -> float:
                    await run_puts(put, f"warm-{name}", 50, args.concurrency, body)
                    return await run_puts(put, name, args.objects, args.concurrency, body)

                cpu0 = cpu_s()
                wall = asyncio.run(client(server.endpoint, run))
                cpu = cpu_s() - cpu0
                results[name] = (args.objects / wall, cpu / (args.objects + 50) * 1000)
        finally:
            server.stop()
    print(
        f"{args.objects} PUTs of {args.size} B, {args.concurrency} in flight, SeaweedFS on loopback"
    )
    print(f"{'client':<12} {'objects/s':>10} {'CPU ms/object':>14} {'rate ÷ obstore':>15} "
          f"{'CPU ÷ obstore':>14}")  # fmt: skip
    base_rate, base_cpu = results["obstore"]
    for name, (rate, cpu_ms) in results.items():
        print(f"{name:<12} {rate:>10.0f} {cpu_ms:>14.3f} {rate / base_rate:>15.2f} "
              f"{cpu_ms / base_cpu:>14.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
