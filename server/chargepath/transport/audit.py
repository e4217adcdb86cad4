"""The audit of admin calls on the gRPC port: every call of a mutating RPC leaves one event.

:class:`AuditInterceptor` wraps the handlers of :data:`AUDITED` (AdminService's changes,
KeyService's create, rotate and revoke). For each call it opens a :class:`PendingAudit` (who is
read from :func:`~chargepath.transport.auth.current_principal` at the end, what from the
request), which the servicer may complete while it works (tenants affected, policy versions)
and may write itself, atomically with a policy change (``PolicyStore.publish_policy(...,
audit=...)``). Whatever the servicer did not write, the interceptor appends when the call ends:
the outcome is OK or the status code the call ended with.

The interceptor must be outside the :class:`~chargepath.transport.auth.AuthInterceptor`
(earlier in the server's interceptor list), so that calls refused by authorization are seen:

* PERMISSION_DENIED (a valid credential whose role may not make the call) is audited: a meter
  key trying to apply a policy is exactly what an audit is for. Such refusals are limited per
  identity (a burst of 20, then one per 3 s; the rest are counted in the log only), so that a
  key cannot flush the capped trail with refused calls.
* UNAUTHENTICATED is not: there is no verified identity to name, and failed attempts have
  their own per-peer limit.

A failure to append (the store is down) never changes the call's outcome: the event is logged
at ERROR level instead, the log being the trail of last resort.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from chargepath.core.audit import OK, AuditEvent
from chargepath.core.auth import FailedAttempts
from chargepath.core.validation import check_tenant
from chargepath.store.base import AuditLog, StoreUnavailableError
from chargepath.transport.auth import current_principal
from chargepath.transport.services import Undecodable

log = logging.getLogger("chargepath.audit")

_PENDING: contextvars.ContextVar[PendingAudit | None] = contextvars.ContextVar(
    "chargepath_pending_audit", default=None
)


@dataclass(slots=True)
class PendingAudit:
    """The audit event of the call being served, while it is served.

    The servicer adds ``tenants`` and the policy versions as it learns them; when it writes the
    event itself (in the same atomic step as the change) it sets ``written``.
    """

    method: str
    summary: str
    tenants: set[str] = field(default_factory=set)
    policy_version_before: int = 0
    policy_version_after: int = 0
    written: bool = False

    def add_tenants(self, tenants: Iterable[str]) -> None:
        self.tenants |= {t for t in tenants if t and check_tenant(t, "tenant") is None}

    def event(self, outcome: str = OK, detail: str = "") -> AuditEvent:
        """The event as it stands, by the current caller."""
        return replace(
            AuditEvent.of(current_principal(), self.method, self.summary, self.tenants),
            policy_version_before=self.policy_version_before,
            policy_version_after=self.policy_version_after,
            outcome=outcome,
            detail=detail,
        )


def pending_audit() -> PendingAudit | None:
    """The audit event of the call being served (None outside an audited call)."""
    return _PENDING.get()


# Summaries: what a call asked for, in a few fields. Never a secret, a key or a whole document
# (a document is named by its size and digest); each value is cut to 64 characters, since
# they are read before the servicer validates anything.

Describe = Callable[[Any], tuple[str, Iterable[str]]]


def _v(value: object) -> str:
    text = str(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _subject(s: Any) -> str:
    return f"tenant={_v(s.tenant)} slice={_v(s.slice)} key={_v(s.key)}"


def _apply_policy(r: Any) -> tuple[str, Iterable[str]]:
    body = r.document.encode()
    parts = [f"document={len(body)} bytes sha256:{hashlib.sha256(body).hexdigest()[:16]}"]
    if r.dry_run:
        parts.append("dry_run")
    if r.prune:
        parts.append("prune")
    if r.HasField("expected_version"):
        parts.append(f"expected_version={r.expected_version}")
    return " ".join(parts), ()


def _grant(r: Any) -> tuple[str, Iterable[str]]:
    expires = f" expires_at={r.expires_at.seconds}s" if r.HasField("expires_at") else ""
    return (
        f"{_subject(r.subject)} limit={_v(r.limit)} amount={r.amount}{expires} note={_v(r.note)}",
        (r.subject.tenant,),
    )


def _create_key(r: Any) -> tuple[str, Iterable[str]]:
    expires = f" expires_at={r.expires_at.seconds}s" if r.HasField("expires_at") else ""
    return (
        f"role={r.role} tenant={_v(r.tenant)}{expires} description={_v(r.description)}",
        (r.tenant,),
    )


_ADMIN = "/chargepath.v1.AdminService/"
_KEYS = "/chargepath.v1.KeyService/"

#: Every mutating RPC, by full method name, with how to summarise its request.
AUDITED: dict[str, Describe] = {
    _ADMIN + "ApplyPolicy": _apply_policy,
    _ADMIN + "PutPlan": lambda r: (
        f"plan={_v(r.plan.name)} limits={len(r.plan.limits)}",
        (),
    ),
    _ADMIN + "DeletePlan": lambda r: (f"plan={_v(r.name)}", ()),
    _ADMIN + "AssignPlan": lambda r: (
        f"tenant={_v(r.tenant)} slice={_v(r.slice)} plan={_v(r.plan)}",
        (r.tenant,),
    ),
    _ADMIN + "Grant": _grant,
    _ADMIN + "Suspend": lambda r: (
        f"{_subject(r.subject)} reason={_v(r.reason)}",
        (r.subject.tenant,),
    ),
    _ADMIN + "Resume": lambda r: (_subject(r.subject), (r.subject.tenant,)),
    _ADMIN + "SetFailurePolicy": lambda r: (
        f"tenant={_v(r.tenant)} mode={r.mode}",
        (r.tenant,),
    ),
    _KEYS + "CreateKey": _create_key,
    _KEYS + "RotateKey": lambda r: (
        f"key_id={_v(r.key_id)} grace_period={r.grace_period.seconds}s",
        (),
    ),
    _KEYS + "RevokeKey": lambda r: (f"key_id={_v(r.key_id)}", ()),
}

#: Outcomes limited per identity (see the module docstring).
_REFUSED = "PERMISSION_DENIED"
#: Outcomes not audited (no verified identity).
_UNAUDITED = frozenset({"UNAUTHENTICATED"})


def _outcome(context: Any, exc: BaseException) -> tuple[str, str]:
    """(status code name, message) a call that raised ended with."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED", "the call was cancelled"
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code.name, str(context.details() or "")
    return "UNKNOWN", "the call failed"


class _AuditedContext:
    """The servicer context of an audited call: an abort (by the servicer or by an inner
    interceptor) is audited first, so that the entry is in the trail before the caller sees
    the status. Everything else is the call's own context."""

    def __init__(self, context: Any, pending: PendingAudit, interceptor: AuditInterceptor):
        self._context = context
        self._pending = pending
        self._interceptor = interceptor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> None:
        await self._interceptor.settle(self._pending, code.name, details)
        await self._context.abort(code, details, *args)

    async def abort_with_status(self, status: Any) -> None:
        await self._interceptor.settle(self._pending, status.code.name, status.details)
        await self._context.abort_with_status(status)


class AuditInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Audits every call of :data:`AUDITED` into ``trail``. ``refusals``: the per-identity
    limit on audited refusals (default: a burst of 20, then one per 3 s, 10,000 identities)."""

    def __init__(self, trail: AuditLog, *, refusals: FailedAttempts | None = None) -> None:
        self._trail = trail
        self._refusals = (
            refusals
            if refusals is not None
            else FailedAttempts(
                lambda: time.monotonic_ns() // 1_000_000, burst=20, interval_ms=3000
            )
        )
        self.suppressed = 0
        # method -> (the handler, its audited version): built once per method.
        self._audited: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        describe = AUDITED.get(method)
        if handler is None or describe is None or handler.unary_unary is None:
            return handler
        known = self._audited.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        audited = self._wrap(method.rsplit("/", 1)[1], describe, handler)
        self._audited[method] = (handler, audited)
        return audited

    def _wrap(self, name: str, describe: Describe, handler: Any) -> Any:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            tenants: Iterable[str]
            if isinstance(request, Undecodable):
                # refused by the handler as INVALID_ARGUMENT before anything changes; the
                # bounded bad-input log notes it, and it is audited as a refusal
                summary, tenants = f"undecodable request ({request.size} bytes)", ()
            else:
                summary, tenants = describe(request)
            pending = PendingAudit(name, summary)
            pending.add_tenants(tenants)
            token = _PENDING.set(pending)
            try:
                response = await inner(request, _AuditedContext(context, pending, self))
            except BaseException as exc:
                # not an abort (those are audited before the status is sent): a bug, or the
                # call was cancelled
                if not pending.written:
                    await self.settle(pending, *_outcome(context, exc))
                raise
            finally:
                _PENDING.reset(token)
            if not pending.written:
                await self.settle(pending, OK)
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )

    async def settle(self, pending: PendingAudit, outcome: str, detail: str = "") -> None:
        """Record the call's event once, with its outcome."""
        if pending.written:
            return
        pending.written = True
        await self.record(pending.event(outcome, detail))

    async def record(self, event: AuditEvent) -> None:
        """Append ``event``, within the limits above; log it if the store cannot take it."""
        if event.outcome in _UNAUDITED:
            return
        if event.outcome == _REFUSED:
            if self._refusals.retry_after_ms(event.identity):
                self.suppressed += 1
                log.warning(
                    "audit: refused %s by %s not recorded (over the per-identity limit; "
                    "%d suppressed in this process)",
                    event.method,
                    event.identity,
                    self.suppressed,
                )
                return
            self._refusals.record(event.identity)
        try:
            await self._trail.append(event)
        except StoreUnavailableError as exc:
            log.error(
                "audit: could not append (%s); the event: who=%s role=%s rpc=%s what=%s "
                "tenants=%s versions=%d->%d outcome=%s detail=%s",
                exc,
                event.identity,
                event.role,
                event.method,
                event.summary,
                ",".join(event.tenants),
                event.policy_version_before,
                event.policy_version_after,
                event.outcome,
                event.detail,
            )
