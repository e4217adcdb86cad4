"""Admin changes as pure functions: a policy document in, a new validated document out.

Every function raises :class:`EditError` (a bad field, or something not found) and never
returns a document that does not validate, so an admin call that fails changes nothing.
"""

from __future__ import annotations

from typing import Any

from chargepath.core.model import Subject
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
