"""Who may call what: roles, principals, the permission table, API keys, failed-attempt limits.

Pure: no grpc, no redis, no protobuf. The transport authenticates a caller into a
:class:`Principal` (from an API key or a client certificate), asks :func:`authorize` whether that
principal may call a method at all, and the servicers ask :func:`may_act_for` whether it may act
for the tenant a request names.

Roles:

* ``meter``: Check and StreamUsage, for its own tenant only.
* ``viewer``: the reads of one tenant (state, explain, watch; the ledger once it has an RPC), for
  its own tenant only.
* ``operator``: every call, for every tenant (an operator may also meter any tenant: the CLI's
  ``check`` uses the operator key).

API keys look like ``cpk_<key_id>_<secret>``: a 12-character lowercase base32 key id (60 bits,
not secret: it names the key in listings, logs and revocations) and a secret of 32 random bytes
in url-safe base64 without padding (43 characters). Only the SHA-256 of the secret is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Final


class Role(StrEnum):
    METER = "meter"
    VIEWER = "viewer"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling.

    ``identity`` is the key id of an API key, or the identity of a client certificate.
    ``tenant`` is the one tenant a meter or viewer acts for; it is None for an operator, and
    only for an operator, who acts for every tenant.
    """

    identity: str
    role: Role
    tenant: str | None

    def __post_init__(self) -> None:
        if self.role is Role.OPERATOR and self.tenant is not None:
            raise ValueError("an operator acts for every tenant: its tenant must be None")
        if self.role is not Role.OPERATOR and not self.tenant:
            raise ValueError(f"a {self.role} principal needs a tenant")


class RefusalKind(Enum):
    """Why a call is refused; the transport maps these to gRPC status codes one to one."""

    UNAUTHENTICATED = "unauthenticated"  # no credential, or not a valid one
    PERMISSION_DENIED = "permission_denied"  # a valid credential whose role may not do this


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused call. ``message`` is for the caller: it never holds a key or a secret."""

    kind: RefusalKind
    message: str


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call one RPC.

    ``credential``: False only for calls that must work without any credential (health checks).
    ``roles``: the roles allowed (ignored when no credential is needed).
    ``tenant_field``: the request field (dotted path; ``[]`` marks a repeated field, each item
    checked on its own) naming the tenant the call acts for. The servicer refuses the call, or
    the item, unless :func:`may_act_for` says yes. None: the call is not about one tenant, so
    only operators may make it.
    """

    roles: frozenset[Role]
    credential: bool = True
    tenant_field: str | None = None


_ANY_ROLE: Final = frozenset(Role)
_OPERATOR: Final = frozenset({Role.OPERATOR})
_METER: Final = frozenset({Role.METER, Role.OPERATOR})
_VIEWER: Final = frozenset({Role.VIEWER, Role.OPERATOR})

# Load balancers and Kubernetes probes cannot send a credential, and Check/Watch reveal only
# SERVING or NOT_SERVING, so they stay open. This is an entry of the table, not a default.
OPEN: Final = Access(roles=frozenset(), credential=False)

_METERING = "/chargepath.v1.MeteringService/"
_LEASE = "/chargepath.v1.LeaseService/"
_ADMIN = "/chargepath.v1.AdminService/"
_KEYS = "/chargepath.v1.KeyService/"
_HEALTH = "/grpc.health.v1.Health/"
_ENVOY_RLS = "/envoy.service.ratelimit.v3.RateLimitService/"
_ENVOY_RLQS = "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/"

PERMISSIONS: Final[Mapping[str, Access]] = MappingProxyType(
    {
        # Metering: a meter key for its own tenant; an operator for any.
        _METERING + "Check": Access(_METER, tenant_field="usage.subject.tenant"),
        _METERING + "StreamUsage": Access(_METER, tenant_field="usages[].subject.tenant"),
        # Leases take and record units like Check: the same rule.
        _LEASE + "Lease": Access(_METER, tenant_field="ask.subject.tenant"),
        _LEASE + "LeaseStream": Access(_METER, tenant_field="asks[].subject.tenant"),
        # Envoy (static `initial_metadata` on its grpc_service): a meter key for an Envoy of one
        # tenant, an operator key for one shared by tenants. The tenant is the value of the
        # descriptor entry (bucket entry) that the policy's envoy mapping names; a descriptor
        # for another tenant is OVER_LIMIT (a bucket DENY_ALL) and counts nothing.
        _ENVOY_RLS + "ShouldRateLimit": Access(
            _METER, tenant_field="descriptors[].entries[].value"
        ),
        _ENVOY_RLQS + "StreamRateLimitQuotas": Access(
            _METER, tenant_field="bucket_quota_usages[].bucket_id.bucket[].value"
        ),
        # Reads of one tenant: a viewer of that tenant, or an operator.
        _ADMIN + "GetState": Access(_VIEWER, tenant_field="subject.tenant"),
        _ADMIN + "ExplainDecision": Access(_VIEWER, tenant_field="tenant"),
        _ADMIN + "WatchDecisions": Access(_VIEWER, tenant_field="tenant"),
        # Reads across tenants: the policy document and plans name every tenant's terms.
        _ADMIN + "GetPolicy": Access(_OPERATOR),
        # The audit trail names every tenant's changes and every key id.
        _ADMIN + "ListAuditEvents": Access(_OPERATOR),
        _ADMIN + "GetPlan": Access(_OPERATOR),
        _ADMIN + "ListPlans": Access(_OPERATOR),
        # Changes.
        _ADMIN + "ApplyPolicy": Access(_OPERATOR),
        _ADMIN + "PutPlan": Access(_OPERATOR),
        _ADMIN + "DeletePlan": Access(_OPERATOR),
        _ADMIN + "AssignPlan": Access(_OPERATOR),
        _ADMIN + "Grant": Access(_OPERATOR),
        _ADMIN + "Suspend": Access(_OPERATOR),
        _ADMIN + "Resume": Access(_OPERATOR),
        _ADMIN + "SetFailurePolicy": Access(_OPERATOR),
        # Credentials: operators only (a key could otherwise mint a stronger one).
        _KEYS + "CreateKey": Access(_OPERATOR),
        _KEYS + "ListKeys": Access(_OPERATOR),
        _KEYS + "RotateKey": Access(_OPERATOR),
        _KEYS + "RevokeKey": Access(_OPERATOR),
        # Health: open (see OPEN), except List, which names every registered service and is
        # for tooling, not probes.
        _HEALTH + "Check": OPEN,
        _HEALTH + "Watch": OPEN,
        _HEALTH + "List": Access(_ANY_ROLE),
        # Reflection describes the public contract only: any authenticated caller (grpcurl).
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Access(_ANY_ROLE),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Access(_ANY_ROLE),
    }
)


MISSING_CREDENTIAL: Final = Refusal(
    RefusalKind.UNAUTHENTICATED,
    "a credential is required: send the metadata 'authorization: Bearer <api key>'",
)


def needs_credential(method: str) -> bool:
    """True unless ``method`` (a full gRPC method name) is open. Unknown methods need one."""
    access = PERMISSIONS.get(method)
    return access is None or access.credential


def authorize(principal: Principal | None, method: str) -> Refusal | None:
    """None if ``principal`` (None: no valid credential) may call ``method`` (a full gRPC
    method name, ``/package.Service/Method``); else why not. Deny by default: a method missing
    from :data:`PERMISSIONS` is refused to every role, operators included. Whether the
    principal may act for the tenant the request names is :func:`may_act_for`'s question."""
    access = PERMISSIONS.get(method)
    if access is not None and not access.credential:
        return None
    if principal is None:
        return MISSING_CREDENTIAL
    if access is None:
        return Refusal(
            RefusalKind.PERMISSION_DENIED, f"{method} is not open to any role (deny by default)"
        )
    if principal.role not in access.roles:
        allowed = ", ".join(sorted(r.value for r in access.roles))
        return Refusal(
            RefusalKind.PERMISSION_DENIED,
            f"the {principal.role} role may not call {method} (allowed: {allowed})",
        )
    return None


def may_act_for(principal: Principal, tenant: str) -> bool:
    """True if ``principal`` may act for ``tenant``: an operator for every tenant, a meter or a
    viewer for its own tenant only."""
    if principal.role is Role.OPERATOR:
        return True
    return bool(tenant) and principal.tenant == tenant


# API keys.

KEY_PREFIX: Final = "cpk_"
KEY_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase
KEY_ID_LENGTH: Final = 12
SECRET_BYTES: Final = 32
SECRET_LENGTH: Final = 43  # base64 of 32 bytes, without the trailing "="
KEY_LENGTH: Final = len(KEY_PREFIX) + KEY_ID_LENGTH + 1 + SECRET_LENGTH

_KEY_ID_RE = re.compile(f"[{KEY_ID_ALPHABET}]{{{KEY_ID_LENGTH}}}")
_SECRET_RE = re.compile(f"[A-Za-z0-9_-]{{{SECRET_LENGTH}}}")


class KeyFormatError(ValueError):
    """Text that is not a Chargepath API key. The message never repeats the text."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key id and its secret. ``plaintext`` is the one string a client sends; it is shown
    once, when the key is made, and never stored. The repr hides the secret."""

    key_id: str
    secret: str = field(repr=False)

    @property
    def plaintext(self) -> str:
        return f"{KEY_PREFIX}{self.key_id}_{self.secret}"


def is_key_id(text: str) -> bool:
    return _KEY_ID_RE.fullmatch(text) is not None


def new_key_id() -> str:
    return "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))


def new_key() -> ApiKey:
    """A fresh key: a random key id and 256 random bits of secret (``secrets``, the OS CSPRNG)."""
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    return ApiKey(new_key_id(), secret)


def parse_key(text: str) -> ApiKey:
    """The key id and secret of ``cpk_<key_id>_<secret>``, or :class:`KeyFormatError` saying
    what is wrong (never quoting the text, which may be a real key with a typo)."""
    if not text.startswith(KEY_PREFIX):
        raise KeyFormatError(f"not a Chargepath API key: it must start with {KEY_PREFIX!r}")
    if len(text) != KEY_LENGTH:
        raise KeyFormatError(
            f"not a Chargepath API key: it must be {KEY_LENGTH} characters, got {len(text)}"
        )
    key_id = text[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_LENGTH]
    separator = text[len(KEY_PREFIX) + KEY_ID_LENGTH]
    secret = text[len(KEY_PREFIX) + KEY_ID_LENGTH + 1 :]
    if not is_key_id(key_id):
        raise KeyFormatError(
            f"malformed API key: the key id must be {KEY_ID_LENGTH} characters of a-z and 2-7"
        )
    if separator != "_":
        raise KeyFormatError("malformed API key: expected '_' after the key id")
    if not _SECRET_RE.fullmatch(secret) or not _canonical_secret(secret):
        raise KeyFormatError(
            f"malformed API key: the secret must be {SECRET_BYTES} bytes of url-safe base64"
        )
    return ApiKey(key_id, secret)


def _canonical_secret(secret: str) -> bool:
    # The last character carries 2 unused bits; only one spelling per secret is accepted.
    raw = base64.urlsafe_b64decode(secret + "=")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == secret


def secret_digest(secret: str) -> bytes:
    """SHA-256 of the secret (32 bytes); :func:`hash_secret` is its hex form."""
    return hashlib.sha256(secret.encode()).digest()


def hash_secret(secret: str) -> str:
    """SHA-256 of the secret, hex. What the store keeps instead of the secret.

    A plain fast hash on purpose: the secret is 256 random bits, not a password, so no guessing
    attack gains from a slow hash (bcrypt, scrypt, argon2), while one would cost tens of
    milliseconds of CPU on every cache miss of every gateway process, which a flood of bad keys
    would turn into a denial of service.
    """
    return secret_digest(secret).hex()


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Constant-time comparison of ``secret``'s hash with a stored hash."""
    return hmac.compare_digest(hash_secret(secret).encode(), secret_hash.encode())


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as the store keeps it: never the secret, only its hash.

    Times are milliseconds since the Unix epoch. ``revoked_ms`` may lie in the future: a key
    rotated with a grace period stays valid until then.
    """

    key_id: str
    role: Role
    tenant: str | None
    secret_hash: str = field(repr=False)
    created_ms: int
    expires_ms: int | None = None
    revoked_ms: int | None = None
    description: str = ""

    def refusal_at(self, now_ms: int) -> str | None:
        """None if the key is valid at ``now_ms``; else "revoked" or "expired"."""
        if self.revoked_ms is not None and self.revoked_ms <= now_ms:
            return "revoked"
        if self.expires_ms is not None and self.expires_ms <= now_ms:
            return "expired"
        return None

    def principal(self) -> Principal:
        return Principal(self.key_id, self.role, self.tenant)


# Failed attempts.


class FailedAttempts:
    """Failed authentication attempts per peer: a token bucket of ``burst`` attempts refilled
    at one per ``interval_ms``, kept in its GCRA form (one time per peer: when the bucket will
    be full again). Not thread-safe: call from one event loop.

    While a peer's bucket is empty, the caller refuses it without looking the key up. At most
    ``max_peers`` peers are tracked, least recently failed first out: memory is bounded
    whatever the number of peers, at the price that a flood from more than ``max_peers``
    addresses pushes the oldest buckets out (they start over, full). ``clock_ms`` is a monotonic
    clock in milliseconds, injected so tests need no sleeps.
    """

    def __init__(
        self,
        clock_ms: Callable[[], int],
        *,
        burst: int = 10,
        interval_ms: int = 1000,
        max_peers: int = 10_000,
    ) -> None:
        if burst < 1 or interval_ms < 1 or max_peers < 1:
            raise ValueError("burst, interval_ms and max_peers must be >= 1")
        self._clock_ms = clock_ms
        self._burst = burst
        self._interval_ms = interval_ms
        self._max_peers = max_peers
        self._full_at: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    def retry_after_ms(self, peer: str) -> int:
        """0 if ``peer`` may make an attempt now; else milliseconds until it may."""
        full_at = self._full_at.get(peer)
        if full_at is None:
            return 0
        now = self._clock_ms()
        wait = full_at - now - (self._burst - 1) * self._interval_ms
        if full_at <= now:
            del self._full_at[peer]  # full again: the same as never seen
        return max(0, wait)

    def record(self, peer: str) -> None:
        """Take one attempt from ``peer``'s bucket (an empty bucket stays empty)."""
        now = self._clock_ms()
        full_at = max(self._full_at.pop(peer, now), now)
        self._full_at[peer] = min(
            full_at + self._interval_ms, now + self._burst * self._interval_ms
        )
        while len(self._full_at) > self._max_peers:
            self._full_at.popitem(last=False)
