"""Policy documents compared field by field, and the three-way merge ``serve --plans`` makes.

Three documents meet when a gateway starts with a plan file:

- the *base*: the plan file as it was last applied at a start (the store keeps it);
- the *live* document: the base plus every change made since through the admin API
  (suspensions, failure policies, assignments, plan edits...);
- the *file*: the plan file now.

Which source wins, field by field (:func:`merge`):

- a field the file leaves as the base had it keeps its live value: a change made through the
  admin API survives a restart with the same file, or with a file that changed elsewhere;
- a field the file changes takes the file's value; when the live document had changed that
  same field too, the file still wins and the merge reports it as an :class:`Override`;
- with no base (a store written before the base was kept), the base is the empty document: a
  field the file leaves at its default keeps its live value, a field the file sets wins.

Named lists (metrics, plans, limits, tenants, slices, keys) are compared item by item by name
(a key by its slice and name), so an item that only one side added or removed stays as that
side made it. Documents are compared without their defaults, so an absent field and a field
at its default are the same thing. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chargepath.core.plans import PolicyDocument, PolicyError, PolicyIssue, parse_policy


class _Absent:
    """A field or item that a document does not have (for a field: its default)."""

    def __repr__(self) -> str:
        return "(unset)"


ABSENT: Any = _Absent()

#: The most items a summary names per list before it counts the rest.
SUMMARY_NAMES = 4

#: The document's lists whose items have a name (compared item by item).
NAMED_LISTS = frozenset({"metrics", "plans", "limits", "tenants", "slices", "keys"})


class _Named(dict[str, Any]):
    """A named list (plans, tenants, limits, slices, keys) as a mapping from identity to item;
    turned back into a list, in the mapping's order, by :func:`_document`."""


def _identity(field: str, item: dict[str, Any]) -> str:
    # A key's identity is its slice and name (``KeySpec`` allows the same name in two slices);
    # ':' is not allowed in either, so the join is unambiguous.
    if field == "keys" and item.get("slice"):
        return f"{item['slice']}:{item['name']}"
    return str(item["name"])


def _tree(value: Any, field: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _tree(v, k) for k, v in value.items()}
    if isinstance(value, list) and field in NAMED_LISTS:
        return _Named((_identity(field, v), _tree(v)) for v in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, _Named):
        return [_plain(v) for v in value.values()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _sparse(doc: PolicyDocument) -> dict[str, Any]:
    """The document without its defaults, named lists as mappings."""
    tree: dict[str, Any] = _tree(doc.model_dump(mode="json", exclude_defaults=True))
    return tree


def _full(doc: PolicyDocument | None) -> dict[str, Any]:
    """The document with every field, named lists as mappings (None: the empty document)."""
    tree: dict[str, Any] = _tree((doc or PolicyDocument()).model_dump(mode="json"))
    return tree


def _show(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _outline(item: dict[str, Any]) -> str:
    """An added item in one short line: its set fields, its named lists by their length."""
    parts = []
    for k, v in item.items():
        if k in ("name", "slice") or v in (None, "", [], {}):
            continue
        parts.append(f"{len(v)} {k}" if isinstance(v, _Named) else f"{k}={_plain(v)!r}")
    text = ", ".join(parts)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One difference between two documents: a field (or a named item) ``old`` -> ``new``,
    either side :data:`ABSENT`. ``path`` names it from the document's root, items by name:
    ``("tenants", "acme", "keys", "k1", "suspended")``."""

    path: tuple[str, ...]
    old: Any
    new: Any

    @property
    def sign(self) -> str:
        """``+`` added, ``-`` removed, ``~`` changed."""
        if self.old is ABSENT:
            return "+"
        return "-" if self.new is ABSENT else "~"

    def __str__(self) -> str:
        where = ".".join(self.path)
        if self.sign == "-":
            return f"- {where}"
        if self.sign == "+":
            if isinstance(self.new, dict):
                return f"+ {where} {_outline(self.new)}".rstrip()
            return f"+ {where}: {_show(self.new)}"
        return f"~ {where}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True, slots=True)
class Override:
    """A field that both the admin API (``runtime``) and the plan file (``file``) changed
    since the last start; the file's value won."""

    path: tuple[str, ...]
    runtime: Any
    file: Any

    def __str__(self) -> str:
        return (
            f"{'.'.join(self.path)}: the file's {_show(self.file)} replaces "
            f"the runtime {_show(self.runtime)}"
        )


@dataclass(frozen=True, slots=True)
class Merge:
    """What :func:`merge` made: the document to make live, and where the file overrode a
    runtime change."""

    document: PolicyDocument
    overrides: tuple[Override, ...]


def diff(old: PolicyDocument | None, new: PolicyDocument) -> list[FieldChange]:
    """Every difference from ``old`` to ``new``, field by field (all of ``new`` when ``old``
    is None). An item added or removed as a whole is one change, not one per field."""
    out: list[FieldChange] = []
    _diff((), _full(old), _full(new), out)
    return out


def _diff(path: tuple[str, ...], a: Any, b: Any, out: list[FieldChange]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff((*path, k), a.get(k, ABSENT), b.get(k, ABSENT), out)
    elif a != b:
        out.append(FieldChange(path, a, b))


def summary(changes: Iterable[FieldChange]) -> str:
    """One line: per top-level list, the items added (+), removed (-) and changed (~), e.g.
    ``plans +platinum; tenants ~cpaas-demo ~mvno-demo``. ``no change`` when there is none."""
    groups: dict[str, dict[str, str]] = {}
    for c in changes:
        top = c.path[0]
        if len(c.path) == 1:
            groups.setdefault(top, {})["(all)"] = "~"
            continue
        item = c.path[1]
        sign = c.sign if len(c.path) == 2 else "~"
        groups.setdefault(top, {})[item] = sign
    if not groups:
        return "no change"
    parts = []
    for top, items in groups.items():
        names = [f"{sign}{name}" for name, sign in items.items()]
        if len(names) > SUMMARY_NAMES:
            names = [*names[:SUMMARY_NAMES], f"and {len(names) - SUMMARY_NAMES} more"]
        parts.append(f"{top} {' '.join(names)}")
    return "; ".join(parts)


def merge(
    base: PolicyDocument | None,
    live: PolicyDocument,
    file: PolicyDocument,
    *,
    source: str = "plan file",
) -> Merge:
    """The file applied onto the live document, keeping every runtime change the file does
    not change itself (see the module's docstring for which source wins). ``base``: the file
    last applied (None: unknown, the empty document). Raises :class:`PolicyError` (with
    ``source``) when the result does not validate, e.g. the file removes a plan that a
    runtime assignment uses."""
    overrides: list[Override] = []
    merged = _merge((), _sparse(base or PolicyDocument()), _sparse(live), _sparse(file), overrides)
    try:
        document = parse_policy(_plain(merged), source=source)
    except PolicyError as exc:
        hint = PolicyIssue(
            source,
            "",
            None,
            "the file merged with the changes made through the admin API does not validate; "
            "change the file, or start once with --plans-mode replace to make the file win",
        )
        raise PolicyError([*exc.issues, hint]) from None
    return Merge(document, tuple(overrides))


def _merge(path: tuple[str, ...], base: Any, live: Any, file: Any, out: list[Override]) -> Any:
    if file == base:
        return live
    if live in (base, file):
        return file
    if (
        isinstance(live, dict)
        and isinstance(file, dict)
        and (base is ABSENT or isinstance(base, dict))
    ):
        named = isinstance(live, _Named) or isinstance(file, _Named)
        b = base if isinstance(base, dict) else {}
        merged = _Named() if named else {}
        for k in list(live) + [k for k in file if k not in live]:
            bv, lv, fv = b.get(k, ABSENT), live.get(k, ABSENT), file.get(k, ABSENT)
            kind = next((type(v) for v in (bv, lv, fv) if isinstance(v, dict)), None)
            if kind is not None and not named:
                # In a structure an absent field is its default, so an absent sub-structure
                # is an empty one. In a named list an absent item is no item.
                bv, lv, fv = (kind() if v is ABSENT else v for v in (bv, lv, fv))
            v = _merge((*path, k), bv, lv, fv, out)
            if v is not ABSENT and not (v == {} and not named):
                merged[k] = v
        return merged
    out.append(Override(path, live, file))
    return file
