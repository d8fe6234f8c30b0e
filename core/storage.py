# size: the local and the S3 back end of one Storage interface, and the rules both keep
"""Where the corpus lives: a local directory or an S3 bucket prefix, behind one interface.

`open_storage(location, settings)` gives a `Storage` for ``paths.output`` (or any place the
crawl writes or reads its files): a local path (`LocalStorage`, files through
`core.safefs`: a temporary name, then a rename) or ``s3://bucket/prefix`` (`S3Storage`,
through obstore: S3 and S3-compatible endpoints).

Every file is addressed by a *key* ``"<directory>/<name>"``, both parts one plain name
(`safefs.check_part`): ``"<shard>/<image>"``, ``"_status/<shard>.jsonl.gz"``. On disk a key is
``<root>/<directory>/<name>``; in a bucket it is the object ``<prefix>/<directory>/<name>``.

What holds on both:
- a file appears whole or not at all under its name (disk: rename of a complete temporary
  file; S3: one PUT of the whole bytes, which S3 makes visible atomically), so a crash leaves
  no half file under a final name;
- `names(directory)` lists a directory in one call (S3: one LIST per 1,000 keys), the way to
  ask "which of these are stored?" without a request per file;
- S3 requests are retried with exponential backoff and jitter on 5xx (``SlowDown`` included),
  dropped connections and timeouts (obstore's retry config, from `StorageConfig`); at most
  `StorageConfig.max_inflight` requests of one process are in flight at once;
- failures are `StorageError` (an OSError; `FileNotFoundError` for a missing key) with a
  one-line message naming the location and the server's error code.

Credentials, endpoint and region of S3 come the usual way: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ALLOW_HTTP``, web identity (``AWS_WEB_IDENTITY_TOKEN_FILE``, Kubernetes service
accounts), the instance's metadata service, or a named profile (``storage.profile`` or
``AWS_PROFILE``; through boto3, the ``aws-profile`` extra).

The async methods are for an event loop (S3: obstore's own async I/O; disk: a thread); the
``*_sync`` ones for threads and processes without a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import TYPE_CHECKING

from core import safefs
from core.config import Config, StorageConfig

if TYPE_CHECKING:
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import S3Store

SCHEME = "s3://"
_S3_CODE = re.compile(r"<Code>([^<]+)</Code>")
# What a server's error code means for the person running the crawl.
_CODE_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is not known (AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key does not match (AWS_SECRET_ACCESS_KEY)",
    "AccessDenied": "access denied: the credentials may not write here",
    "InvalidBucketName": "the bucket name is not valid",
    "ExpiredToken": "the session token has expired",
}


def is_remote(location: str) -> bool:
    """Whether `location` names object storage (``s3://bucket/prefix``) rather than a path."""
    return location.startswith(SCHEME)


class StorageError(OSError):
    """An object storage request failed; `str()` is one line naming where and why."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_key(key: str) -> tuple[str, str]:
    """(directory, name) of a key ``"<directory>/<name>"``; UnsafePath when it is not two
    plain names."""
    directory, sep, name = key.partition("/")
    if not sep:
        raise safefs.UnsafePath(f"key {key!r} is not <directory>/<name>")
    for what, part in (("directory", directory), ("file name", name)):
        problem = safefs.check_part(part)
        if problem:
            raise safefs.UnsafePath(f"{what} {problem}")
    return directory, name


class Storage(ABC):
    """One place of files: a directory on disk or a bucket prefix."""

    location: str  # as configured: a path or s3://bucket/prefix
    remote: bool

    def url(self, key: str) -> str:
        """Where a key is, for messages and records (``/out/_status/x`` or ``s3://b/p/...``)."""
        return f"{self.location.rstrip('/')}/{key}"

    # ---- blocking (threads, processes) --------------------------------------------------
    @abstractmethod
    def put_sync(self, key: str, data: bytes, *, durable: bool = False) -> None:
        """Store `data` under `key`, whole or not at all (replacing what was there).
        `durable`: on disk, fsync before the rename (an object is durable once stored)."""

    @abstractmethod
    def get_sync(self, key: str) -> bytes:
        """The bytes under `key`; FileNotFoundError when there are none."""

    @abstractmethod
    def exists_sync(self, key: str) -> bool: ...

    @abstractmethod
    def names_sync(self, directory: str) -> set[str]:
        """The names stored under `directory` (one listing, no request per name)."""

    @abstractmethod
    def delete_sync(self, key: str) -> None:
        """Remove `key`; nothing when it is not there."""

    @abstractmethod
    def rename_sync(self, src: str, dst: str) -> None:
        """Move `src` to `dst` (replacing it). S3: a copy, then a delete."""

    # ---- event loop ----------------------------------------------------------------------
    async def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        await asyncio.to_thread(self.put_sync, key, data, durable=durable)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, key)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.exists_sync, key)

    async def names(self, directory: str) -> set[str]:
        return await asyncio.to_thread(self.names_sync, directory)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.delete_sync, key)

    async def rename(self, src: str, dst: str) -> None:
        await asyncio.to_thread(self.rename_sync, src, dst)

    def peek_sync(self, directory: str) -> None:
        """Read the listing of `directory` (S3: its first page only); raises what a read of
        the place raises."""
        self.names_sync(directory)

    def problem_sync(
        self, directory: str, probe_bytes: int = 64 << 10, *, write: bool = True
    ) -> str:
        """Why files cannot be written under `directory` now ("" when they can): a probe of
        `probe_bytes` is written (durably) and removed; with `write` false, why they cannot
        be read (one listing). Bad credentials, a missing bucket, an unreachable endpoint, a
        full or read-only disk show here, before anything is crawled."""
        key = f"{directory}/probe-{safefs.process_tag()}.tmp"
        try:
            if not write:
                self.peek_sync(directory)
                return ""
            self.put_sync(key, bytes(probe_bytes), durable=True)
            self.delete_sync(key)
        except OSError as exc:
            return str(exc) if isinstance(exc, StorageError) else (
                f"{self.url(directory)}: {exc.strerror or exc}"
            )  # fmt: skip
        return ""


class LocalStorage(Storage):
    """Files under a root directory (`core.safefs`: no name leads out of it)."""

    remote = False

    def __init__(self, root: str) -> None:
        self.location = root
        self.root = root

    def put_sync(self, key: str, data: bytes, *, durable: bool = False) -> None:
        directory, name = check_key(key)
        safefs.write(self.root, directory, name, data, durable=durable)

    def get_sync(self, key: str) -> bytes:
        directory, name = check_key(key)
        return safefs.read(self.root, directory, name)

    def exists_sync(self, key: str) -> bool:
        check_key(key)
        return os.path.isfile(os.path.join(self.root, key))

    def names_sync(self, directory: str) -> set[str]:
        check_key(f"{directory}/x")
        try:
            with os.scandir(os.path.join(self.root, directory)) as entries:
                return {e.name for e in entries if e.is_file(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def delete_sync(self, key: str) -> None:
        directory, name = check_key(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=safefs.open_dir(self.root, directory, create=False))

    def rename_sync(self, src: str, dst: str) -> None:
        src_dir, src_name = check_key(src)
        dst_dir, dst_name = check_key(dst)
        os.replace(
            src_name, dst_name,
            src_dir_fd=safefs.open_dir(self.root, src_dir, create=False),
            dst_dir_fd=safefs.open_dir(self.root, dst_dir),
        )  # fmt: skip


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix`` through obstore."""

    remote = True

    def __init__(self, location: str, settings: StorageConfig) -> None:
        from obstore.store import S3Store

        bucket, _, prefix = location.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise ValueError(f"{location!r} names no bucket (s3://bucket/prefix)")
        self.location = location.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings
        allow_http = settings.allow_http or os.environ.get("AWS_ALLOW_HTTP", "") == "true"
        self.store: S3Store = S3Store(
            bucket,
            prefix=self.prefix or None,
            credential_provider=self._profile_credentials(settings.profile),
            client_options={
                "allow_http": allow_http,
                "timeout": timedelta(seconds=settings.request_timeout_s),
                "connect_timeout": timedelta(seconds=settings.connect_timeout_s),
            },
            retry_config={
                "max_retries": settings.max_retries,
                "retry_timeout": timedelta(seconds=settings.retry_timeout_s),
                "backoff": {
                    "init_backoff": timedelta(seconds=settings.backoff_initial_s),
                    "max_backoff": timedelta(seconds=settings.backoff_max_s),
                    "base": 2,
                },
            },
        )
        self._gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _profile_credentials(self, profile: str) -> Boto3CredentialProvider | None:
        """Credentials (and region) of a named profile of ~/.aws/credentials and
        ~/.aws/config: `profile`, else AWS_PROFILE when no AWS_ACCESS_KEY_ID is set. None
        without a profile: obstore then reads the AWS_* variables, a web identity or the
        instance's metadata itself."""
        if not profile and "AWS_ACCESS_KEY_ID" not in os.environ:
            profile = os.environ.get("AWS_PROFILE", "")
        if not profile:
            return None
        try:
            import boto3
            import botocore.exceptions
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise StorageError(
                errno.EINVAL,
                f"{self.location}: the AWS profile {profile!r} needs boto3 "
                "(pip install 'mmc4-crawler[aws-profile]')",
            ) from None
        try:
            return Boto3CredentialProvider(boto3.Session(profile_name=profile))
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(errno.EACCES, f"{self.location}: {exc}") from None

    def _gate(self) -> asyncio.Semaphore:
        """The in-flight bound of the running loop (one per loop: a semaphore is bound to
        the loop it first waits in)."""
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.settings.max_inflight)
        return gate

    def _error(self, exc: Exception, key: str) -> OSError:
        """A one-line OSError for an obstore failure (FileNotFoundError for a missing key)."""
        text = str(exc)
        code = _S3_CODE.search(text)
        if code:
            name = code.group(1)
            why = f"{_CODE_HINTS.get(name, name)} ({name})" if name in _CODE_HINTS else name
        else:
            why = text.splitlines()[0] if text else type(exc).__name__
            why = why.split(" - ")[-1] if " - " in why else why
            if "error sending request" in why:
                why = f"cannot reach the endpoint (AWS_ENDPOINT_URL, AWS_REGION): {why}"
        where = self.url(key) if key else self.location
        message = f"{where}: {why}"
        if isinstance(exc, FileNotFoundError) and (not code or code.group(1) == "NoSuchKey"):
            return FileNotFoundError(errno.ENOENT, message)
        if isinstance(exc, PermissionError):
            return StorageError(errno.EACCES, message)
        return StorageError(errno.EIO, message)

    def _fail(self, exc: Exception, key: str) -> OSError:
        return exc if isinstance(exc, safefs.UnsafePath) else self._error(exc, key)

    def failure(self, exc: Exception, name: str) -> OSError:
        """The one-line error of an obstore call on `name` made with `store` elsewhere."""
        return self._fail(exc, name)

    def _missing(self, exc: Exception, key: str) -> bool:
        """False for a missing key; raises the one-line error of any other failure."""
        err = self._fail(exc, key)
        if isinstance(err, FileNotFoundError):
            return False
        raise err from None

    # ---- blocking ------------------------------------------------------------------------
    def put_sync(self, key: str, data: bytes, *, durable: bool = False) -> None:
        import obstore

        check_key(key)
        try:
            obstore.put(self.store, key, data)
        except Exception as exc:
            raise self._fail(exc, key) from None

    def get_sync(self, key: str) -> bytes:
        import obstore

        check_key(key)
        try:
            return obstore.get(self.store, key).bytes().to_bytes()
        except Exception as exc:
            raise self._fail(exc, key) from None

    def exists_sync(self, key: str) -> bool:
        import obstore

        check_key(key)
        try:
            obstore.head(self.store, key)
        except Exception as exc:
            return self._missing(exc, key)
        return True

    def names_sync(self, directory: str) -> set[str]:
        import obstore

        check_key(f"{directory}/x")
        start = len(directory) + 1
        out: set[str] = set()
        try:
            for batch in obstore.list(self.store, f"{directory}/", chunk_size=1000):
                out.update(meta["path"][start:] for meta in batch)
        except Exception as exc:
            raise self._fail(exc, directory) from None
        return {n for n in out if n and "/" not in n}

    def peek_sync(self, directory: str) -> None:
        import obstore

        check_key(f"{directory}/x")
        try:
            next(iter(obstore.list(self.store, f"{directory}/", chunk_size=1)), None)
        except Exception as exc:
            raise self._fail(exc, directory) from None

    def delete_sync(self, key: str) -> None:
        import obstore

        check_key(key)
        try:
            obstore.delete(self.store, key)
        except Exception as exc:
            self._missing(exc, key)

    def rename_sync(self, src: str, dst: str) -> None:
        import obstore

        check_key(src)
        check_key(dst)
        try:
            obstore.rename(self.store, src, dst)
        except Exception as exc:
            raise self._fail(exc, src) from None

    # ---- event loop: obstore's own async I/O, at most max_inflight at once ----------------
    async def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        import obstore

        check_key(key)
        async with self._gate():
            try:
                await obstore.put_async(self.store, key, data)
            except Exception as exc:
                raise self._fail(exc, key) from None

    async def get(self, key: str) -> bytes:
        import obstore

        check_key(key)
        async with self._gate():
            try:
                result = await obstore.get_async(self.store, key)
                return (await result.bytes_async()).to_bytes()
            except Exception as exc:
                raise self._fail(exc, key) from None

    async def exists(self, key: str) -> bool:
        import obstore

        check_key(key)
        async with self._gate():
            try:
                await obstore.head_async(self.store, key)
            except Exception as exc:
                return self._missing(exc, key)
        return True


def open_storage(location: str, settings: StorageConfig | None = None) -> Storage:
    """The `Storage` of a path or an ``s3://bucket/prefix`` URL."""
    if is_remote(location):
        return S3Storage(location, settings or StorageConfig())
    return LocalStorage(location)


def output_storage(cfg: Config) -> Storage:
    """The `Storage` of ``paths.output``."""
    return open_storage(cfg.paths.output, cfg.storage)
