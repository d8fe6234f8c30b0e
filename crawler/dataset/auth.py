"""Bearer tokens of the dataset API, configured as hashes (``dataset.token_hashes``).

A token is 32 random bytes (URL-safe base64), so a plain SHA-256 of it cannot be reversed
by guessing; the configuration holds only ``sha256:<hex>``. A presented token is hashed and
compared with every configured hash in constant time (``hmac.compare_digest``); tokens are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

PREFIX = "sha256:"


class BadTokenHash(ValueError):
    """A configured token hash is not ``sha256:`` followed by 64 hex digits."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenCheck:
    def __init__(self, hashes: Iterable[str]) -> None:
        self.digests: list[bytes] = []
        for h in hashes:
            hex_part = h.strip().lower()
            if not hex_part.startswith(PREFIX):
                raise BadTokenHash(f"dataset.token_hashes: {h[:12]!r}… does not start with sha256:")
            try:
                digest = bytes.fromhex(hex_part[len(PREFIX) :])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise BadTokenHash(f"dataset.token_hashes: {h[:12]!r}… is not 64 hex digits")
            self.digests.append(digest)

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the tokens."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self.digests:  # every hash compared: no early exit
            found |= hmac.compare_digest(digest, known)
        return found
