"""The plan file at start-up: ``chargepath serve --plans FILE`` against the live policy.

Suspensions, failure policies, slice and tenant assignments and plan edits made through the
admin API are runtime state: they live in the published policy document, and a restart must
not revert them. Grants and counters are not in the document at all (they have keys of their
own, which publishing never touches). So the store keeps, next to the live document, the plan
file last applied at a start (:class:`~chargepath.store.base.AppliedPlanFile`), and a start
decides (:func:`plan_start`) in one of these ways:

- **no live policy**: the file is published as it is;
- **the file is the one last applied** (same digest; comments and layout do not count):
  nothing is published, the live policy and every runtime change since are kept;
- **the file changed** (``--plans-mode merge``, the default): the file is merged onto the live
  document (:func:`chargepath.core.policy_merge.merge`): what the file changes wins, every
  other runtime change is carried over; a field both changed is logged as the file winning;
- **--plans-mode replace**: the file wins wholesale; every runtime change it drops is logged.

Every start logs one line saying which of these happened, then where the live policy differs
from the file (the drift: the runtime changes still in force), field by field at INFO. Nothing
in the live policy is ever overwritten without a log line naming the field.

A start that would publish does it with compare-and-set on the live version, and retries on a
concurrent change (an admin call, another gateway starting), so a change made meanwhile is
merged, never lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from chargepath.core.plans import PolicyDocument
from chargepath.core.policy_merge import FieldChange, Override, diff, merge, summary
from chargepath.policy_files import load_policy_file
from chargepath.store.base import (
    AppliedPlanFile,
    PlanFileStore,
    PolicyConflictError,
    PublishedPolicy,
)

log = logging.getLogger("chargepath.policy")

PlansMode = Literal["merge", "replace"]
PLANS_MODES: tuple[PlansMode, ...] = ("merge", "replace")

#: How many times a start recomputes its change when the live policy moved meanwhile.
CAS_RETRIES = 10
#: The most per-field lines logged per list of changes; the rest are counted.
MAX_FIELD_LINES = 200

Outcome = Literal["first", "unchanged", "merged", "replaced"]


@dataclass(frozen=True, slots=True)
class StartPlan:
    """What a start does with the plan file, computed from the live policy (pure).

    ``document`` is what to publish (None: nothing; the live policy stays). ``file_changes``:
    the file against the file last applied (None when unknown); ``overrides``: fields the file
    wins over a runtime change; ``dropped``: with replace, the runtime changes the file drops;
    ``drift``: where the live policy will differ from the file afterwards."""

    outcome: Outcome
    document: PolicyDocument | None
    live_version: int
    #: The version the file last applied was published under (0: none recorded).
    applied_version: int
    has_record: bool
    file_changes: list[FieldChange] = field(default_factory=list)
    overrides: tuple[Override, ...] = ()
    dropped: list[FieldChange] = field(default_factory=list)
    drift: list[FieldChange] = field(default_factory=list)

    @property
    def runtime_changes(self) -> int:
        """Versions published since the file was last applied (each admin change is one)."""
        return max(self.live_version - self.applied_version, 0) if self.has_record else 0


def plan_start(
    file: PolicyDocument,
    live: PublishedPolicy | None,
    applied: AppliedPlanFile | None,
    mode: PlansMode = "merge",
    *,
    source: str = "plan file",
) -> StartPlan:
    """Decide what a start with plan file ``file`` does (see the module docstring). Raises
    :class:`~chargepath.core.plans.PolicyError` when the merge does not validate."""
    if mode not in PLANS_MODES:
        raise ValueError(f"plans mode {mode!r}: expected one of {', '.join(PLANS_MODES)}")
    if live is None:
        return StartPlan("first", file, 0, 0, False)
    plan = partial(
        StartPlan,
        live_version=live.version,
        applied_version=applied.version if applied is not None else 0,
        has_record=applied is not None,
    )
    if mode == "replace":
        return plan("replaced", file, dropped=diff(live.document, file))
    if applied is not None and applied.sha == file.digest():
        return plan("unchanged", None, drift=diff(file, live.document))
    base = applied.document if applied is not None else None
    merged = merge(base, live.document, file, source=source)
    return plan(
        "merged",
        merged.document,
        file_changes=diff(base, file) if base is not None else [],
        overrides=merged.overrides,
        drift=diff(file, merged.document),
    )


async def apply_plan_file(store: PlanFileStore, path: str, mode: PlansMode = "merge") -> int:
    """Apply the plan file at ``path`` at a start, as :func:`plan_start` decides, and log what
    was done; the live policy version after it. Raises
    :class:`~chargepath.core.plans.PolicyError` for a file (or merge) that does not validate,
    :class:`~chargepath.store.base.StoreUnavailableError` when the store cannot answer."""
    file = load_policy_file(path)
    for _ in range(CAS_RETRIES):
        live = await store.load_policy()
        applied = await store.load_plan_file()
        plan = plan_start(file, live, applied, mode, source=path)
        if plan.document is None:
            _log_start(path, plan, plan.live_version, published=False)
            return plan.live_version
        try:
            published = await store.publish_policy(
                plan.document, expected_version=plan.live_version, plan_file=file
            )
        except PolicyConflictError:
            continue
        _log_start(path, plan, published.version, published=published.changed)
        return published.version
    raise PolicyConflictError(await store.policy_version())


def _log_start(path: str, plan: StartPlan, version: int, *, published: bool) -> None:
    """The start's log: one line saying what was done, then the changes field by field.
    ``version``: the live version afterwards; ``published``: whether it is a new one."""
    outcome = f"published as version {version}" if published else f"version {version} kept"
    if plan.outcome == "first":
        log.info(
            "plan file %s published as policy version %d (no live policy before)", path, version
        )
        return
    if plan.outcome == "unchanged":
        log.info(
            "plan file %s unchanged since version %d; live policy version %d kept "
            "(%d runtime changes since)",
            path,
            plan.applied_version,
            version,
            plan.runtime_changes,
        )
    elif plan.outcome == "replaced" and not plan.dropped:
        log.info("plan file %s (--plans-mode replace): live policy %s", path, outcome)
        return
    elif plan.outcome == "replaced":
        log.warning(
            "plan file %s replaces live policy version %d (--plans-mode replace): now version "
            "%d; runtime changes dropped: %s",
            path,
            plan.live_version,
            version,
            summary(plan.dropped),
        )
        _log_fields("dropped by --plans-mode replace:", plan.dropped, logging.WARNING)
        return
    else:
        if plan.has_record:
            log.info(
                "plan file %s changed since version %d: %s; live policy %s, runtime changes "
                "since kept unless the file changes the same field (%d overridden)",
                path,
                plan.applied_version,
                summary(plan.file_changes),
                outcome,
                len(plan.overrides),
            )
            _log_fields("plan file change:", plan.file_changes, logging.INFO)
        else:
            log.warning(
                "plan file %s: no record of the plan file applied before (a store written by "
                "an older chargepath); merged onto live policy version %d, %s: fields the "
                "file sets win, fields it leaves at their default keep their live value",
                path,
                plan.live_version,
                outcome,
            )
        for o in plan.overrides[:MAX_FIELD_LINES]:
            log.warning("plan file wins over a runtime change: %s", o)
    if plan.drift:
        log.info(
            "live policy version %d drifts from plan file %s in %d fields (runtime changes "
            "kept): %s",
            version,
            path,
            len(plan.drift),
            summary(plan.drift),
        )
        _log_fields("drift from the plan file:", plan.drift, logging.INFO)
    else:
        log.info("live policy version %d matches plan file %s", version, path)


def _log_fields(prefix: str, changes: list[FieldChange], level: int) -> None:
    for c in changes[:MAX_FIELD_LINES]:
        log.log(level, "%s %s", prefix, c)
    if len(changes) > MAX_FIELD_LINES:
        log.log(level, "%s ... and %d more", prefix, len(changes) - MAX_FIELD_LINES)
