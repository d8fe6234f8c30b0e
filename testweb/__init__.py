"""A web of our own on loopback for the tests, the demo and the benchmarks: real images and real
faults (testweb.server has the URL scheme). Test tooling: not part of the installed package."""

from testweb.arrivals import (
    Arrival,
    check_concurrency,
    check_rate,
    max_concurrency,
    min_interval,
    read_arrivals,
)
from testweb.images import ImageSpec, SpecError, gif_of_frames, make_bomb_png, render_image
from testweb.process import WebProcess, start_subprocess
from testweb.server import ImageWeb, Latency
from testweb.shards import FAULT_KINDS, fault_path, make_docs, write_shard

__all__ = [
    "FAULT_KINDS",
    "Arrival",
    "ImageSpec",
    "ImageWeb",
    "Latency",
    "SpecError",
    "WebProcess",
    "check_concurrency",
    "check_rate",
    "fault_path",
    "gif_of_frames",
    "make_bomb_png",
    "make_docs",
    "max_concurrency",
    "min_interval",
    "read_arrivals",
    "render_image",
    "start_subprocess",
    "write_shard",
]
