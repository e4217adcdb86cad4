"""The audit trail of admin changes: what one entry says, as the pure domain sees it.

Every call of a mutating RPC (AdminService's changes, KeyService's create, rotate and revoke)
leaves one :class:`AuditEvent`, whether it succeeded or was refused: who called, what they
asked for (a compact summary that never holds a secret, a key or a whole document), the
tenants it affected, the policy version before and after, and the outcome.

Pure: no grpc, no redis. The transport fills an event in; the store appends it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from chargepath.core.auth import Principal

#: The identity of a caller when the gateway runs with ``--auth none``.
ANONYMOUS = "anonymous"
#: The outcome of a call that succeeded; any other outcome is a gRPC status code name.
OK = "OK"
#: Bound on :attr:`AuditEvent.summary` and :attr:`AuditEvent.detail` (characters).
MAX_TEXT = 512
#: Bound on the tenants one event names; a change touching more names the first ones and
#: says how many more in its summary.
MAX_TENANTS = 64


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One admin call as the audit stream keeps it.

    ``identity``: the key id of an API key, a client certificate's identity, or
    :data:`ANONYMOUS`. ``role``: the principal's role ("" when anonymous). ``method``: the RPC
    name (``ApplyPolicy``, ``RevokeKey``). ``policy_version_before`` and ``_after``: the live
    version around the change; both 0 for a call that is not a policy change (grants, keys).
    ``outcome``: :data:`OK` or a gRPC status code name; ``detail`` says why a call failed.
    ``at_ms`` (the store's clock) and ``event_id`` are set by the store when it appends.
    """

    identity: str
    role: str
    method: str
    summary: str
    tenants: tuple[str, ...] = ()
    policy_version_before: int = 0
    policy_version_after: int = 0
    outcome: str = OK
    detail: str = ""
    at_ms: int = 0
    event_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", _bounded(self.summary))
        object.__setattr__(self, "detail", _bounded(self.detail))
        object.__setattr__(self, "tenants", tuple(sorted(set(self.tenants)))[:MAX_TENANTS])

    @classmethod
    def of(
        cls,
        principal: Principal | None,
        method: str,
        summary: str,
        tenants: Iterable[str] = (),
    ) -> AuditEvent:
        """An event for a call by ``principal`` (None: ``--auth none``)."""
        if principal is None:
            return cls(ANONYMOUS, "", method, summary, tuple(t for t in tenants if t))
        return cls(
            principal.identity,
            principal.role.value,
            method,
            summary,
            tuple(t for t in tenants if t),
        )

    def with_outcome(self, outcome: str, detail: str = "") -> AuditEvent:
        return replace(self, outcome=outcome, detail=detail)

    def affects(self, tenant: str) -> bool:
        return tenant in self.tenants
