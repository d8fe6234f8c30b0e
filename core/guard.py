"""Which URLs the crawl may fetch and which addresses its sockets may connect to.

One policy, applied in three places that must agree:

* `check_url` at ingest and again before every request and redirect hop: the URL's shape, and
  a host written as an address (in any spelling the C library accepts: ``127.1``, ``0``,
  ``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``[::ffff:127.0.0.1]`` ...) must be public.
  A URL that passes is requested with its host in the address's usual spelling (`canonical`).
* `session.GuardedResolver`: a name resolves to the permitted addresses among its answers, or
  fails.
* `session.guarded_socket`: the connector's socket factory judges the address each socket is
  about to connect to, the last word whatever path the host took (literal, resolved, cached).

"Public" (`is_public_address`): a globally routable unicast address. IPv6 forms that carry an
IPv4 address (mapped ``::ffff:0:0/96``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are
judged by that IPv4 address; IPv4-compatible ``::/96``, local NAT64 ``64:ff9b:1::/48``,
site-local ``fec0::/10`` and Teredo are never public.

What is refused can be opened (`AddressPolicy`): `fetch.allow_networks` lists networks reachable
even though not public (``["127.0.0.0/8"]`` for a loopback test web, ``["10.1.2.0/24"]`` for an
internal mirror); `fetch.allow_private_addresses = true` turns every address check off.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yarl import URL

from core import status

if TYPE_CHECKING:
    from core.config import FetchConfig

MAX_URL_CHARS = 4096
_URL_CONTROL = re.compile(r"[\x00-\x1f]")  # searched in C: cheap on every URL of a shard

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


class BlockedAddress(OSError):
    """The destination is (or resolves only to) addresses the crawl may not reach."""


def literal_address(host: str) -> IPAddress | None:
    """The address a host names when it is written as one, in any spelling the C library
    accepts (what `connect` would use), or None for a name."""
    host = host.strip("[]")
    if not host or not (host[0].isdigit() or ":" in host):
        return None  # a name (every numeric spelling starts with a digit)
    try:
        return ipaddress.ip_address(host)  # the usual spelling: no C library call
    except ValueError:
        pass
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(info[0][4][0]).split("%", 1)[0])


def canonical(url: URL) -> URL:
    """`url` with a host that spells an IPv4 address in another way than its four decimal
    parts (``127.1``, ``0x7f.1``, ``0177.0.0.1``, ``2130706433``) written as those parts
    (``127.0.0.1``), as a browser's URL parser does. The request then goes to the address
    `check_url` judged, whatever the HTTP client's own rules for such hosts (aiohttp 3.14
    refuses them as invalid URLs; 3.13 passes them to the C library)."""
    host = url.raw_host
    if not host or not host[0].isdigit() or ":" in host:
        return url  # a name (or IPv6, which the URL parser already writes in one way)
    addr = literal_address(host)
    if addr is None or str(addr) == host:
        return url
    return url.with_host(str(addr))


def is_public_address(ip: str | IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address (see the module docstring)."""
    if isinstance(ip, str):
        try:
            addr: IPAddress = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
    else:
        addr = ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr.sixtofour is not None:
            addr = addr.sixtofour
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif addr in _COMPATIBLE or addr in _NAT64_LOCAL or addr.is_site_local or addr.teredo:
            return False
    return addr.is_global and not addr.is_multicast


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which destination addresses a crawl may reach: public ones, those in `networks`, or
    (`allow_private`) any."""

    allow_private: bool = False
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, cfg: FetchConfig) -> AddressPolicy:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allow_networks)
        return cls(cfg.allow_private_addresses, nets)

    def permits(self, addr: IPAddress) -> bool:
        if self.allow_private or is_public_address(addr):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def permits_host(self, host: str) -> bool:
        """Whether a socket may connect to `host` (an address in any numeric spelling; a
        name is never permitted here: it must have been resolved first)."""
        if self.allow_private:
            return True
        addr = literal_address(host)
        return addr is not None and self.permits(addr)


CLOSED = AddressPolicy()  # the default: public addresses only
ANY_ADDRESS = AddressPolicy(allow_private=True)  # `check_url` of the URL's shape only


def check_url(url: Any, policy: AddressPolicy = CLOSED) -> tuple[status.Status, str] | None:
    """Why `url` cannot be fetched, as (status, reason), or None when it may be.

    `status.BAD_URL` for its shape; `status.BLOCKED_ADDRESS` for a host written as a
    non-public address (names are judged when they resolve)."""
    got = parse_url(url, policy)
    return got if isinstance(got, tuple) else None


def parse_url(url: Any, policy: AddressPolicy = CLOSED) -> URL | tuple[status.Status, str]:
    """`url` parsed, or why it cannot be fetched (see `check_url`)."""
    if not isinstance(url, str) or not url:
        return status.BAD_URL, f"raw_url is not a non-empty string: {url!r}"
    if len(url) > MAX_URL_CHARS:
        return status.BAD_URL, f"raw_url is longer than {MAX_URL_CHARS} characters"
    if _URL_CONTROL.search(url):
        return status.BAD_URL, "raw_url contains a control character"
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        return status.BAD_URL, f"raw_url does not parse: {exc}"
    return check_parsed(parsed, policy) or parsed


def check_parsed(url: URL, policy: AddressPolicy = CLOSED) -> tuple[status.Status, str] | None:
    """`check_url` for a parsed URL (a redirect's target)."""
    if url.scheme not in ("http", "https"):
        return status.BAD_URL, f"scheme {url.scheme!r} is not http or https"
    host = url.raw_host
    if not host:
        return status.BAD_URL, "no host"
    if not policy.allow_private:
        addr = literal_address(host)
        if addr is not None and not policy.permits(addr):
            return status.BLOCKED_ADDRESS, f"{host} is {addr}, not a public address"
    return None
