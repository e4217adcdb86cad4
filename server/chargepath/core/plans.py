"""Plans: the policy document (metrics, plans, tenants) and its validation.

The same document is what ``chargepath serve --plans FILE`` publishes and what the admin API
accepts. Validation errors are :class:`PolicyIssue` structures naming the field by its path
and, for text, its line. This module parses text; reading files is
:mod:`chargepath.policy_files`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
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
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chargepath.core.model import Scope
from chargepath.core.validation import METRIC_RE, TENANT_RE

# Integers in Lua are doubles: every scaled amount must stay exact.
MAX_EXACT = 2**53

NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"
SUBJECT_PART = r"^[A-Za-z0-9._~@+=/-]{1,128}$"
PATTERN_RE = re.compile(r"[a-z0-9_*]+(\.[a-z0-9_*]+)*")

RATE_PERIOD_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    """A metric of the catalog: what is counted, in which whole unit."""

    name: str
    unit: str = "unit"
    description: str = ""

    @model_validator(mode="after")
    def _check_name(self) -> MetricSpec:
        if not METRIC_RE.fullmatch(self.name) or len(self.name) > 128:
            raise ValueError("name: must be dot-separated [a-z0-9_] words, e.g. api.sms.send")
        return self


class RateSpec(_Strict):
    """A token bucket: holds ``capacity`` units, refills ``refill`` units per ``per``."""

    capacity: Annotated[int, Field(gt=0)]
    refill: Annotated[int, Field(gt=0)]
    per: Literal["second", "minute", "hour"] = "second"


class QuotaSpec(_Strict):
    """A budget of ``amount`` units per UTC hour, day or calendar month; no refill."""

    amount: Annotated[int, Field(gt=0, lt=MAX_EXACT)]
    per: Literal["hour", "day", "month"]


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
    * ``validity``: how long a grant lasts unreported, e.g. ``30s``, ``500ms``, ``5m``; at
      expiry whatever was granted and not reported goes back to the limit.
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
        return str(validity)

    @property
    def validity_ms(self) -> int:
        ms = parse_validity_ms(self.validity)
        assert ms is not None  # checked when the spec was made
        return ms


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

    @model_validator(mode="after")
    def _check(self) -> LimitSpec:
        if (self.rate is None) == (self.quota is None):
            raise ValueError("a limit has exactly one of 'rate' or 'quota'")
        if not PATTERN_RE.fullmatch(self.metric):
            raise ValueError(
                "metric: must be a metric name or a pattern with '*', e.g. api.sms.* "
                f"(got {self.metric!r})"
            )
        if self.rate is not None:
            compiled = compile_rate(self.rate)
            if compiled.capacity_scaled >= MAX_EXACT:
                raise ValueError(
                    f"rate: capacity {self.rate.capacity} with refill {self.rate.refill}/"
                    f"{self.rate.per} is too large to count exactly; use a coarser unit"
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
        _no_duplicates((lim.name for lim in self.limits), "limit")
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

    @model_validator(mode="after")
    def _check(self) -> TenantSpec:
        if not TENANT_RE.fullmatch(self.name):
            raise ValueError("name: must be 1 to 64 characters of [A-Za-z0-9._-]")
        _no_duplicates((s.name for s in self.slices), "slice")
        _no_duplicates((f"{k.slice}/{k.name}" for k in self.keys), "key")
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
        _no_duplicates(
            (f"{d.key}={d.value if d.value is not None else '*'}" for d in self.descriptors),
            "descriptor (key, value)",
        )
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

    @model_validator(mode="after")
    def _check(self) -> EnvoyDomainSpec:
        if self.tenant is not None and not TENANT_RE.fullmatch(self.tenant):
            raise ValueError("tenant: must be 1 to 64 characters of [A-Za-z0-9._-]")
        _no_duplicates(
            (f"{d.key}={d.value if d.value is not None else '*'}" for d in self.descriptors),
            "descriptor (key, value)",
        )
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
        _no_duplicates(self.events, "event")
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
        _no_duplicates((m.name for m in self.metrics), "metric")
        _no_duplicates((p.name for p in self.plans), "plan")
        _no_duplicates((t.name for t in self.tenants), "tenant")
        metrics = [m.name for m in self.metrics]
        plans = {p.name: p for p in self.plans}
        for p in self.plans:
            for lim in p.limits:
                if not any(fnmatchcase(m, lim.metric) for m in metrics):
                    raise ValueError(
                        f"plan {p.name!r}, limit {lim.name!r}: metric {lim.metric!r} matches "
                        "no metric of the catalog"
                    )
        for t in self.tenants:
            if t.plan is not None and t.plan not in plans:
                raise ValueError(f"tenant {t.name!r}: unknown plan {t.plan!r}")
            tenant_limits = {lim.name for lim in plans[t.plan].limits} if t.plan else set()
            for s in t.slices:
                if s.plan is None:
                    continue
                if s.plan not in plans:
                    raise ValueError(
                        f"tenant {t.name!r}, slice {s.name!r}: unknown plan {s.plan!r}"
                    )
                for lim in plans[s.plan].limits:
                    if lim.scope == "tenant":
                        raise ValueError(
                            f"tenant {t.name!r}, slice {s.name!r}: plan {s.plan!r} has limit "
                            f"{lim.name!r} with scope 'tenant'; a slice's plan counts at scope "
                            "'slice' or 'key'"
                        )
                    if lim.name in tenant_limits:
                        raise ValueError(
                            f"tenant {t.name!r}, slice {s.name!r}: limit {lim.name!r} is in both "
                            "the tenant's and the slice's plan; limit names must differ"
                        )
        _no_duplicates((d.domain for d in self.envoy), "envoy domain")
        _no_duplicates((w.name for w in self.webhooks), "webhook")
        issues = _envoy_issues(self.envoy, frozenset(metrics))
        tenants = {t.name for t in self.tenants}
        issues += [
            (("webhooks", w, "tenants", i), f"unknown tenant {name!r}: not in 'tenants'")
            for w, hook in enumerate(self.webhooks)
            for i, name in enumerate(hook.tenants)
            if name not in tenants
        ]
        if issues:
            raise ValidationError.from_exception_data(
                "PolicyDocument",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("policy_reference", message), loc=loc, input=None
                    )
                    for loc, message in issues
                ],
            )
        return self

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


def _envoy_issues(
    domains: list[EnvoyDomainSpec], metrics: frozenset[str]
) -> list[tuple[tuple[int | str, ...], str]]:
    """The rules of the Envoy mapping that need the whole document, each with the path of the
    field it concerns (so a plan file's error names its line): a metric in the catalog, a
    tenant on the path of every node with a metric, a subject part bound once per path."""
    out: list[tuple[tuple[int | str, ...], str]] = []

    def walk(
        nodes: list[DescriptorSpec], loc: tuple[int | str, ...], bound: frozenset[str]
    ) -> None:
        for i, node in enumerate(nodes):
            here = (*loc, "descriptors", i)
            now = bound
            if node.subject is not None:
                if node.subject in bound:
                    out.append(((*here, "subject"), f"the {node.subject} is already given above"))
                now = bound | {node.subject}
            if node.metric is not None:
                if node.metric not in metrics:
                    out.append(
                        (
                            (*here, "metric"),
                            f"unknown metric {node.metric!r}: not in the catalog",
                        )
                    )
                if "tenant" not in now:
                    out.append(
                        (
                            here,
                            "no tenant for this descriptor: set the domain's 'tenant', or "
                            "'subject: tenant' on an entry above",
                        )
                    )
            walk(node.descriptors, here, now)

    for d, domain in enumerate(domains):
        walk(domain.descriptors, ("envoy", d), frozenset({"tenant"} if domain.tenant else ()))
    return out


def _no_duplicates(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate {what} name {n!r}")
        seen.add(n)


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
    not a mapping). ``line`` is the 1-based line in the source, None when unknown (a
    document that was not parsed from text)."""

    source: str
    path: str | None
    line: int | None
    message: str

    @property
    def detail(self) -> str:
        """The issue without its source and line: ``path: message``."""
        if self.path is None:
            return self.message
        return f"{self.path or '(document)'}: {self.message}"

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        return where + self.detail


class PolicyError(ValueError):
    """A policy document that does not validate: every :class:`PolicyIssue` found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("invalid policy:\n  " + "\n  ".join(self.errors))

    @property
    def errors(self) -> list[str]:
        """The issues as human-readable lines (``source:line: path: message``)."""
        return [str(issue) for issue in self.issues]


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    node = root
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            nxt = node.value[part] if part < len(node.value) else None
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def parse_policy(
    data: Any, *, source: str = "policy", yaml_root: yaml.Node | None = None
) -> PolicyDocument:
    """Validate a decoded document; raise :class:`PolicyError` naming every bad field."""
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_issues(exc, source, yaml_root)) from None


def parse_plan(data: Any, *, source: str = "plan") -> PlanSpec:
    """Validate one decoded plan (paths relative to the plan); raise :class:`PolicyError`."""
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_issues(exc, source, None)) from None


def _issues(exc: ValidationError, source: str, yaml_root: yaml.Node | None) -> list[PolicyIssue]:
    issues = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        issues.append(
            PolicyIssue(
                source,
                ".".join(str(p) for p in loc),
                _line_of(yaml_root, loc) if yaml_root is not None else None,
                err["msg"].removeprefix("Value error, "),
            )
        )
    return issues


def load_policy_text(text: str, *, source: str = "policy") -> PolicyDocument:
    """Parse YAML (or JSON, a subset of YAML) text into a validated document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([PolicyIssue(source, None, None, f"not valid YAML: {exc}")]) from None
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
    return parse_policy(data, source=source, yaml_root=root)


SCOPES = {"tenant": Scope.TENANT, "slice": Scope.SLICE, "key": Scope.KEY}
