"""What the load is about: tenants, subjects and metrics, taken from a plan file.

``check`` admits ``api.sms.send`` for the CPaaS tenant (``cpaas-demo``), one message per call;
``stream`` reports ``slice.bytes`` for the MVNO tenant (``mvno-demo``) on its slices. With
``--tenants many`` the usages are spread over many keys (and every slice of the tenant); with
``--tenants hot`` they all go to one key (and the first slice), i.e. one set of buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from chargepath_protos.v1 import metering_pb2 as pb

TenantSpread = Literal["many", "hot"]

HOT_KEY = "key-hot"


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

    def check_subject(self, n: int) -> tuple[str, str, str]:
        """(tenant, slice, key) of the ``n``-th admit."""
        if self.spread == "hot":
            return (self.check_tenant, "", HOT_KEY)
        return (self.check_tenant, "", f"key-{n % self.keys:05d}")

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
