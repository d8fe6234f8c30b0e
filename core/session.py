"""The HTTP client session every fetch goes through: a connection pool whose resolver and
socket factory enforce the crawl's address policy (core.guard) on every connection."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from core.config import FetchConfig
from core.guard import AddressPolicy, BlockedAddress


class GuardedResolver(AbstractResolver):
    """Resolves names, then drops non-public addresses unless they are allowed."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self.inner.resolve(host, port, family)
        if self.policy.allow_private:
            return infos
        public = [i for i in infos if self.policy.permits_host(i["host"])]
        if not public:
            raise BlockedAddress(f"{host} resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        await self.inner.close()


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def guarded_socket(policy: AddressPolicy) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory for aiohttp's TCPConnector: refuses (BlockedAddress) to make a socket
    for a non-public destination address, whatever spelling of it reached the connector."""

    def make(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not policy.permits_host(str(sockaddr[0])):
            raise BlockedAddress(f"{sockaddr[0]} is not a public address")
        return socket.socket(family=family, type=type_, proto=proto)

    return make


_READ_BUFFER = 1 << 18


def client_session(cfg: FetchConfig, max_connections: int) -> aiohttp.ClientSession:
    policy = AddressPolicy.of(cfg)
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,  # per-host limits are the HostGate's job
        ttl_dns_cache=cfg.dns_cache_ttl_s,
        use_dns_cache=True,
        resolver=GuardedResolver(policy),
        # The last word on every connection: the address the socket is made for.
        socket_factory=guarded_socket(policy),
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=cfg.connect_timeout_s,
        sock_connect=cfg.connect_timeout_s,
        # No read timeout: the attempt's own deadline (Fetcher) bounds every read, and an
        # aiohttp read timeout would re-arm a timer on every chunk received.
        sock_read=None,
    )
    headers = {"User-Agent": cfg.user_agent}
    if cfg.x_forwarded_for:
        headers["X-Forwarded-For"] = cfg.x_forwarded_for
    headers.update(cfg.headers)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        auto_decompress=True,
        # A crawl keeps no cookies: a jar would grow with every host of the corpus, be
        # searched on every request and tie one image's request to another's.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Bodies are read whole: a larger buffer pauses and resumes the socket less often.
        read_bufsize=_READ_BUFFER,
    )
