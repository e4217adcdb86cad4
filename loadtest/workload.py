"""What the load is about: tenants, subjects and metrics, taken from a plan file.

``check`` admits ``api.sms.send`` for the CPaaS tenant (``cpaas-demo``), one message per call;
``rls`` asks the same of Envoy's rate limit service, one descriptor [tenant, api_key, route] per
call that the plan file's ``envoy`` section maps onto the same subject and metric; ``stream``
reports ``slice.bytes`` for the MVNO tenant (``mvno-demo``) on its slices. With
``--tenants many`` the usages are spread over many keys (and every slice of the tenant); with
``--tenants hot`` they all go to one key (and the first slice), i.e. one set of buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as rl
from envoy.service.ratelimit.v3 import rls_pb2

from chargepath.core.plans import PolicyError
from chargepath.core.policy import Policy
from chargepath.policy_files import load_policy_file
from chargepath_protos.v1 import metering_pb2 as pb

TenantSpread = Literal["many", "hot"]

HOT_KEY = "key-hot"

#: The entries of an ``rls`` descriptor, in order: Envoy's rate limit filter configured with a
#: request header for each (examples/envoy/envoy.yaml).
RLS_ENTRY_KEYS = ("tenant", "api_key", "route")


class WorkloadError(ValueError):
    """The plan file does not have what the chosen workload needs."""


@dataclass(frozen=True, slots=True)
class Workload:
    """Subjects, metrics and amounts of the two kinds of usage; picklable (sent to workers)."""

    plans: str
    spread: TenantSpread
    keys: int
    check_tenant: str
    check_metric: str
    check_amount: int
    stream_tenant: str
    stream_metric: str
    stream_amount: int
    slices: tuple[str, ...]
    #: the VerdictView every request asks for (chargepath.v1 enum number)
    view: pb.VerdictView = pb.VERDICT_VIEW_FULL
    #: the Envoy domain of ``rls`` requests, and the value of their ``route`` entry
    rls_domain: str = "cpaas-edge"
    rls_route: str = "sms-send"

    def check_subject(self, n: int) -> tuple[str, str, str]:
        """(tenant, slice, key) of the ``n``-th admit."""
        if self.spread == "hot":
            return (self.check_tenant, "", HOT_KEY)
        return (self.check_tenant, "", f"key-{n % self.keys:05d}")

    def rls_entries(self, n: int) -> tuple[tuple[str, str], ...]:
        """The descriptor entries of the ``n``-th ``rls`` call: the subject of the ``n``-th
        admit, so both scenarios touch the same buckets."""
        tenant, _, key = self.check_subject(n)
        return tuple(zip(RLS_ENTRY_KEYS, (tenant, key, self.rls_route), strict=True))

    def stream_subject(self, n: int) -> tuple[str, str, str]:
        """(tenant, slice, key) of the ``n``-th report; the key is a subscriber of the slice."""
        first = self.slices[0] if self.slices else ""
        if self.spread == "hot":
            return (self.stream_tenant, first, "")
        slice_ = self.slices[n % len(self.slices)] if self.slices else ""
        return (self.stream_tenant, slice_, f"sub-{n % self.keys:05d}")


def load_workload(
    plans: Path,
    *,
    spread: TenantSpread,
    keys: int = 1000,
    check_tenant: str = "cpaas-demo",
    check_metric: str = "api.sms.send",
    check_amount: int = 1,
    stream_tenant: str = "mvno-demo",
    stream_metric: str = "slice.bytes",
    stream_amount: int = 1500,
    view: Literal["full", "basic"] = "full",
    rls_domain: str = "cpaas-edge",
    rls_route: str = "sms-send",
) -> Workload:
    """Read the tenants and slices of ``plans`` and check that the chosen ones exist."""
    try:
        doc: Any = yaml.safe_load(plans.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise WorkloadError(f"{plans}: {exc}") from exc
    tenants = {t.get("name"): t for t in (doc or {}).get("tenants", []) if isinstance(t, dict)}
    metrics = {m.get("name") for m in (doc or {}).get("metrics", []) if isinstance(m, dict)}
    for tenant, metric in ((check_tenant, check_metric), (stream_tenant, stream_metric)):
        if tenant not in tenants:
            known = ", ".join(sorted(map(str, tenants)))
            raise WorkloadError(f"{plans}: no tenant {tenant!r} (tenants: {known})")
        if metric not in metrics:
            raise WorkloadError(f"{plans}: no metric {metric!r} in the catalog")
    slices = tuple(str(s["name"]) for s in tenants[stream_tenant].get("slices", []) or [])
    if keys < 1:
        raise WorkloadError("keys must be at least 1")
    return Workload(
        plans=str(plans),
        spread=spread,
        keys=keys,
        check_tenant=check_tenant,
        check_metric=check_metric,
        check_amount=check_amount,
        stream_tenant=stream_tenant,
        stream_metric=stream_metric,
        stream_amount=stream_amount,
        slices=slices,
        view=pb.VERDICT_VIEW_BASIC if view == "basic" else pb.VERDICT_VIEW_FULL,
        rls_domain=rls_domain,
        rls_route=rls_route,
    )


def require_rls_route(workload: Workload) -> None:
    """Raise :class:`WorkloadError` unless the plan file maps the ``rls`` descriptor onto the
    admit of ``check``: the same subject and metric, so the work per decision is comparable.
    (An unmapped descriptor would be answered OK and counted nowhere: a fast, empty run.)"""
    try:
        policy = Policy(load_policy_file(workload.plans), 1)
    except PolicyError as exc:
        raise WorkloadError(f"{workload.plans}: {exc}") from exc
    entries = workload.rls_entries(0)
    route = policy.route_descriptor(workload.rls_domain, entries)
    tenant, slice_, key = workload.check_subject(0)
    wanted = (tenant, slice_, key, workload.check_metric)
    got = (route.subject.tenant, route.subject.slice, route.subject.key, route.metric)
    if not route.matched or got != wanted:
        shown = ", ".join(f"{k}={v}" for k, v in entries)
        raise WorkloadError(
            f"{workload.plans}: the envoy mapping of domain {workload.rls_domain!r} does not "
            f"map the descriptor [{shown}] to tenant {tenant!r}, key {key!r}, metric "
            f"{workload.check_metric!r}"
            + (f" (it maps it to {got})" if route.matched else " (no descriptor matches it)")
        )


class CheckRequests:
    """Builds the Check requests of one worker: unique request ids, subjects per the spread."""

    def __init__(self, workload: Workload, id_prefix: str) -> None:
        self._workload = workload
        self._prefix = id_prefix
        self._n = 0
        self._subjects: dict[tuple[str, str, str], pb.Subject] = {}

    def next(self) -> pb.CheckRequest:
        n = self._n
        self._n = n + 1
        w = self._workload
        return pb.CheckRequest(
            usage=pb.Usage(
                request_id=f"{self._prefix}-{n}",
                subject=_subject(self._subjects, w.check_subject(n)),
                metric=w.check_metric,
                amount=w.check_amount,
                mode=pb.MODE_ADMIT,
            ),
            view=w.view,
        )


class RlsRequests:
    """Builds the ``ShouldRateLimit`` requests of one worker, shaped like Envoy's: one
    descriptor per call, ``hits_addend`` the admit's amount (left 0, i.e. 1, when it is 1, as
    Envoy leaves it). Envoy names no request id: the gateway makes one per descriptor."""

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        self._n = 0
        self._descriptors: dict[tuple[tuple[str, str], ...], rl.RateLimitDescriptor] = {}

    def next(self) -> rls_pb2.RateLimitRequest:
        n = self._n
        self._n = n + 1
        w = self._workload
        entries = w.rls_entries(n)
        descriptor = self._descriptors.get(entries)
        if descriptor is None:
            descriptor = self._descriptors[entries] = rl.RateLimitDescriptor(
                entries=[rl.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
            )
        return rls_pb2.RateLimitRequest(
            domain=w.rls_domain,
            descriptors=[descriptor],
            hits_addend=w.check_amount if w.check_amount != 1 else 0,
        )


class StreamBatches:
    """Builds the messages of one stream session: every usage carries the session id and the
    next sequence number (and a request id made of both)."""

    def __init__(self, workload: Workload, session_id: str, batch: int) -> None:
        self._workload = workload
        self.session_id = session_id
        self._batch = batch
        self._sequence = 0
        self._subjects: dict[tuple[str, str, str], pb.Subject] = {}

    def next(self) -> pb.StreamUsageRequest:
        w = self._workload
        req = pb.StreamUsageRequest(view=w.view)
        for _ in range(self._batch):
            self._sequence += 1
            seq = self._sequence
            u = req.usages.add()
            u.request_id = f"{self.session_id}-{seq}"
            u.subject.CopyFrom(_subject(self._subjects, w.stream_subject(seq)))
            u.metric = w.stream_metric
            u.amount = w.stream_amount
            u.mode = pb.MODE_REPORT
            u.session_id = self.session_id
            u.sequence = seq
        return req


def _subject(
    cache: dict[tuple[str, str, str], pb.Subject], key: tuple[str, str, str]
) -> pb.Subject:
    subject = cache.get(key)
    if subject is None:
        subject = cache[key] = pb.Subject(tenant=key[0], slice=key[1], key=key[2])
    return subject
