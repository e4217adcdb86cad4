"""Admin changes as pure functions: a policy document in, a new validated document out.

Every function raises :class:`EditError` (a bad field, or something not found) and never
returns a document that does not validate, so an admin call that fails changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from chargepath.core.model import FieldViolation, Subject
from chargepath.core.plans import (
    KeySpec,
    PolicyDocument,
    PolicyError,
    SliceSpec,
    TenantSpec,
    parse_plan,
    parse_policy,
)
from chargepath.core.validation import check_subject_part, check_tenant


class EditError(ValueError):
    """An admin change that cannot be made. ``not_found`` distinguishes NOT_FOUND from
    INVALID_ARGUMENT; ``field`` names the request field at fault."""

    def __init__(self, field: str, reason: str, *, not_found: bool = False) -> None:
        self.field = field
        self.reason = reason
        self.not_found = not_found
        super().__init__(f"{field}: {reason}")


def _revalidate(data: dict[str, Any], field: str) -> PolicyDocument:
    try:
        return parse_policy(data, source="policy")
    except PolicyError as exc:
        raise EditError(field, "; ".join(issue.detail for issue in exc.issues)) from None


def _tenant(doc: PolicyDocument, name: str, field: str = "tenant") -> TenantSpec:
    bad = check_tenant(name, field)
    if bad is not None:
        raise EditError(bad.field, bad.reason)
    t = next((t for t in doc.tenants if t.name == name), None)
    if t is None:
        raise EditError(field, f"unknown tenant {name!r}", not_found=True)
    return t


def put_plan(doc: PolicyDocument, plan: dict[str, Any]) -> PolicyDocument:
    """Create or replace a plan (validated against the catalog and its assignments)."""
    try:
        spec = parse_plan(plan)
    except PolicyError as exc:
        raise EditError("plan", "; ".join(issue.detail for issue in exc.issues)) from None
    data = doc.model_dump(mode="json")
    data["plans"] = [p for p in data["plans"] if p["name"] != spec.name]
    data["plans"].append(spec.model_dump(mode="json"))
    data["plans"].sort(key=lambda p: p["name"])
    return _revalidate(data, "plan")


def delete_plan(doc: PolicyDocument, name: str) -> PolicyDocument:
    if not any(p.name == name for p in doc.plans):
        raise EditError("name", f"unknown plan {name!r}", not_found=True)
    users = [t.name for t in doc.tenants if t.plan == name] + [
        f"{t.name}/{s.name}" for t in doc.tenants for s in t.slices if s.plan == name
    ]
    if users:
        raise EditError("name", f"plan {name!r} is assigned to {', '.join(sorted(users))}")
    data = doc.model_dump(mode="json")
    data["plans"] = [p for p in data["plans"] if p["name"] != name]
    return _revalidate(data, "name")


def assign(doc: PolicyDocument, tenant: str, slice_: str, plan: str) -> PolicyDocument:
    """Assign ``plan`` ("" to unassign) to a tenant (created if new) or one of its slices."""
    bad = check_tenant(tenant, "tenant") or check_subject_part(slice_, "slice")
    if bad is not None:
        raise EditError(bad.field, bad.reason)
    if plan and not any(p.name == plan for p in doc.plans):
        raise EditError("plan", f"unknown plan {plan!r}", not_found=True)
    data = doc.model_dump(mode="json")
    t = next((t for t in data["tenants"] if t["name"] == tenant), None)
    if t is None:
        t = TenantSpec(name=tenant).model_dump(mode="json")
        data["tenants"].append(t)
    if not slice_:
        t["plan"] = plan or None
    else:
        s = next((s for s in t["slices"] if s["name"] == slice_), None)
        if s is None:
            s = SliceSpec(name=slice_).model_dump(mode="json")
            t["slices"].append(s)
        s["plan"] = plan or None
    return _revalidate(data, "plan")


def set_suspension(doc: PolicyDocument, subject: Subject, reason: str | None) -> PolicyDocument:
    """Suspend (``reason`` set) or resume (None) a tenant, a slice or a key."""
    _tenant(doc, subject.tenant, "subject.tenant")
    for value, path in ((subject.slice, "subject.slice"), (subject.key, "subject.key")):
        bad = check_subject_part(value, path)
        if bad is not None:
            raise EditError(bad.field, bad.reason)
    data = doc.model_dump(mode="json")
    t = next(t for t in data["tenants"] if t["name"] == subject.tenant)
    if subject.key:
        k = next(
            (k for k in t["keys"] if k["name"] == subject.key and k["slice"] == subject.slice),
            None,
        )
        if k is None:
            if reason is None:
                raise EditError("subject.key", "is not suspended", not_found=True)
            k = KeySpec(name=subject.key, slice=subject.slice).model_dump(mode="json")
            t["keys"].append(k)
        k["suspended"] = reason
        if reason is None:
            t["keys"].remove(k)
    elif subject.slice:
        s = next((s for s in t["slices"] if s["name"] == subject.slice), None)
        if s is None:
            if reason is None:
                raise EditError("subject.slice", "is not suspended", not_found=True)
            s = SliceSpec(name=subject.slice).model_dump(mode="json")
            t["slices"].append(s)
        s["suspended"] = reason
    else:
        t["suspended"] = reason
    return _revalidate(data, "subject")


def set_failure_mode(doc: PolicyDocument, tenant: str, mode: str) -> PolicyDocument:
    if mode not in ("deny", "allow"):
        raise EditError("mode", "must be FAILURE_MODE_DENY or FAILURE_MODE_ALLOW")
    _tenant(doc, tenant)
    data = doc.model_dump(mode="json")
    t = next(t for t in data["tenants"] if t["name"] == tenant)
    t["failure_policy"] = {"mode": mode}
    return _revalidate(data, "mode")


def diff(old: PolicyDocument | None, new: PolicyDocument) -> list[str]:
    """Human-readable differences, one per line: ``+`` added, ``-`` removed, ``~`` changed.
    Lists of named things are compared by name."""
    out: list[str] = []
    _diff(
        "",
        _keyed(old.model_dump(mode="json")) if old else {},
        _keyed(new.model_dump(mode="json")),
        out,
    )
    return out


def _keyed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _keyed(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        return {v["name"]: _keyed(v) for v in value}
    return value


def _diff(path: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"+ {p}: {_short(b[k])}")
            elif k not in b:
                out.append(f"- {p}")
            else:
                _diff(p, a[k], b[k], out)
    elif a != b:
        out.append(f"~ {path}: {_short(a)} -> {_short(b)}")


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, dict) else "{" + ", ".join(sorted(map(str, v))) + "}"
    return text if len(text) <= 80 else text[:77] + "..."


# Whole-document changes (ApplyPolicy).


def check_not_empty(text: str, doc: PolicyDocument | None) -> FieldViolation | None:
    """Why a whole policy document must not replace the live one, if it is empty: no text
    (absent, empty or whitespace), or a document with no plans and no tenants (``{}``,
    ``null``, only a metric catalog). Replacing the policy with one would leave every tenant
    without an entitlement, so it is refused rather than applied."""
    if not text.strip():
        return FieldViolation("document", "is empty: send a policy document with plans and tenants")
    if doc is not None and not doc.plans and not doc.tenants:
        return FieldViolation(
            "document",
            "has no plans and no tenants: applying it would remove the whole policy",
        )
    return None


@dataclass(frozen=True, slots=True)
class Removal:
    """A plan or a tenant of the live policy that a new document leaves out."""

    kind: Literal["plan", "tenant"]
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def removals(old: PolicyDocument | None, new: PolicyDocument) -> list[Removal]:
    """The plans and tenants of ``old`` (the live document) that ``new`` removes: the plans
    first, each kind by name. Applying them takes an explicit prune."""
    if old is None:
        return []
    plans = {p.name for p in new.plans}
    tenants = {t.name for t in new.tenants}
    return [Removal("plan", p.name) for p in sorted(old.plans, key=lambda p: p.name)
            if p.name not in plans] + [
        Removal("tenant", t.name)
        for t in sorted(old.tenants, key=lambda t: t.name)
        if t.name not in tenants
    ]  # fmt: skip


def affected_tenants(old: PolicyDocument | None, new: PolicyDocument) -> set[str]:
    """The tenants whose terms differ between ``old`` and ``new``: added, removed or changed
    tenants, and the tenants (in either document) assigned to a plan that was added, removed
    or changed, at the tenant or at one of its slices."""
    before = {t.name: t for t in old.tenants} if old else {}
    after = {t.name: t for t in new.tenants}
    old_plans = {p.name: p for p in old.plans} if old else {}
    new_plans = {p.name: p for p in new.plans}
    changed_plans = {
        name
        for name in set(old_plans) | set(new_plans)
        if old_plans.get(name) != new_plans.get(name)
    }
    out = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    for t in [*before.values(), *after.values()]:
        assigned = {t.plan} | {s.plan for s in t.slices}
        if assigned & changed_plans:
            out.add(t.name)
    if old is not None and old.metrics != new.metrics:
        # a catalog change can change which metrics a pattern counts: every plan's tenants
        out |= set(before) | set(after)
    return out


def tenants_of_plan(doc: PolicyDocument, plan: str) -> set[str]:
    """The tenants assigned to ``plan``, at the tenant or at one of its slices."""
    return {t.name for t in doc.tenants if t.plan == plan or any(s.plan == plan for s in t.slices)}
