"""Login sessions of the status page: a signed, short-lived token in an HttpOnly cookie.

The page never puts an API key in a URL or a cookie. A caller logs in once with a viewer or
operator key (``POST /login``); the page then gives it a session token that names the key id,
its role and tenant and an expiry, signed with HMAC-SHA256 under a secret that only this
process holds (made at start, never written anywhere: a restart of the serving process ends
every session, and the caller logs in again). Each request re-reads the key by its id, so a
revoked key ends its sessions within one refresh period.

Pure: no I/O; the clock may be injected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from chargepath.core.auth import Principal, Role

#: How long a session lasts from login (seconds). An open page past it is asked to log in again.
SESSION_TTL_S: Final = 900
#: A token longer than this is not one of ours (a few hundred bytes at most).
MAX_TOKEN_LENGTH: Final = 512


@dataclass(frozen=True, slots=True)
class Session:
    """Who logged in (the key's id, role and tenant at login) and until when (Unix ms)."""

    principal: Principal
    expires_ms: int


class SessionSigner:
    """Issues and verifies session tokens: ``<payload>.<mac>``, both url-safe base64 without
    padding; the payload is JSON ``{"k": key id, "r": role, "t": tenant, "e": expiry ms}``."""

    def __init__(
        self,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        *,
        secret: bytes | None = None,
        ttl_s: int = SESSION_TTL_S,
    ) -> None:
        self._wall_ms = wall_ms
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, principal: Principal) -> str:
        body = {
            "k": principal.identity,
            "r": principal.role.value,
            "t": principal.tenant,
            "e": self._wall_ms() + self.ttl_s * 1000,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> Session | None:
        """The session of ``token``, or None if it is not one this signer issued, or expired."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        payload, sep, mac = token.partition(".")
        if not sep:
            return None
        try:
            given = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac(payload)):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            key_id, role, tenant, expires = body["k"], Role(body["r"]), body["t"], body["e"]
            principal = Principal(key_id, role, tenant)
        except (ValueError, KeyError, TypeError):
            return None  # signed by us, so never expected: but a bad token is just no session
        if not isinstance(expires, int) or expires <= self._wall_ms():
            return None
        return Session(principal, expires)

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
