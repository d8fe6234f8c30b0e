# size: one dataclass per settings section and the range of every numeric setting, in one
# module: every setting is defined, checked and found from here.
"""All settings in one typed place.

Precedence, lowest to highest: the dataclass defaults (mirrored and documented in the shipped
``config.toml``), a TOML file, environment variables ``MMC4_<SECTION>__<KEY>`` (for example
``MMC4_REDIS__URL``), then ``--set section.key=value`` flags and the named CLI flags.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MMC4_"
RESAMPLE_FILTERS = ("bilinear", "box", "bicubic", "lanczos")
IMAGE_FORMATS = ("keep", "jpeg", "webp")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class RedisConfig:
    """[redis]: core/connection.py connects with it; the workers, ingest and the commands."""

    # redis:// or rediss:// URL (password in the URL). Empty: start a private redis-server
    # with AOF persistence inside paths.data_dir (the `run` command only).
    url: str = ""
    # A file holding the Redis password (a container secret), used when the URL has none.
    password_file: str = ""
    # Prefix of every key this project writes, so that several crawls can share one Redis.
    namespace: str = "mmc4"
    # Seconds between reconnect attempts while Redis is unreachable (doubles up to 30 s).
    reconnect_backoff_s: float = 0.5
    # A Redis reply that takes longer than this counts as a lost connection (the call is
    # retried): no process waits forever on a half-open connection.
    socket_timeout_s: float = 15.0


@dataclass
class PathsConfig:
    """[paths]: core/storage.py (output); runner.py, cli_common.py (data_dir: the private Redis)."""

    # Images land in OUTPUT/<shard>/<image_name>; per-shard reports in OUTPUT/_status/.
    # A local directory or object storage: "s3://bucket/prefix" (see [storage]).
    output: str = "mmc4_output"
    # Embedded Redis data (AOF) and other local state.
    data_dir: str = "mmc4_data"


@dataclass
class StorageConfig:
    """[storage]: core/storage.py and assign/tree.py (the S3 client: retries, timeouts)."""

    # Object storage (paths.output = "s3://bucket/prefix"). Endpoint, region and credentials
    # come from the environment: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    # AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), or web identity / instance metadata.
    # Requests of one process in flight at once (uploads, reads, listings).
    max_inflight: int = 64
    # A failed request (5xx such as SlowDown, a dropped connection, a timeout) is retried
    # up to this many times, with exponential backoff and jitter ...
    max_retries: int = 10
    # ... from this many seconds, doubling up to backoff_max_s ...
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 15.0
    # ... and no longer than this in all.
    retry_timeout_s: float = 180.0
    # Seconds one request may take, and to connect.
    request_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    # Allow a plain http:// endpoint (a test or in-cluster server); AWS_ALLOW_HTTP=true too.
    allow_http: bool = False
    # A named profile of ~/.aws/credentials and ~/.aws/config (needs boto3: the aws-profile
    # extra). Empty: AWS_PROFILE when it is set and AWS_ACCESS_KEY_ID is not.
    profile: str = ""


@dataclass
class IngestConfig:
    """[ingest]: crawler/ingest.py (batches, backpressure, bounds), core/shardfiles.py."""

    # Shard sources: local .jsonl/.jsonl.gz/.jsonl.zip paths, directories, http(s) URLs,
    # with bash brace patterns, e.g. "docs_no_face_shard_{0..23098}_v2.jsonl.zip".
    shards: list[str] = field(default_factory=list)
    # Backpressure: ingest pauses while this many items wait in the queue.
    max_queue_depth: int = 100_000
    # Items enqueued per Redis round trip.
    batch_size: int = 1000
    # Seconds to wait before checking the queue depth again while it is full.
    backpressure_poll_s: float = 0.5
    # Timeout for downloading one remote shard.
    download_timeout_s: float = 600.0
    # A remote shard larger than this (bytes, as downloaded) is refused: download_too_large.
    max_download_bytes: int = 1 << 30
    # A shard that decompresses to more than this (bytes) ends there: shard_too_large.
    max_shard_bytes: int = 1 << 30
    # A line (document) longer than this (bytes) is skipped and counted: line_too_long.
    max_line_bytes: int = 16 << 20
    # `enqueue`: seconds to keep reconnecting to an unreachable Redis before giving up
    # (exit code 3). 0: keep trying.
    redis_wait_s: float = 300.0


@dataclass
class QueueConfig:
    """[queue]: crawler/queue.py (leases, deliveries, dead letters), the workers."""

    # A leased item not acknowledged (nor renewed) within this many seconds is reclaimed.
    lease_timeout_s: float = 120.0
    # An item delivered this many times without a result goes to the dead letters.
    max_deliveries: int = 5
    # Items read per XREADGROUP call.
    read_batch: int = 500
    # Seconds between reclaim sweeps of expired leases.
    reclaim_interval_s: float = 5.0
    # Dead-letter stream length cap (approximate).
    dead_letter_maxlen: int = 1_000_000


@dataclass
class WorkerConfig:
    """[worker]: crawler/worker.py, pool.py (image processes), core/heartbeat.py."""

    # Items one worker process holds at once (fetching, waiting for a host, or processing).
    window: int = 2000
    # Concurrent HTTP connections per worker process.
    max_connections: int = 1000
    # Image processes per worker (0: one per CPU this process may use, a container's CPU
    # quota included).
    image_processes: int = 0
    # Pin image process i to the i-th CPU this process may use (round robin), when the image
    # processes cover all of those CPUs (never under a CPU quota narrower than the mask:
    # there, pinning would stack every container's processes on the same few CPUs).
    pin_image_processes: bool = False
    # Downloaded bodies waiting for an image process, in MB: while more than this waits, no
    # new request starts (bounds memory when image work, not the network, is the limit).
    max_waiting_image_mb: int = 128
    # Freed memory, in MB, each image process keeps for its next images instead of handing
    # it back to the kernel (glibc): fewer page faults per image; resident size stays at
    # each process's high-water mark. 0: the C library's defaults.
    image_process_heap_mb: int = 256
    # Results are written to Redis in batches: at most this many, at least this often.
    flush_batch: int = 500
    flush_interval_s: float = 0.25
    # Heartbeat key TTL is three times this.
    heartbeat_interval_s: float = 5.0
    # SIGTERM: seconds to finish in-flight work before handing the rest back.
    grace_period_s: float = 30.0
    # Crawl worker processes started by `run`.
    processes: int = 1
    # Seconds between a worker's one-line INFO summaries (images done, rate, failures by
    # kind); each kind of failure is also logged once per host per this interval.
    log_interval_s: float = 60.0


@dataclass
class FetchConfig:
    """[fetch]: core/fetch.py, session.py, guard.py, crawler/retries.py, pipeline.py."""

    user_agent: str = "Googlebot-Image/1.0"
    x_forwarded_for: str = "64.18.15.200"
    # Extra request headers, e.g. {"Accept" = "image/*"}.
    headers: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    # Hard deadline for one attempt, headers and body of all its redirect hops included (a
    # trickling server ends here).
    total_timeout_s: float = 30.0
    # Within that ceiling an attempt gets twice the slowest of its host's recent responses, but
    # at least this (a host answering in 200 ms is not waited on for 30 s).
    min_timeout_s: float = 3.0
    max_redirects: int = 5
    # Bodies larger than this are cut off and recorded as too_large.
    max_body_bytes: int = 20_000_000
    # Attempts for transient failures (timeouts, connection errors, 429, 5xx), first included.
    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    # A Retry-After longer than this is capped to it.
    retry_after_max_s: float = 120.0
    # Honour X-Robots-Tag noai / noimageai.
    respect_opt_out: bool = True
    # Agent names whose `agent: directive` X-Robots-Tag entries apply to us.
    opt_out_agents: list[str] = field(
        default_factory=lambda: ["googlebot-image", "googlebot", "mmc4-crawler"]
    )
    # Networks reachable although not public, e.g. ["127.0.0.0/8"] for a loopback test web
    # or ["10.1.2.0/24"] for an internal mirror (everything else non-public stays refused).
    allow_networks: list[str] = field(default_factory=list)
    # Allow every destination, loopback/private/link-local included (tests and demo only).
    allow_private_addresses: bool = False
    dns_cache_ttl_s: int = 300


@dataclass
class LimitsConfig:
    """[limits]: crawler/limits.py (per-host rate, concurrency, backlog)."""

    # Requests per second per host across the whole fleet (GCRA in Redis). 0 disables.
    host_rate: float = 2.0
    # Requests a host may receive back to back before the rate applies.
    host_burst: int = 2
    # Requests per second per host in one worker process. 0 disables.
    local_host_rate: float = 2.0
    # Concurrent requests per host in one worker process.
    host_concurrency: int = 2
    # Items one worker holds for one host; more are deferred in Redis until the host is free.
    host_backlog: int = 200


@dataclass
class ImagesConfig:
    """[images]: crawler/imagejob.py (the image job's settings), pool.py."""

    # Longest side of a stored image; larger images are shrunk, smaller never enlarged.
    max_side: int = 800
    # Decompression-bomb guard: images with more pixels are refused (too_many_pixels).
    max_pixels: int = 100_000_000
    # Animations with more frames are refused (too_many_frames).
    max_frames: int = 1000
    # Seconds one image's work may take; past it, its image process is killed and replaced
    # and the image is recorded as image_timeout.
    job_timeout_s: float = 30.0
    jpeg_quality: int = 90
    webp_quality: int = 90
    # Filter of the final shrinking step: "bilinear" (antialiased, as torchvision), "box"
    # (area average, as img2dataset's INTER_AREA; cheapest), "bicubic", "lanczos" (sharpest,
    # slowest). Larger images are first reduced by whole factors (JPEG at a smaller DCT scale).
    resample: str = "bilinear"
    # Format of stored images: "keep" (each image in its own format, re-encoded only when it
    # is shrunk or rotated; a name's extension may then not match its bytes), "jpeg" or
    # "webp" (every image in that format, at jpeg_quality / webp_quality; as img2dataset's
    # encode_format). Files are named by the shard's image_name either way.
    format: str = "keep"


@dataclass
class AssignConfig:
    """[assign]: assign/worker.py; crawler/cli_dataset.py (dataset-index finds the rewrites)."""

    # "lapjv": the reference algorithm, identical results. "scipy": exact, faster on large
    # documents, may break ties differently.
    solver: str = "lapjv"
    # Rewrite shards so that they name only images the crawler stored.
    downloaded_only: bool = False
    # In downloaded-only mode, keep documents left with no image.
    keep_empty_documents: bool = False
    # Where rewritten shards go (default: OUTPUT/_shards).
    output: str = ""


@dataclass
class MetricsConfig:
    """[metrics]: crawler/metrics.py's server, started by worker.py and runner.py."""

    # Port of the Prometheus /metrics and status page server (0: disabled).
    port: int = 0
    host: str = "127.0.0.1"


@dataclass
class CorpusConfig:
    """[corpus]: crawler/ingest.py, the dataset API and export."""

    # Leave out documents flagged `could_have_url_duplicate` (about 3 % of MMC4: another
    # snapshot of the same page may be in the corpus). Applies to the crawl (ingest), the
    # dataset API and export; shard summaries count flagged documents either way.
    skip_url_duplicates: bool = False


@dataclass
class DatasetConfig:
    """[dataset]: crawler/dataset/api.py, serve.py and crawler/cli_dataset.py."""

    # SHA-256 hashes ("sha256:<hex>") of the bearer tokens the dataset API accepts;
    # `mmc4-crawl dataset-token` prints a new token and its hash. The server refuses to start
    # without one.
    token_hashes: list[str] = field(default_factory=list)
    # Address and port of `mmc4-crawl serve-dataset`.
    host: str = "127.0.0.1"
    port: int = 8090
    # Largest `limit` a page request may ask for.
    max_limit: int = 1000
    # Seconds between looks for newly indexed shards (a crawl adds them as shards complete).
    refresh_s: float = 2.0
    # Cache-Control max-age of stored images, in seconds.
    image_max_age_s: int = 86400


@dataclass
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.paths.output)

    def validate(self) -> None:
        for section, key, value, bounds in _numbers(self):
            if not bounds.contains(value):
                raise ConfigError(f"{section}.{key} = {value!r} is out of range: {bounds}")
        _check(
            self.images.resample in RESAMPLE_FILTERS,
            f"images.resample must be one of {', '.join(RESAMPLE_FILTERS)}",
        )
        for net in self.fetch.allow_networks:
            _check(_is_network(net), f"fetch.allow_networks: {net!r} is not a network")
        _check(self.assign.solver in ("lapjv", "scipy"), "assign.solver must be lapjv or scipy")
        _check(
            self.images.format in IMAGE_FORMATS,
            f"images.format must be one of {', '.join(IMAGE_FORMATS)}",
        )
        out = self.paths.output
        _check(
            not out.startswith("s3://") or bool(out[5:].partition("/")[0]),
            f"paths.output {out!r} names no bucket: s3://bucket/prefix",
        )
        url = self.redis.url
        _check(
            not url or url.startswith(("redis://", "rediss://", "unix://")),
            f"redis.url must start with redis://, rediss:// or unix:// (got {url!r})",
        )


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: ``lo <= v <= hi`` (``lo < v`` when `open_lo`)."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def __str__(self) -> str:
        lo = None if self.lo is None else f"{self.lo:g}"
        hi = None if self.hi is None else f"{self.hi:g}"
        if self.open_lo:
            return f"must be greater than {lo}" + (f" and at most {hi}" if hi else "")
        if lo is not None and hi is not None:
            return f"must be in {lo}..{hi}"
        if lo is not None:
            return f"must be at least {lo}"
        return f"must be at most {hi}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, open_lo=True)
PORT = Range(0, 65535)

# The valid range of every numeric setting, checked at load (a test keeps this complete).
RANGES: dict[str, Range] = {
    "storage.max_inflight": Range(1, 4096),
    "storage.max_retries": Range(0, 100),
    "storage.backoff_initial_s": Range(0, 60, open_lo=True),
    "storage.backoff_max_s": Range(0, 3600, open_lo=True),
    "storage.retry_timeout_s": Range(0, 86400, open_lo=True),
    "storage.request_timeout_s": Range(0, 3600, open_lo=True),
    "storage.connect_timeout_s": Range(0, 600, open_lo=True),
    "redis.reconnect_backoff_s": Range(0, 60, open_lo=True),
    "redis.socket_timeout_s": Range(2, 3600),
    "ingest.max_queue_depth": AT_LEAST_1,
    "ingest.batch_size": Range(1, 100_000),
    "ingest.backpressure_poll_s": Range(0, 60, open_lo=True),
    "ingest.download_timeout_s": POSITIVE,
    "ingest.max_download_bytes": AT_LEAST_1,
    "ingest.max_shard_bytes": AT_LEAST_1,
    "ingest.max_line_bytes": Range(1024),
    "ingest.redis_wait_s": AT_LEAST_0,
    "queue.lease_timeout_s": Range(1),
    "queue.max_deliveries": AT_LEAST_1,
    "queue.read_batch": Range(1, 100_000),
    "queue.reclaim_interval_s": POSITIVE,
    "queue.dead_letter_maxlen": AT_LEAST_1,
    "worker.window": AT_LEAST_1,
    "worker.max_connections": AT_LEAST_1,
    "worker.image_processes": Range(0, 1024),
    "worker.max_waiting_image_mb": AT_LEAST_1,
    "worker.image_process_heap_mb": AT_LEAST_0,
    "worker.flush_batch": AT_LEAST_1,
    "worker.flush_interval_s": POSITIVE,
    "worker.heartbeat_interval_s": POSITIVE,
    "worker.grace_period_s": AT_LEAST_0,
    "worker.processes": Range(1, 1024),
    "worker.log_interval_s": Range(1, 86400),
    "fetch.connect_timeout_s": POSITIVE,
    "fetch.total_timeout_s": POSITIVE,
    "fetch.min_timeout_s": POSITIVE,
    "fetch.max_redirects": Range(0, 100),
    "fetch.max_body_bytes": AT_LEAST_1,
    "fetch.max_attempts": Range(1, 100),
    "fetch.backoff_base_s": AT_LEAST_0,
    "fetch.backoff_max_s": AT_LEAST_0,
    "fetch.retry_after_max_s": AT_LEAST_0,
    "fetch.dns_cache_ttl_s": AT_LEAST_0,
    "limits.host_rate": AT_LEAST_0,
    "limits.host_burst": AT_LEAST_1,
    "limits.local_host_rate": AT_LEAST_0,
    "limits.host_concurrency": AT_LEAST_1,
    "limits.host_backlog": AT_LEAST_1,
    "images.max_side": AT_LEAST_1,
    "images.max_pixels": AT_LEAST_1,
    "images.max_frames": Range(1, 1_000_000),
    "images.job_timeout_s": Range(0.1, 3600),
    "images.jpeg_quality": Range(1, 100),
    "images.webp_quality": Range(1, 100),
    "metrics.port": PORT,
    "dataset.port": PORT,
    "dataset.max_limit": AT_LEAST_1,
    "dataset.refresh_s": POSITIVE,
    "dataset.image_max_age_s": AT_LEAST_0,
}


def _numbers(cfg: Config) -> Iterator[tuple[str, str, float, Range]]:
    """Every numeric setting that has a range (tests check that every one has)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            bounds = RANGES.get(f"{section.name}.{f.name}")
            if bounds is not None:
                yield section.name, f.name, value, bounds


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _sections() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML or string value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, where) for v in value]
    if origin is dict:
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{where}: expected name=value pairs, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, str, where) for k, v in value.items()}
    if isinstance(annotation, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    raise ConfigError(f"{where}: unsupported type {annotation!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}]")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {known})")
    setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def apply_mapping(cfg: Config, data: Mapping[str, Any], source: str) -> None:
    for section, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in table.items():
            _apply(cfg, section, key, value, source)


def apply_env(cfg: Config, environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        _apply(cfg, section.lower(), key.lower(), value, f"environment {name}")


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> None:
    """Apply ``section.key=value`` strings (the --set flag)."""
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _apply(cfg, section, key, value, "--set")


def default_config_path() -> Path | None:
    explicit = os.environ.get("MMC4_CONFIG")
    if explicit:
        return Path(explicit)
    here = Path("config.toml")
    return here if here.is_file() else None


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Build the configuration: defaults, then file, then environment, then overrides."""
    cfg = Config()
    file = Path(path) if path is not None else default_config_path()
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        apply_mapping(cfg, data, str(file))
    apply_env(cfg, os.environ if environ is None else environ)
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg
