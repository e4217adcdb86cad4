"""The ``chargepath.v1.AdminService`` servicer: policy changes, grants, state and explain.

Every change is a compare-and-set of the whole policy document (retried on conflict), then a
publish that stamps every tenant, so when a call returns no gateway decides with an older
version. Bad input is INVALID_ARGUMENT naming the field and changes nothing.

Each change is audited (:mod:`chargepath.transport.audit`): a policy change hands its audit
event to the store, which appends it in the same atomic step as the new version; the
interceptor appends the event of every other call (grants, refusals, errors) when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chargepath.core import policy_edit
from chargepath.core.model import (
    FieldViolation,
    LimitKind,
    Subject,
    ThresholdEvent,
)
from chargepath.core.plans import PolicyDocument, PolicyError, load_policy_text
from chargepath.core.policy import Limit, Policy
from chargepath.core.validation import MAX_AMOUNT, check_subject_part, check_tenant
from chargepath.engine import Engine, tenant_tag
from chargepath.store.base import (
    AuditLog,
    LeaseStore,
    PolicyConflictError,
    PolicyStore,
    StateStore,
    StoreUnavailableError,
)
from chargepath.transport import mapping
from chargepath.transport.audit import pending_audit
from chargepath.transport.auth import caller_may_act_for
from chargepath.transport.errors import abort, abort_invalid
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb

log = logging.getLogger("chargepath.admin")

Context = Any  # grpc.aio.ServicerContext: grpcio ships no type information
MAX_DOCUMENT = 1 << 20
CAS_RETRIES = 10
MAX_AUDIT_PAGE = 1000


async def abort_prune_needed(context: Context, removals: list[policy_edit.Removal]) -> None:
    """FAILED_PRECONDITION listing what a document without ``prune`` would remove, with a
    google.rpc.PreconditionFailure detail: one violation per plan or tenant (type "PRUNE",
    subject "plans/<name>" or "tenants/<name>")."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="PRUNE",
                    subject=f"{r.kind}s/{r.name}",
                    description=f"{r} is live and not in the document",
                )
                for r in removals
            ]
        )
    )
    names = ", ".join(str(r) for r in removals[:20])
    more = f" and {len(removals) - 20} more" if len(removals) > 20 else ""
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message=f"the document would remove {names}{more}; set prune to remove them",
        details=[detail],
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


def _subject(m: pb.Subject) -> tuple[Subject, list[FieldViolation]]:
    subject = mapping.subject_from_pb(m)
    bad = [
        v
        for v in (
            check_tenant(subject.tenant, "subject.tenant"),
            check_subject_part(subject.slice, "subject.slice"),
            check_subject_part(subject.key, "subject.key"),
        )
        if v is not None
    ]
    return subject, bad


def tenant_limits(policy: Policy, subject: Subject) -> list[tuple[str, Limit]]:
    """(plan name, limit) for every limit of the tenant's plans at the subject's scopes."""
    ent = policy.entitlements.get(subject.tenant)
    if ent is None:
        return []
    out = [(ent.plan or "", lim) for _, lim in ent.limits if lim.applies_to(subject)]
    if subject.slice and subject.slice in ent.slice_limits:
        plan = ent.slice_plans.get(subject.slice) or ""
        out += [
            (plan, lim) for _, lim in ent.slice_limits[subject.slice] if lim.applies_to(subject)
        ]
    return out


class AdminServicer(apb_grpc.AdminServiceServicer):
    """Admin calls on two store contracts: ``policies`` (the versioned document every change
    is made to) and ``state`` (grants, live counters, the recent-decisions trail)."""

    def __init__(
        self,
        engine: Engine,
        policies: PolicyStore,
        state: StateStore,
        audit: AuditLog | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        self.engine = engine
        self.policies = policies
        self.state = state
        self.audit = audit
        #: open quota leases (GetState) and lease decisions (ExplainDecision); None: none
        self.leases = leases

    # -- helpers ------------------------------------------------------------------------

    async def _live(self) -> tuple[int, PolicyDocument]:
        published = await self.policies.load_policy()
        if published is None:
            return 0, PolicyDocument()
        return published.version, published.document

    async def _edit(
        self, context: Context, change: Callable[[PolicyDocument], PolicyDocument]
    ) -> int:
        """Apply ``change`` to the live document with compare-and-set; the new version."""
        for _ in range(CAS_RETRIES):
            version, doc = await self._guard(context, self._live())
            try:
                new = change(doc)
            except policy_edit.EditError as exc:
                if exc.not_found:
                    await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
                await abort_invalid(context, [FieldViolation(exc.field, exc.reason)])
            audit = pending_audit()
            if audit is not None:
                audit.add_tenants(policy_edit.affected_tenants(doc if version else None, new))
            try:
                published = await self._guard(
                    context,
                    self.policies.publish_policy(
                        new,
                        expected_version=version,
                        audit=audit.event() if audit is not None else None,
                    ),
                )
            except PolicyConflictError:
                continue
            if audit is not None:
                audit.policy_version_before = version
                audit.policy_version_after = published.version
                audit.written = True
            await self.engine.reload_policy(published.version)
            log.info("policy version %d published by the admin API", published.version)
            return int(published.version)
        await abort(context, grpc.StatusCode.ABORTED, "the policy kept changing; try again")

    async def _own_tenant(self, context: Context, tenant: str, field: str) -> None:
        """PERMISSION_DENIED unless the caller may act for ``tenant`` (the request's ``field``).
        Checked before anything is looked up, so a refusal says nothing about what exists."""
        if not caller_may_act_for(tenant):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{field}: this credential may not act for tenant {tenant[:64]!r}",
            )

    async def _guard(self, context: Context, awaitable: Any) -> Any:
        try:
            return await awaitable
        except StoreUnavailableError as exc:
            log.warning("admin call failed: store unavailable (%s)", exc)
            await abort(context, grpc.StatusCode.UNAVAILABLE, "store unavailable; nothing changed")

    # -- policy -------------------------------------------------------------------------

    async def ApplyPolicy(
        self, request: apb.ApplyPolicyRequest, context: Context
    ) -> apb.ApplyPolicyResponse:
        if len(request.document) > MAX_DOCUMENT:
            await abort_invalid(context, [FieldViolation("document", "at most 1 MiB")])
        empty = policy_edit.check_not_empty(request.document, None)
        if empty is not None:
            await abort_invalid(context, [empty])
        try:
            doc = load_policy_text(request.document, source="document")
        except PolicyError as exc:
            await abort_invalid(context, mapping.policy_violations(exc, "document"))
        empty = policy_edit.check_not_empty(request.document, doc)
        if empty is not None:
            await abort_invalid(context, [empty])
        version, live = await self._guard(context, self._live())
        audit = pending_audit()
        if audit is not None:
            audit.policy_version_before = audit.policy_version_after = version
        if request.HasField("expected_version") and request.expected_version != version:
            await abort(
                context,
                grpc.StatusCode.ABORTED,
                f"expected_version: the live policy is version {version}, not "
                f"{request.expected_version}; review the diff again",
            )
        previous = live if version else None
        if audit is not None:  # also when refused below: the tenants it would have affected
            audit.add_tenants(policy_edit.affected_tenants(previous, doc))
        removals = policy_edit.removals(previous, doc)
        if removals and not request.prune:
            await abort_prune_needed(context, removals)
        diff = policy_edit.diff(previous, doc)
        response = apb.ApplyPolicyResponse(
            policy_version=version,
            changed=False,
            diff=diff,
            removed_plans=[r.name for r in removals if r.kind == "plan"],
            removed_tenants=[r.name for r in removals if r.kind == "tenant"],
        )
        if request.dry_run or not diff:
            return response
        try:
            published = await self._guard(
                context,
                self.policies.publish_policy(
                    doc,
                    expected_version=version,
                    audit=audit.event() if audit is not None else None,
                ),
            )
        except PolicyConflictError:
            await abort(
                context,
                grpc.StatusCode.ABORTED,
                "the policy changed while applying; review the diff again",
            )
        if audit is not None:
            audit.policy_version_after = published.version
            audit.written = True
        await self.engine.reload_policy(published.version)
        response.policy_version = published.version
        response.changed = True
        return response

    async def GetPolicy(
        self, request: apb.GetPolicyRequest, context: Context
    ) -> apb.GetPolicyResponse:
        version, doc = await self._guard(context, self._live())
        return apb.GetPolicyResponse(policy_version=version, document=doc.canonical_json())

    async def PutPlan(self, request: apb.PutPlanRequest, context: Context) -> apb.PutPlanResponse:
        plan = mapping.plan_from_pb(request.plan)
        v = await self._edit(context, lambda doc: policy_edit.put_plan(doc, plan))
        return apb.PutPlanResponse(policy_version=v)

    async def GetPlan(self, request: apb.GetPlanRequest, context: Context) -> apb.GetPlanResponse:
        version, doc = await self._guard(context, self._live())
        plan = next((p for p in doc.plans if p.name == request.name), None)
        if plan is None:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"name: unknown plan {request.name[:64]!r}"
            )
        return apb.GetPlanResponse(plan=mapping.plan_to_pb(plan), policy_version=version)

    async def ListPlans(
        self, request: apb.ListPlansRequest, context: Context
    ) -> apb.ListPlansResponse:
        version, doc = await self._guard(context, self._live())
        plans = [mapping.plan_to_pb(p) for p in sorted(doc.plans, key=lambda p: p.name)]
        return apb.ListPlansResponse(plans=plans, policy_version=version)

    async def DeletePlan(
        self, request: apb.DeletePlanRequest, context: Context
    ) -> apb.DeletePlanResponse:
        v = await self._edit(context, lambda doc: policy_edit.delete_plan(doc, request.name))
        return apb.DeletePlanResponse(policy_version=v)

    async def AssignPlan(
        self, request: apb.AssignPlanRequest, context: Context
    ) -> apb.AssignPlanResponse:
        v = await self._edit(
            context,
            lambda doc: policy_edit.assign(doc, request.tenant, request.slice, request.plan),
        )
        return apb.AssignPlanResponse(policy_version=v)

    async def Suspend(self, request: apb.SuspendRequest, context: Context) -> apb.SuspendResponse:
        subject, bad = _subject(request.subject)
        if len(request.reason) > 256:
            bad.append(FieldViolation("reason", "at most 256 characters"))
        if bad:
            await abort_invalid(context, bad)
        reason = request.reason or "suspended"
        v = await self._edit(context, lambda doc: policy_edit.set_suspension(doc, subject, reason))
        return apb.SuspendResponse(policy_version=v)

    async def Resume(self, request: apb.ResumeRequest, context: Context) -> apb.ResumeResponse:
        subject, bad = _subject(request.subject)
        if bad:
            await abort_invalid(context, bad)
        v = await self._edit(context, lambda doc: policy_edit.set_suspension(doc, subject, None))
        return apb.ResumeResponse(policy_version=v)

    async def SetFailurePolicy(
        self, request: apb.SetFailurePolicyRequest, context: Context
    ) -> apb.SetFailurePolicyResponse:
        mode = mapping.FAILURE_MODES.get(request.mode, "")
        v = await self._edit(
            context, lambda doc: policy_edit.set_failure_mode(doc, request.tenant, mode)
        )
        return apb.SetFailurePolicyResponse(policy_version=v)

    # -- grants -------------------------------------------------------------------------

    async def Grant(self, request: apb.GrantRequest, context: Context) -> apb.GrantResponse:
        subject, bad = _subject(request.subject)
        if not 1 <= request.amount <= MAX_AMOUNT:
            bad.append(
                FieldViolation(
                    "amount", f"must be between 1 and {MAX_AMOUNT}, got {request.amount}"
                )
            )
        if len(request.note) > 256:
            bad.append(FieldViolation("note", "at most 256 characters"))
        if bad:
            await abort_invalid(context, bad)
        policy = await self.engine.reload_policy()
        if subject.tenant not in policy.entitlements:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"subject.tenant: unknown tenant {subject.tenant!r}",
            )
        limit = next(
            (lim for _, lim in tenant_limits(policy, subject) if lim.name == request.limit), None
        )
        if limit is None or limit.kind is not LimitKind.QUOTA:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"limit: no quota limit {request.limit[:64]!r} applies to this subject",
            )
        expires = 0
        if request.HasField("expires_at"):
            expires = mapping.timestamp_ms(request.expires_at)
        result = await self._guard(
            context, self.state.grant(subject, limit, request.amount, expires, request.note)
        )
        if result is None:
            await abort_invalid(context, [FieldViolation("expires_at", "is in the past")])
        grant_id, capacity, remaining = result
        log.info("grant %s: %d units of %s for %s", grant_id, request.amount, limit.name, subject)
        return apb.GrantResponse(grant_id=grant_id, capacity=capacity, remaining=remaining)

    # -- visibility ---------------------------------------------------------------------

    async def GetState(
        self, request: apb.GetStateRequest, context: Context
    ) -> apb.GetStateResponse:
        await self._own_tenant(context, request.subject.tenant, "subject.tenant")
        subject, bad = _subject(request.subject)
        if not 0 <= request.recent <= 100:
            bad.append(FieldViolation("recent", "must be between 0 and 100"))
        if bad:
            await abort_invalid(context, bad)
        policy = await self.engine.reload_policy()
        ent = policy.entitlements.get(subject.tenant)
        if ent is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"subject.tenant: unknown tenant {subject.tenant!r}",
            )
        pairs = tenant_limits(policy, subject)
        now, readings, grants = await self._guard(
            context, self.state.read_limits(subject, tuple(lim for _, lim in pairs))
        )
        recent = await self._guard(
            context, self.state.recent(subject.tenant, subject=subject, count=request.recent or 10)
        )
        leases = []
        if self.leases is not None:
            _, leases = await self._guard(context, self.leases.leases(subject))
        metrics = {lim.name: pattern for pattern, lim in ent.limits}
        for s_limits in ent.slice_limits.values():
            metrics.update({lim.name: pattern for pattern, lim in s_limits})
        # the suspensions that apply: the subject's own and each broader scope's, once each
        suspensions: dict[tuple[str, str, str], str] = {}
        for probe in (
            Subject(subject.tenant),
            Subject(subject.tenant, subject.slice),
            Subject(subject.tenant, subject.slice, subject.key),
            Subject(subject.tenant, "", subject.key),
        ):
            key = (probe.tenant, probe.slice, probe.key)
            if key in policy.suspensions:
                suspensions.setdefault(key, policy.suspensions[key])
        return apb.GetStateResponse(
            policy_version=policy.version,
            plan=ent.plan or "",
            slice_plan=ent.slice_plans.get(subject.slice) or "",
            failure_mode=mapping.FAILURE_MODE_VALUES[ent.failure_mode],
            read_at=mapping.timestamp(now),
            recent=[mapping.record_to_pb(r) for r in recent],
            limits=[
                mapping.limit_state_to_pb(plan, metrics.get(lim.name, ""), lim, r)
                for (plan, lim), r in zip(pairs, readings, strict=True)
            ],
            grants=[mapping.grant_to_pb(g) for g in grants],
            suspensions=[
                mapping.suspension_to_pb(Subject(*key), reason)
                for key, reason in suspensions.items()
            ],
            leases=[mapping.lease_state_to_pb(v) for v in leases],
        )

    async def ExplainDecision(
        self, request: apb.ExplainDecisionRequest, context: Context
    ) -> apb.ExplainDecisionResponse:
        """A decision by its id, for at least the explain window. Without a tenant, the tenants
        whose tag (:func:`~chargepath.engine.tenant_tag`) the id carries are tried, among those
        the caller may act for: another tenant's id is NOT_FOUND, as an id that never was."""
        if request.tenant:
            await self._own_tenant(context, request.tenant, "tenant")
        bad = check_tenant(request.tenant, "tenant") if request.tenant else None
        if bad is None and not re.fullmatch(r"[0-9a-f]{32}", request.decision_id):
            bad = FieldViolation("decision_id", "must be 32 lowercase hex characters")
        if bad is not None:
            await abort_invalid(context, [bad])
        if request.tenant:
            tenants = [request.tenant]
        else:
            policy = await self._guard(context, self.engine.reload_policy())
            tag = request.decision_id[12:16]
            tenants = [
                t for t in policy.entitlements if tenant_tag(t) == tag and caller_may_act_for(t)
            ]
        for tenant in tenants:
            record = await self._guard(
                context, self.state.find_decision(tenant, request.decision_id)
            )
            if record is not None:
                return apb.ExplainDecisionResponse(decision=mapping.record_to_pb(record))
            if self.leases is not None:
                leased = await self._guard(
                    context, self.leases.find_decision(tenant, request.decision_id)
                )
                if leased is not None:
                    return apb.ExplainDecisionResponse(lease=mapping.lease_record_to_pb(leased))
        await abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            f"decision_id: no decision {request.decision_id} in the explain window (the last "
            f"{self.state.explain_window_ms // 1000} s) or among the "
            f"{self.state.recent_length} most recent decisions"
            + (" of the tenant" if request.tenant else "")
            + " (a decision answered by a gateway's over-limit cache or from a lease it holds "
            "never is: its verdict's message says so)",
        )

    async def WatchDecisions(
        self, request: apb.WatchDecisionsRequest, context: Context
    ) -> AsyncIterator[apb.WatchDecisionsResponse]:
        await self._own_tenant(context, request.tenant, "tenant")
        bad = check_tenant(request.tenant, "tenant")
        if bad is not None:
            await abort_invalid(context, [bad])
        # a tenant the policy does not have would never have a decision: say so at once
        policy = await self._guard(context, self.engine.reload_policy())
        if request.tenant not in policy.entitlements:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"tenant: unknown tenant {request.tenant!r}"
            )
        decisions = {int(d) for d in request.decisions}
        reasons = {int(r) for r in request.reasons}
        try:
            async for event in self.state.watch(request.tenant):
                if event is None:
                    continue
                if isinstance(event, ThresholdEvent):
                    yield apb.WatchDecisionsResponse(threshold=mapping.threshold_to_pb(event))
                    continue
                rec = mapping.record_to_pb(event)
                if decisions and rec.decision not in decisions:
                    continue
                if reasons and rec.reason not in reasons:
                    continue
                yield apb.WatchDecisionsResponse(decision=rec)
        except StoreUnavailableError:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "store unavailable; watch again")
        except asyncio.CancelledError:
            raise

    # -- audit --------------------------------------------------------------------------

    async def ListAuditEvents(
        self, request: apb.ListAuditEventsRequest, context: Context
    ) -> apb.ListAuditEventsResponse:
        bad: list[FieldViolation] = []
        if request.tenant and (v := check_tenant(request.tenant, "tenant")) is not None:
            bad.append(v)
        if not 0 <= request.limit <= MAX_AUDIT_PAGE:
            bad.append(FieldViolation("limit", f"must be between 0 and {MAX_AUDIT_PAGE}"))
        if request.after and not re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", request.after):
            bad.append(FieldViolation("after", "must be a cursor from a previous response"))
        since_ms = 0
        if request.HasField("since"):
            if not 0 <= request.since.nanos < 1_000_000_000 or request.since.seconds < 0:
                bad.append(FieldViolation("since", "is not a valid timestamp"))
            else:
                since_ms = mapping.timestamp_ms(request.since)
        if bad:
            await abort_invalid(context, bad)
        if self.audit is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "this gateway keeps no audit trail")
        events, cursor = await self._guard(
            context,
            self.audit.read(
                after=request.after,
                since_ms=since_ms,
                tenant=request.tenant,
                limit=request.limit or 100,
            ),
        )
        return apb.ListAuditEventsResponse(
            events=[mapping.audit_event_to_pb(e) for e in events], next_cursor=cursor
        )
