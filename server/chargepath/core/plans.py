"""Plans: the policy document (metrics, plans, tenants) and its validation.

The same document is what ``chargepath serve --plans FILE`` publishes and what the admin API
accepts. Validation errors are :class:`PolicyIssue` structures naming the field by its path
and, for text, its line and column. Every issue of a document is found in one pass: the
schema's (pydantic's, per field) and the rules across fields (duplicate names, references to
metrics, plans and tenants: :func:`policy_rules`), which are checked on the decoded data even
when some fields do not validate. This module parses text; reading files is
:mod:`chargepath.policy_files`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chargepath.core.model import Scope
from chargepath.core.units import DEFAULT_UNIT, unit_problem
from chargepath.core.validation import METRIC_RE, TENANT_RE

# Integers in Lua are doubles: every scaled amount must stay exact.
MAX_EXACT = 2**53

NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
SUBJECT_PART = r"^[A-Za-z0-9._~@+=/-]{1,128}$"
PATTERN_RE = re.compile(r"[a-z0-9_*]+(\.[a-z0-9_*]+)*")

RATE_PERIOD_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000}

#: The validation context of a document read back from the store: it was validated when it was
#: published, and a unit accepted then (before units came from a list) still loads.
PUBLISHED: Mapping[str, bool] = {"published": True}

#: A field's path in a document: names and list indexes (``("plans", 0, "limits", 1)``).
Loc = tuple[int | str, ...]
#: What a rule found: each issue with its field's path.
Found = list[tuple[Loc, str]]
#: The pydantic error type of a rule across fields (a duplicate name, a reference).
RULE_ERROR = "policy_rule"


def _refuse(title: str, found: Found) -> None:
    """Raise what the rules found as one ValidationError, each issue at its field's path
    (pydantic prefixes the path of the model being validated)."""
    if found:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(type=PydanticCustomError(RULE_ERROR, message), loc=loc, input=None)
                for loc, message in found
            ],
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    """A metric of the catalog: what is counted, in which whole unit."""

    name: str
    #: One of :data:`chargepath.core.units.UNITS`, or ``x-<name>``.
    unit: str = DEFAULT_UNIT
    description: str = ""

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not METRIC_RE.fullmatch(name) or len(name) > 128:
            raise ValueError("must be dot-separated [a-z0-9_] words, e.g. api.sms.send")
        return name

    @field_validator("unit")
    @classmethod
    def _check_unit(cls, unit: str, info: ValidationInfo) -> str:
        problem = unit_problem(unit)
        if problem is not None and not (info.context or {}).get("published"):
            raise ValueError(problem)
        return unit


class RateSpec(_Strict):
    """A token bucket: holds ``capacity`` units, refills ``refill`` units per ``per``."""

    capacity: Annotated[int, Field(gt=0)]
    refill: Annotated[int, Field(gt=0)]
    per: Literal["second", "minute", "hour"] = "second"


class QuotaSpec(_Strict):
    """A budget of ``amount`` units per UTC hour, day, ISO week (from Monday 00:00) or
    calendar month; no refill."""

    amount: Annotated[int, Field(gt=0, lt=MAX_EXACT)]
    per: Literal["hour", "day", "week", "month"]


#: ``validity`` of a lease: a whole number of milliseconds, seconds, minutes or hours.
VALIDITY_RE = re.compile(r"([0-9]{1,9})(ms|s|m|h)")
VALIDITY_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
#: Bounds of a lease's validity, ms: long enough to spend a grant, short enough that the
#: units of a holder that died come back within the day.
MIN_VALIDITY_MS = 100
MAX_VALIDITY_MS = 86_400_000


class LeaseSpec(_Strict):
    """A limit's lease settings (``lease:``): without them, the limit grants no lease, and a
    lease ask on a metric it counts is refused (NO_ENTITLEMENT).

    * ``max_units``: the largest grant this limit allows at once.
    * ``max_share_pct``: 1 to 100, at most this share of what the limit has left (but at
      least one unit while one is left), so that many holders cannot starve one another.
    * ``validity``: how long a grant lasts unreported, e.g. ``30s``, ``500ms``, ``5m`` (kept
      in its largest exact unit: ``60s`` is ``1m``); at expiry whatever was granted and not
      reported goes back to the limit.
    * ``renew_below_pct``: 0 to 100, the renewal threshold as a share of the grant.
    * ``gateway``: the gateway itself may hold leases on this limit to answer Checks
      locally."""

    max_units: Annotated[int, Field(ge=1, lt=MAX_EXACT)]
    max_share_pct: Annotated[int, Field(ge=1, le=100)]
    validity: str
    renew_below_pct: Annotated[int, Field(ge=0, le=100)] = 20
    gateway: bool = False

    @field_validator("validity", mode="before")
    @classmethod
    def _check_validity(cls, validity: Any) -> str:
        ms = parse_validity_ms(validity) if isinstance(validity, str) else None
        if ms is None:
            raise ValueError(
                f"must be a whole number with a unit of ms, s, m or h, e.g. 30s (got {validity!r})"
            )
        if not MIN_VALIDITY_MS <= ms <= MAX_VALIDITY_MS:
            raise ValueError(f"must be between 100ms and 24h (got {validity!r})")
        return format_validity_ms(ms)

    @property
    def validity_ms(self) -> int:
        ms = parse_validity_ms(self.validity)
        assert ms is not None  # checked when the spec was made
        return ms


def format_validity_ms(ms: int) -> str:
    """``ms`` in its largest exact unit (60000 -> ``1m``): the one form a validity is kept in,
    so that ``60s``, ``1m`` and 60,000 ms on the wire are one document."""
    for unit in ("h", "m", "s"):
        size = VALIDITY_UNIT_MS[unit]
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_validity_ms(text: str) -> int | None:
    """``30s`` -> 30000; None when ``text`` is not a whole number with a unit."""
    m = VALIDITY_RE.fullmatch(text.strip())
    return int(m.group(1)) * VALIDITY_UNIT_MS[m.group(2)] if m else None


class LimitSpec(_Strict):
    """One limit of a plan: which metrics it counts (a pattern), at which scope, and how.
    ``lease``: the limit grants quota leases (:class:`LeaseSpec`); None: it does not."""

    name: Annotated[str, Field(pattern=NAME_RE)]
    metric: str
    scope: Literal["tenant", "slice", "key"] = "tenant"
    rate: RateSpec | None = None
    quota: QuotaSpec | None = None
    soft: bool = False
    lease: LeaseSpec | None = None

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, metric: str) -> str:
        if not PATTERN_RE.fullmatch(metric):
            raise ValueError(
                f"must be a metric name or a pattern with '*', e.g. api.sms.* (got {metric!r})"
            )
        return metric

    @model_validator(mode="after")
    def _check(self) -> LimitSpec:
        if (self.rate is None) == (self.quota is None):
            raise ValueError("a limit has exactly one of 'rate' or 'quota'")
        if self.rate is not None:
            compiled = compile_rate(self.rate)
            if compiled.capacity_scaled >= MAX_EXACT:
                _refuse(
                    "LimitSpec",
                    [
                        (
                            ("rate",),
                            f"capacity {self.rate.capacity} with refill {self.rate.refill}/"
                            f"{self.rate.per} is too large to count exactly; use a coarser unit",
                        )
                    ],
                )
        return self


class LedgerSpec(_Strict):
    """How allowed admits reach the ledger: one entry each (``entries``), or one entry per
    (subject, metric) and interval (``aggregate``) for high-rate admits. Reports always get one
    entry each. Either way the ledger's totals equal the units decided."""

    mode: Literal["entries", "aggregate"] = "entries"
    interval_s: Annotated[int, Field(ge=1, le=3600)] = 60


class PlanSpec(_Strict):
    """A named set of limits."""

    name: Annotated[str, Field(pattern=NAME_RE)]
    description: str = ""
    limits: list[LimitSpec] = []
    ledger: LedgerSpec = LedgerSpec()

    @model_validator(mode="after")
    def _unique(self) -> PlanSpec:
        _refuse("PlanSpec", _duplicates(_named(self.limits, ("limits",)), "limit"))
        return self


class FailurePolicySpec(_Strict):
    """What a decision does when the store is unreachable: ``deny`` (fail closed, the online
    charging default) or ``allow`` (fail open within the plan's rate limits, counted locally)."""

    mode: Literal["deny", "allow"] = "deny"


class SliceSpec(_Strict):
    """A slice of a tenant, optionally with a plan of its own (whose limits add to the
    tenant's)."""

    name: Annotated[str, Field(pattern=SUBJECT_PART)]
    plan: str | None = None
    #: Why the slice is suspended; None: not suspended.
    suspended: Annotated[str, Field(max_length=256)] | None = None


class KeySpec(_Strict):
    """A key of a tenant with a state of its own (today: a suspension). ``slice`` narrows it
    to one slice; empty means the key in any slice."""

    name: Annotated[str, Field(pattern=SUBJECT_PART)]
    slice: Annotated[str, Field(pattern=r"^[A-Za-z0-9._~@+=/-]{0,128}$")] = ""
    suspended: Annotated[str, Field(max_length=256)] | None = None


#: A cap's bound: a count of live records, or None for no cap (nothing counted, no cost).
CapBound = Annotated[int, Field(ge=1, le=100_000_000)] | None


class CapsSpec(_Strict):
    """Bounds on what a tenant's usages keep in Redis, which grows with what a caller sends:
    each new request id, stream session, slice and key creates records that live for a while.
    A usage that would pass a cap is refused, DENY ``CAP_REACHED``, and writes nothing; a
    usage that adds nothing new (a resend, a known session, slice or key) is decided as
    usual. ``null``: no cap (and no counting cost).

    Each bound counts live records, exactly, on Redis' clock (store/scripts/lib/caps.lua):

    * ``request_ids``: request-id dedup records (Check, and stream usages without a session),
      each kept for the dedup window (10 minutes by default). About 340 bytes each (the
      record ~220, its entry in the count ~120): the default holds about 340 MB.
    * ``sessions``: stream sessions, each kept for the session ttl (24 hours by default)
      after its last usage: 300 bytes to 8.5 KB each (its replay window fills up to 128
      verdicts of 65 bytes), plus ~120 in the count.
    * ``slices``: distinct slices with a live counter of a slice- or key-scoped limit (kept
      until the limit's period ends, a rate's until its bucket is full again).
    * ``keys``: distinct (slice, key) pairs with a live counter of a key-scoped limit.

    A tenant-scoped limit creates nothing per slice or key; neither cap applies to it."""

    request_ids: CapBound = 1_000_000
    sessions: CapBound = 100_000
    slices: CapBound = 10_000
    keys: CapBound = 100_000


DEFAULT_CAPS = CapsSpec()


class TenantSpec(_Strict):
    """A tenant's entitlement: its plan, its slices, its failure policy, and its caps on what
    its usages keep in the store."""

    name: str
    plan: str | None = None
    failure_policy: FailurePolicySpec = FailurePolicySpec()
    #: Why the tenant is suspended; None: not suspended.
    suspended: Annotated[str, Field(max_length=256)] | None = None
    slices: list[SliceSpec] = []
    keys: list[KeySpec] = []
    caps: CapsSpec = DEFAULT_CAPS

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not TENANT_RE.fullmatch(name):
            raise ValueError("must be 1 to 64 characters of [A-Za-z0-9._-]")
        return name

    @model_validator(mode="after")
    def _check(self) -> TenantSpec:
        if len(self.slices) < 2 and len(self.keys) < 2:
            return self  # nothing can be a duplicate (most tenants: skip the work)
        names = {
            "slices": [{"name": s.name} for s in self.slices],
            "keys": [{"name": k.name, "slice": k.slice} for k in self.keys],
        }
        _refuse("TenantSpec", _tenant_rules(names, ()))
        return self


#: What a descriptor entry's value becomes in the subject of the usage (``subject:``).
SubjectPart = Literal["tenant", "slice", "key"]


class DescriptorSpec(_Strict):
    """One node of an Envoy domain's descriptor tree, as in envoyproxy/ratelimit's config: it
    matches the descriptor entry at its depth by ``key`` and, if given, ``value`` (an entry
    with that exact value is matched before a node without ``value``). ``subject`` makes the
    entry's value the usage's tenant, slice or key. A node with ``metric`` ends a descriptor:
    a descriptor whose last entry matches it is one usage of that metric (the amount is the
    request's ``hits_addend``, default 1). ``shadow_mode``: decided and counted as usual, but
    always answered OK (with the headers), as envoyproxy/ratelimit's shadow mode."""

    key: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    subject: SubjectPart | None = None
    metric: str | None = None
    shadow_mode: bool = False
    descriptors: list[DescriptorSpec] = []

    @model_validator(mode="after")
    def _check(self) -> DescriptorSpec:
        if self.metric is None and not self.descriptors:
            raise ValueError(
                f"descriptor {self.key!r}: a node needs a 'metric' or nested 'descriptors'"
            )
        _refuse("DescriptorSpec", _descriptor_duplicates(_matches(self.descriptors), ()))
        return self


class EnvoyDomainSpec(_Strict):
    """How Envoy's rate limit requests (RLS) and quota buckets (RLQS) of one ``domain`` become
    usages. ``tenant``: the tenant of every descriptor of the domain (a tenant's own Envoy);
    otherwise a node with ``subject: tenant`` names it. ``strict``: a descriptor that matches
    no node is OVER_LIMIT; by default it is OK and nothing is counted, as in
    envoyproxy/ratelimit. ``shadow_mode`` applies to every descriptor of the domain."""

    domain: Annotated[str, Field(min_length=1, max_length=256)]
    tenant: str | None = None
    strict: bool = False
    shadow_mode: bool = False
    descriptors: list[DescriptorSpec] = []

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, tenant: str | None) -> str | None:
        if tenant is not None and not TENANT_RE.fullmatch(tenant):
            raise ValueError("must be 1 to 64 characters of [A-Za-z0-9._-]")
        return tenant

    @model_validator(mode="after")
    def _check(self) -> EnvoyDomainSpec:
        _refuse("EnvoyDomainSpec", _descriptor_duplicates(_matches(self.descriptors), ()))
        return self


#: The events a webhook may subscribe to (``events:``): a quota counter crossing 80% or 100%
#: of its capacity (grants included), a subject suspended or resumed, and a gateway process
#: entering or leaving degraded mode (its store unreachable).
WebhookEventName = Literal["quota.80", "quota.100", "suspension", "degraded"]
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class WebhookSpec(_Strict):
    """An HTTP(S) endpoint that receives signed events (``chargepath.webhooks``). The signing
    secret never appears in the policy: ``secret_env`` names an environment variable of the
    gateway, or ``secret_file`` a file the gateway reads (its content, without the trailing
    newline). ``tenants`` narrows the tenant events (quota, suspension) to those tenants;
    empty: every tenant. Degraded-mode events concern a gateway process, not a tenant: every
    webhook subscribed to ``degraded`` receives them."""

    name: Annotated[str, Field(pattern=NAME_RE)]
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    events: Annotated[list[WebhookEventName], Field(min_length=1)]
    tenants: list[str] = []
    secret_env: Annotated[str, Field(pattern=ENV_NAME_RE)] | None = None
    secret_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None

    #: Refused whenever present: the signing secret is never written in the policy.
    secret: Annotated[Any, Field(exclude=True)] = None

    @field_validator("secret")
    @classmethod
    def _no_clear_secret(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "the signing secret may not be written in the policy; name it with "
                "secret_env (an environment variable of the gateway) or secret_file"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials (the deliveries are signed)")
        return url

    @field_validator("tenants")
    @classmethod
    def _check_tenants(cls, tenants: list[str]) -> list[str]:
        for t in tenants:
            if not TENANT_RE.fullmatch(t):
                raise ValueError(f"{t!r} must be 1 to 64 characters of [A-Za-z0-9._-]")
        return tenants

    @model_validator(mode="after")
    def _check(self) -> WebhookSpec:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("a webhook has exactly one of 'secret_env' or 'secret_file'")
        _refuse("WebhookSpec", _event_duplicates(list(self.events), ()))
        return self


class PolicyDocument(_Strict):
    """The whole policy: the metric catalog, the plans, the tenants assigned to them, how
    Envoy's descriptors map onto tenants and metrics (``envoy``), and the endpoints that
    receive signed events (``webhooks``)."""

    metrics: list[MetricSpec] = []
    plans: list[PlanSpec] = []
    tenants: list[TenantSpec] = []
    envoy: list[EnvoyDomainSpec] = []
    webhooks: list[WebhookSpec] = []

    @model_validator(mode="after")
    def _cross_check(self) -> PolicyDocument:
        # the nested models validated, their own rules included
        _refuse("PolicyDocument", policy_rules(self.rule_view(), nested=False))
        return self

    def rule_view(self) -> dict[str, Any]:
        """What :func:`policy_rules` reads of the document, as decoded data: the names and
        references only (a whole ``model_dump`` of a large document costs more than the rules).
        """
        return {
            "metrics": [{"name": m.name} for m in self.metrics],
            "plans": [
                {
                    "name": p.name,
                    "limits": [
                        {"name": lim.name, "metric": lim.metric, "scope": lim.scope}
                        for lim in p.limits
                    ],
                }
                for p in self.plans
            ],
            "tenants": [
                {
                    "name": t.name,
                    "plan": t.plan,
                    "slices": [{"name": s.name, "plan": s.plan} for s in t.slices],
                    "keys": [{"name": k.name, "slice": k.slice} for k in t.keys],
                }
                for t in self.tenants
            ],
            "envoy": [d.model_dump(mode="json") for d in self.envoy],
            "webhooks": [
                {"name": w.name, "events": list(w.events), "tenants": list(w.tenants)}
                for w in self.webhooks
            ],
        }

    def canonical_json(self) -> str:
        """A stable serialisation: equal documents give equal strings. A document without an
        ``envoy`` or ``webhooks`` section, a tenant with the default ``caps``, or a limit
        without ``lease`` settings, serialises
        as it did before the section existed, so that its published version does not
        change."""
        data = self.model_dump(mode="json")
        for section in ("envoy", "webhooks"):
            if not data[section]:
                del data[section]
        defaults = DEFAULT_CAPS.model_dump(mode="json")
        for tenant in data["tenants"]:
            if tenant["caps"] == defaults:
                del tenant["caps"]
        for plan in data["plans"]:
            for limit in plan["limits"]:
                if limit["lease"] is None:
                    del limit["lease"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_json`: equal documents, equal digests."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# -- the rules across fields -------------------------------------------------------------------
# They read the decoded document (dicts and lists, as YAML or JSON gives them), not the models,
# so that they also run when some fields do not validate: a file's every issue is reported in
# one pass. What is not of the expected shape is skipped here; the schema reports it.


def _items(data: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    """The mappings of the list ``data[key]``, with their indexes. (YAML and JSON decode
    mappings as dicts; ``isinstance(x, dict)`` is also much cheaper than an ABC check.)"""
    seq = data.get(key) if isinstance(data, dict) else None
    if not isinstance(seq, list):
        return []
    return [(i, item) for i, item in enumerate(seq) if isinstance(item, dict)]


def _text(item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) else None


def _named(models: Iterable[Any], loc: Loc) -> list[tuple[Loc, str | None]]:
    return [((*loc, i, "name"), m.name) for i, m in enumerate(models)]


def _duplicates(named: Iterable[tuple[Loc, str | None]], what: str) -> Found:
    """An issue at each name that an earlier item already has."""
    seen: set[str] = set()
    out: Found = []
    for loc, name in named:
        if name is None:
            continue
        if name in seen:
            out.append((loc, f"duplicate {what} name {name!r}"))
        seen.add(name)
    return out


def _plan_rules(plan: Any, loc: Loc) -> Found:
    return _duplicates(
        (((*loc, "limits", i, "name"), _text(lim, "name")) for i, lim in _items(plan, "limits")),
        "limit",
    )


def _tenant_rules(tenant: Any, loc: Loc) -> Found:
    def key_id(k: dict[str, Any]) -> str | None:
        name, slice_ = _text(k, "name"), k.get("slice", "")
        return f"{slice_}/{name}" if name is not None and isinstance(slice_, str) else None

    slices = [((*loc, "slices", i, "name"), _text(s, "name")) for i, s in _items(tenant, "slices")]
    keys = [((*loc, "keys", i, "name"), key_id(k)) for i, k in _items(tenant, "keys")]
    return _duplicates(slices, "slice") + _duplicates(keys, "key")


def _descriptor_duplicates(node: Any, loc: Loc) -> Found:
    """Two children of one node (or domain) that match the same (key, value)."""

    def match(d: dict[str, Any]) -> str | None:
        key, value = _text(d, "key"), d.get("value")
        if key is None or not isinstance(value, str | None):
            return None
        return f"{key}={value if value is not None else '*'}"

    return _duplicates(
        (((*loc, "descriptors", i), match(d)) for i, d in _items(node, "descriptors")),
        "descriptor (key, value)",
    )


def _matches(nodes: list[DescriptorSpec]) -> dict[str, Any]:
    """What :func:`_descriptor_duplicates` reads of a node's children."""
    return {"descriptors": [{"key": d.key, "value": d.value} for d in nodes]}


def _event_duplicates(events: Any, loc: Loc) -> Found:
    if not isinstance(events, list):
        return []
    return _duplicates(
        (((*loc, "events", i), e if isinstance(e, str) else None) for i, e in enumerate(events)),
        "event",
    )


def _envoy_rules(data: Any, metrics: frozenset[str], *, nested: bool) -> Found:
    """The rules of the Envoy mapping that need the whole document: a metric in the catalog, a
    tenant on the path of every node with a metric, a subject part bound once per path."""
    out: Found = []

    def walk(parent: dict[str, Any], loc: Loc, bound: frozenset[str]) -> None:
        if nested:
            out.extend(_descriptor_duplicates(parent, loc))
        for i, node in _items(parent, "descriptors"):
            here = (*loc, "descriptors", i)
            now = bound
            subject = node.get("subject")
            if subject in ("tenant", "slice", "key"):
                if subject in bound:
                    out.append(((*here, "subject"), f"the {subject} is already given above"))
                now = bound | {subject}
            metric = _text(node, "metric")
            if metric is not None:
                if metric not in metrics:
                    out.append(
                        ((*here, "metric"), f"unknown metric {metric!r}: not in the catalog")
                    )
                if "tenant" not in now:
                    out.append(
                        (
                            here,
                            "no tenant for this descriptor: set the domain's 'tenant', or "
                            "'subject: tenant' on an entry above",
                        )
                    )
            walk(node, here, now)

    for d, domain in _items(data, "envoy"):
        walk(domain, ("envoy", d), frozenset({"tenant"} if domain.get("tenant") else ()))
    return out


def policy_rules(data: Any, *, nested: bool = True) -> Found:
    """Every rule of a policy document across its fields, on the decoded document: names are
    unique (metrics, plans, tenants, limits of a plan, slices and keys of a tenant, Envoy
    domains and descriptors, webhooks and their events); a limit's metric pattern matches a
    metric of the catalog; a plan assigned to a tenant or a slice exists; a slice's plan counts
    at scope slice or key, with limit names of its own; the Envoy mapping's metrics and
    tenants; a webhook's tenants exist. Each issue names the field it concerns.

    ``nested=False`` leaves out the rules that the nested models check themselves (names
    unique within a plan, a tenant, a descriptor node, a webhook's events): for a document
    whose models all validated."""
    out: Found = []
    metrics, plans, tenants = (
        _items(data, "metrics"),
        _items(data, "plans"),
        _items(data, "tenants"),
    )
    domains, webhooks = _items(data, "envoy"), _items(data, "webhooks")
    for section, items, key, what in (
        ("metrics", metrics, "name", "metric"),
        ("plans", plans, "name", "plan"),
        ("tenants", tenants, "name", "tenant"),
        ("envoy", domains, "domain", "envoy domain"),
        ("webhooks", webhooks, "name", "webhook"),
    ):
        out += _duplicates((((section, i, key), _text(it, key)) for i, it in items), what)
    catalog = [name for _, m in metrics if (name := _text(m, "name")) is not None]
    by_name: dict[str, dict[str, Any]] = {}
    for p, plan in plans:
        name = _text(plan, "name")
        if name is not None:
            by_name.setdefault(name, plan)
        if nested:
            out += _plan_rules(plan, ("plans", p))
        for i, lim in _items(plan, "limits"):
            pattern = _text(lim, "metric")
            # a malformed pattern is the schema's issue; a well-formed one must match
            if pattern is None or not PATTERN_RE.fullmatch(pattern):
                continue
            if not any(fnmatchcase(m, pattern) for m in catalog):
                out.append(
                    (
                        ("plans", p, "limits", i, "metric"),
                        f"{pattern!r} matches no metric of the catalog",
                    )
                )

    def unknown(plan: str) -> str:
        return f"unknown plan {plan!r}: not in 'plans'"

    for t, tenant in tenants:
        if nested:
            out += _tenant_rules(tenant, ("tenants", t))
        assigned = _text(tenant, "plan")
        if assigned is not None and assigned not in by_name:
            out.append((("tenants", t, "plan"), unknown(assigned)))
        for s, slice_ in _items(tenant, "slices"):
            plan_name = _text(slice_, "plan")
            if plan_name is None:
                continue
            own = {_text(lim, "name") for _, lim in _items(by_name.get(assigned or ""), "limits")}
            here = ("tenants", t, "slices", s, "plan")
            if plan_name not in by_name:
                out.append((here, unknown(plan_name)))
                continue
            for _, lim in _items(by_name[plan_name], "limits"):
                name = _text(lim, "name")
                if lim.get("scope", "tenant") == "tenant":
                    out.append(
                        (
                            here,
                            f"plan {plan_name!r} has limit {name!r} with scope 'tenant'; a "
                            "slice's plan counts at scope 'slice' or 'key'",
                        )
                    )
                if name is not None and name in own:
                    out.append(
                        (
                            here,
                            f"limit {name!r} is in both the tenant's plan {assigned!r} and the "
                            f"slice's plan {plan_name!r}; limit names must differ",
                        )
                    )
    out += _envoy_rules(data, frozenset(catalog), nested=nested)
    known = {name for _, t in tenants if (name := _text(t, "name")) is not None}
    for w, hook in webhooks:
        if nested:
            out += _event_duplicates(hook.get("events"), ("webhooks", w))
        listed = hook.get("tenants")
        for i, name in enumerate(listed if isinstance(listed, list) else []):
            # a malformed name is the schema's issue
            if isinstance(name, str) and TENANT_RE.fullmatch(name) and name not in known:
                out.append(
                    (("webhooks", w, "tenants", i), f"unknown tenant {name!r}: not in 'tenants'")
                )
    return out


@dataclass(frozen=True, slots=True)
class CompiledRate:
    """A rate limit in exact integers: a level of ``scale`` per unit, refilled by
    ``refill_per_ms`` per millisecond. ``scale = period_ms / gcd(refill, period_ms)``."""

    scale: int
    refill_per_ms: int
    capacity_scaled: int


def compile_rate(rate: RateSpec) -> CompiledRate:
    period_ms = RATE_PERIOD_MS[rate.per]
    g = math.gcd(rate.refill, period_ms)
    scale = period_ms // g
    return CompiledRate(scale, rate.refill // g, rate.capacity * scale)


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One reason a policy document was refused, as a structure: shown as text by the CLI
    (``str``), as a field violation by the admin API, never parsed back out of text.

    ``source`` names the text (a file path; ``document`` for the admin API). ``path`` is the
    field's dotted path (``plans.0.limits.0.rate.capacity``); ``""`` for a rule on the
    document as a whole; None when the text is not a document at all (unreadable, not YAML,
    not a mapping). ``line`` and ``column`` are 1-based, of the field's value in the source
    (of the nearest enclosing one that is written, for a field that is missing); None when
    unknown (a document that was not parsed from text)."""

    source: str
    path: str | None
    line: int | None
    message: str
    column: int | None = None

    @property
    def detail(self) -> str:
        """The issue without its source and line: ``path: message``."""
        if self.path is None:
            return self.message
        return f"{self.path or '(document)'}: {self.message}"

    def __str__(self) -> str:
        """``source:line: path: message``, one line (a message never holds a line break)."""
        where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        return where + self.detail


class PolicyError(ValueError):
    """A policy document that does not validate: every :class:`PolicyIssue` found, in the
    order of their lines (issues without a line last)."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("invalid policy:\n  " + "\n  ".join(self.errors))

    @property
    def errors(self) -> list[str]:
        """The issues as human-readable lines (``source:line: path: message``)."""
        return [str(issue) for issue in self.issues]


def _position_of(root: yaml.Node, loc: Loc) -> tuple[int, int]:
    """The 1-based (line, column) of the value at ``loc``, or of the deepest part of the path
    that is written (a missing field: the mapping that lacks it)."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            nxt = node.value[part] if 0 <= part < len(node.value) else None
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse_policy(
    data: Any, *, source: str = "policy", yaml_root: yaml.Node | None = None
) -> PolicyDocument:
    """Validate a decoded document; raise :class:`PolicyError` naming every bad field: the
    schema's issues and the rules' (:func:`policy_rules`) together."""
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        # A field that does not validate stops pydantic before the document's rules: run them
        # on the decoded data (an issue a nested model already found is not repeated).
        raise PolicyError(_issues(exc, policy_rules(data), source, yaml_root)) from None


def parse_plan(data: Any, *, source: str = "plan") -> PlanSpec:
    """Validate one decoded plan (paths relative to the plan); raise :class:`PolicyError`."""
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_issues(exc, _plan_rules(data, ()), source, None)) from None


def _issues(
    exc: ValidationError, rules: Found, source: str, yaml_root: yaml.Node | None
) -> list[PolicyIssue]:
    found: Found = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        found.append((loc, err["msg"].removeprefix("Value error, ")))
    found += [issue for issue in rules if issue not in found]
    issues = []
    for loc, message in found:
        line, column = _position_of(yaml_root, loc) if yaml_root is not None else (None, None)
        issues.append(PolicyIssue(source, ".".join(str(p) for p in loc), line, message, column))
    return _in_text_order(issues)


def _in_text_order(issues: list[PolicyIssue]) -> list[PolicyIssue]:
    # sorted() is stable: the order they were found in, within a line
    return sorted(issues, key=lambda i: (i.line is None, i.line or 0, i.column or 0))


def _duplicate_keys(node: yaml.Node, loc: Loc = ()) -> list[tuple[Loc, yaml.Node]]:
    """Keys written twice in one mapping (YAML keeps only the last one, silently)."""
    out: list[tuple[Loc, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                out.append(((*loc, name), key))
            if name is not None:
                seen.add(name)
            out += _duplicate_keys(value, (*loc, name if name is not None else "?"))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, (*loc, i))
    return out


def load_policy_text(text: str, *, source: str = "policy") -> PolicyDocument:
    """Parse YAML (or JSON, a subset of YAML) text into a validated document; raise
    :class:`PolicyError` with every issue: a key written twice in a mapping, and each issue of
    :func:`parse_policy`. Text that is not YAML is one issue, at the line where parsing
    stopped."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = ": ".join(
            str(part)
            for part in (getattr(exc, "context", None), getattr(exc, "problem", None))
            if part
        )
        raise PolicyError(
            [
                PolicyIssue(
                    source,
                    None,
                    None if mark is None else mark.line + 1,
                    f"not valid YAML: {what or type(exc).__name__}",
                    None if mark is None else mark.column + 1,
                )
            ]
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(
            [
                PolicyIssue(
                    source,
                    None,
                    None,
                    "the document must be a mapping with metrics, plans, tenants",
                )
            ]
        )
    duplicates = [
        PolicyIssue(
            source,
            ".".join(str(p) for p in loc),
            key.start_mark.line + 1,
            "key written twice in this mapping: only the last one would count",
            key.start_mark.column + 1,
        )
        for loc, key in (_duplicate_keys(root) if root is not None else [])
    ]
    try:
        document = parse_policy(data, source=source, yaml_root=root)
    except PolicyError as exc:
        raise PolicyError(_in_text_order([*exc.issues, *duplicates])) from None
    if duplicates:
        raise PolicyError(duplicates)
    return document


SCOPES = {"tenant": Scope.TENANT, "slice": Scope.SLICE, "key": Scope.KEY}
