"""Webhook events, their signature, the retry schedule and the degraded-mode notice: pure.

A delivery is an HTTP POST of the event as JSON (:meth:`WebhookEvent.body`), signed as Stripe
signs its webhooks: header ``Chargepath-Signature: t=<unix seconds>,v1=<hex>`` where the hex is
HMAC-SHA256, keyed with the endpoint's secret, of ``"<t>." + body``. The receiver recomputes it
over the raw body, compares in constant time, and refuses a ``t`` too far from its own clock
(a replayed delivery); ``examples/webhooks/receiver.py`` does exactly that. Every attempt is
signed anew with the time of the attempt; the body, and so the event id, stay the same.

An event id is derived from where the event comes from (:func:`event_id`), never drawn at
random: whichever gateway process relays or retries an event, it carries the same id, so a
receiver deduplicates by it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chargepath.core.plans import WebhookSpec

QUOTA_80 = "quota.80"
QUOTA_100 = "quota.100"
SUSPENSION = "suspension"
DEGRADED = "degraded"

SIGNATURE_HEADER = "Chargepath-Signature"
EVENT_ID_HEADER = "Chargepath-Event-Id"
EVENT_TYPE_HEADER = "Chargepath-Event-Type"


def event_id(*source: str) -> str:
    """A stable id from the event's source coordinates (e.g. tenant, stream entry id, type):
    ``evt_`` and 32 hex digits of their SHA-256."""
    digest = hashlib.sha256("\x1f".join(source).encode()).hexdigest()
    return f"evt_{digest[:32]}"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event to deliver. ``tenant`` is "" for an event of a gateway process (degraded).
    ``occurred_at_ms``: when it happened, on the clock of its source (Redis' for quota and
    suspension events, the process's for degraded mode)."""

    id: str
    type: str
    tenant: str
    occurred_at_ms: int
    data: dict[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        """The JSON document POSTed: the same bytes on every attempt."""
        doc = {
            "id": self.id,
            "type": self.type,
            "tenant": self.tenant,
            "occurred_at_ms": self.occurred_at_ms,
            "data": self.data,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>." + body`` keyed with ``secret``."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    """The value of ``Chargepath-Signature``: ``t=<unix seconds>,v1=<hex>``."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook of the live policy: where, which events, for which tenants (empty: all)."""

    name: str
    url: str
    events: frozenset[str]
    tenants: frozenset[str]
    secret_env: str | None
    secret_file: str | None

    @classmethod
    def of(cls, spec: WebhookSpec) -> Endpoint:
        return cls(
            spec.name,
            spec.url,
            frozenset(spec.events),
            frozenset(spec.tenants),
            spec.secret_env,
            spec.secret_file,
        )

    def wants(self, event: WebhookEvent) -> bool:
        """Whether this endpoint receives ``event``: its type is subscribed and, for a tenant
        event, the tenant is in the filter (or there is none)."""
        if event.type not in self.events:
            return False
        return not event.tenant or not self.tenants or event.tenant in self.tenants

    def wants_tenant(self, tenant: str, types: Iterable[str]) -> bool:
        """Whether any event of ``types`` for ``tenant`` would be delivered here."""
        return bool(self.events.intersection(types)) and (
            not self.tenants or tenant in self.tenants
        )


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Exponential backoff with jitter: the wait after failed attempt ``n`` (1-based) is drawn
    in [d/2, d] where d = min(``max_s``, ``base_s`` * 2^(n-1)) ("equal jitter": never
    shorter than half the nominal wait, so retries of many events spread out without
    hammering a recovering endpoint). After ``max_attempts`` attempts the event is given up
    for that endpoint."""

    base_s: float = 1.0
    max_s: float = 300.0
    max_attempts: int = 12

    def wait_s(self, attempt: int, rand: Callable[[], float]) -> float:
        nominal = min(self.max_s, self.base_s * 2.0 ** max(0, attempt - 1))
        return nominal / 2 + rand() * nominal / 2


class DegradedNotice:
    """When one gateway process's store becomes unreachable (health NOT_SERVING) and reachable
    again, the degraded-mode events to send, at most one "entered" event per ``interval_s``.
    A flip inside the interval is not announced, and neither is the recovery that ends it;
    the next "entered" event counts the suppressed flips (``suppressed``). A "left" event
    follows each "entered" event that was sent. The first status seen is the start-up state,
    not a change. ``process``: the process's identity (host, pid, start time), part of each
    event's id."""

    def __init__(self, process: str, interval_s: float) -> None:
        self.process = process
        self.interval_s = interval_s
        self._serving: bool | None = None
        self._last_sent_s: float | None = None
        self._announced = False
        self._since_ms = 0
        self._suppressed = 0
        self._seq = 0

    def flip(self, serving: bool, now_s: float, now_ms: int) -> WebhookEvent | None:
        """The event for the status ``serving`` seen at ``now_s`` (monotonic seconds, for
        the rate limit) and ``now_ms`` (wall clock, for the event), or None."""
        before, self._serving = self._serving, serving
        if before is None or before == serving:
            return None
        if not serving:
            if self._last_sent_s is not None and now_s - self._last_sent_s < self.interval_s:
                self._suppressed += 1
                self._announced = False
                return None
            self._last_sent_s = now_s
            self._announced = True
            self._since_ms = now_ms
            data: dict[str, Any] = {
                "degraded": True,
                "process": self.process,
                "suppressed": self._suppressed,
            }
            self._suppressed = 0
        else:
            if not self._announced:
                return None
            self._announced = False
            data = {
                "degraded": False,
                "process": self.process,
                "degraded_ms": max(0, now_ms - self._since_ms),
            }
        self._seq += 1
        return WebhookEvent(
            event_id(DEGRADED, self.process, str(self._seq)), DEGRADED, "", now_ms, data
        )


def threshold_event(tenant: str, source_id: str, fields: dict[str, str]) -> WebhookEvent:
    """The event of a quota threshold crossing: ``fields`` as decide.lua writes a trail entry
    ``e=th`` (limit ``l``, slice ``sl``, key ``k``, percent ``pc``, used ``u``, capacity
    ``c``, time ``ts`` in ms), ``source_id`` the trail entry's id."""
    kind = QUOTA_100 if int(fields["pc"]) >= 100 else QUOTA_80
    return WebhookEvent(
        event_id(tenant, source_id, kind),
        kind,
        tenant,
        int(fields["ts"]),
        {
            "limit": fields["l"],
            "slice": fields.get("sl", ""),
            "key": fields.get("k", ""),
            "percent": int(fields["pc"]),
            "used": int(fields["u"]),
            "capacity": int(fields["c"]),
        },
    )


def suspension_event(source_id: str, fields: dict[str, str]) -> WebhookEvent:
    """The event of a suspension or resumption (an entry the suspension relay wrote: tenant
    ``t``, slice ``sl``, key ``k``, ``s`` "1" suspended / "0" resumed, ``r`` reason, ``v``
    the policy version that made the change, ``ts`` ms)."""
    tenant = fields["t"]
    return WebhookEvent(
        event_id(tenant, source_id, SUSPENSION),
        SUSPENSION,
        tenant,
        int(fields["ts"]),
        {
            "slice": fields.get("sl", ""),
            "key": fields.get("k", ""),
            "suspended": fields["s"] == "1",
            "reason": fields.get("r", ""),
            "policy_version": int(fields["v"]),
        },
    )
