"""The Redis implementation of :class:`~chargepath.store.base.MeteringStore`.

Key layout (every key of a tenant shares the hash tag ``{tenant}``, so a decision's keys are
in one slot and the scripts run unchanged on Redis Cluster):

=============================  ==========================================================
``cp:policy``                  hash: ``v`` live version, ``sha`` digest, ``doc`` JSON; the
                               plan file last applied at a start: ``file_doc`` JSON,
                               ``file_sha`` digest, ``file_v`` version then
``cp:{cp:policy}:audit``       stream: the audit trail of admin calls (store/audit.py)
``cp:{T}:ent``                 hash: ``v`` policy version stamped on the tenant
``cp:{T}:ledger``              stream: one entry per recorded usage (billing reads it)
``cp:{T}:d:<request_id>``      string: the first verdict of a request id, for the dedup window
``cp:{T}:s:<session_id>``      string: a stream session's highest sequence + replay slots
``cp:{T}:r:<limit>:<sl>:<k>``  hash: token bucket level (sub-units) and its time; deleted
                               when full, expires when it would be full again
``cp:{T}:q:<limit>:<sl>:<k>``  hash: quota period start, used units, granted units
=============================  ==========================================================

Scripts are package data (``store/scripts/*.lua``), registered once and run with EVALSHA;
redis-py reloads them on NOSCRIPT (e.g. after a Redis restart).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import msgpack
from redis.exceptions import RedisError

from chargepath.core.audit import AuditEvent
from chargepath.core.model import (
    Decision,
    FieldViolation,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Scope,
    Verdict,
)
from chargepath.core.plans import PolicyDocument
from chargepath.core.policy import Limit
from chargepath.store.audit import AUDIT_KEY, event_fields
from chargepath.store.audit import MAX_ENTRIES as AUDIT_MAX_ENTRIES
from chargepath.store.base import (
    AppliedPlanFile,
    DecideItem,
    PolicyConflictError,
    PublishedPolicy,
    StalePolicyError,
    StoreUnavailableError,
)
from chargepath.store.connect import RedisClient, RedisTarget, ReplicaWait, connect

POLICY_KEY = "cp:policy"

FLAG_REPLAYED = 1
FLAG_RECORDED = 2
FLAG_CONFLICT = 4
FLAG_WINDOW_MISS = 8

# The INVALID_USAGE verdicts the script gives, as structures; ``message`` is their text.
_CONFLICT = (
    FieldViolation("request_id", "was already used for a different usage within the dedup window"),
)
_WINDOW_MISS = (
    FieldViolation(
        "sequence",
        "more than the session's replay window behind its highest sequence; whether it "
        "was recorded is no longer known, so nothing was done",
    ),
)
_CONFLICT_MESSAGE = str(_CONFLICT[0])
_WINDOW_MESSAGE = str(_WINDOW_MISS[0])
# decide.lua's codes -> enum members (an index instead of an enum call per verdict)
_DECISIONS: dict[int, Decision] = {d.value: d for d in Decision}
_REASONS: dict[int, Reason] = {r.value: r for r in Reason}


def read_script(name: str) -> str:
    """A script's text, with each line ``-- #include NAME`` replaced by that file (Redis
    scripts cannot load modules; shared Lua is inlined once, at load)."""
    folder = resources.files("chargepath.store") / "scripts"
    lines = []
    for line in (folder / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("-- #include "):
            lines.append((folder / line.removeprefix("-- #include ").strip()).read_text("utf-8"))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def tenant_prefix(tenant: str) -> str:
    return f"cp:{{{tenant}}}:"


def ledger_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}ledger"


def entitlement_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}ent"


def scope_instance(limit: Limit, slice_: str, key: str) -> tuple[str, str]:
    """The (slice, key) a limit counts at: ("", "") for a tenant-scoped one."""
    sl = slice_ if limit.scope in (Scope.SLICE, Scope.KEY) else ""
    return sl, key if limit.scope is Scope.KEY else ""


def limit_key(tenant: str, limit: Limit, slice_: str, key: str) -> str:
    """The counter of ``limit`` for one scope instance: tenant, slice, or (slice, key)."""
    kind = "r" if limit.kind is LimitKind.RATE else "q"
    sl, k = scope_instance(limit, slice_, key)
    return f"{tenant_prefix(tenant)}{kind}:{limit.name}:{sl}:{k}"


def grants_key(tenant: str, limit: Limit, slice_: str, key: str) -> str:
    """The grants of a quota counter: id -> "amount|period_start_ms|expires_ms"."""
    sl, k = scope_instance(limit, slice_, key)
    return f"{tenant_prefix(tenant)}g:{limit.name}:{sl}:{k}"


class RedisStore:
    """Chargepath's store on Redis (or Valkey, or Redis Cluster) through redis.asyncio.

    ``dedup_window_ms``: how long a request id's first verdict is kept (168 bytes per request
    id, i.e. ~170 MB per million ids in the window). ``session_ttl_ms``: how long an
    idle stream session is remembered. ``session_window``: how many recent verdicts a session
    keeps for resends (65 bytes each). ``clock_offset_ms`` shifts Redis' clock and exists for
    tests of period boundaries only.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        dedup_window_ms: int = 600_000,
        session_ttl_ms: int = 86_400_000,
        session_window: int = 128,
        recent_length: int = 1000,
        clock_offset_ms: int = 0,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self.client = client
        #: WAIT after each decision batch (high availability; None: no WAIT).
        self.replica_wait = replica_wait
        self.dedup_window_ms = dedup_window_ms
        self.session_ttl_ms = session_ttl_ms
        self.session_window = session_window
        self.recent_length = recent_length
        self.clock_offset_ms = clock_offset_ms
        self._decide = client.register_script(read_script("decide.lua"))
        self._publish = client.register_script(read_script("publish.lua"))
        self._stamp = client.register_script(read_script("stamp.lua"))

    @classmethod
    def from_url(
        cls, url: str, *, cluster: bool = False, connect_timeout: float = 0.05, **kwargs: Any
    ) -> RedisStore:
        return cls.connect(RedisTarget(url=url, cluster=cluster), connect_timeout, **kwargs)

    @classmethod
    def connect(
        cls, target: RedisTarget, connect_timeout: float = 0.05, **kwargs: Any
    ) -> RedisStore:
        """A store on ``target`` (one node, a cluster, or Sentinel's master). A blocking pool:
        a burst beyond it waits for a connection (within the caller's store timeout) instead
        of failing with "Too many connections". Redis is single-threaded, so more connections
        than this would not decide faster."""
        return cls(connect(target, connect_timeout=connect_timeout, pool_size=64), **kwargs)

    async def decide(
        self,
        tenant: str,
        policy_version: int,
        items: list[DecideItem],
        *,
        ok_limits: bool = True,
    ) -> list[Verdict]:
        prefix = tenant_prefix(tenant)
        keys: list[str] = [prefix + "ent", prefix + "ledger", prefix + "recent", prefix + "agg"]
        index: dict[str, int] = {}

        def idx(k: str) -> int:
            i = index.get(k)
            if i is None:
                keys.append(k)
                i = index[k] = len(keys)
            return i

        # Each distinct (limit, scope instance) is sent once as a spec, each distinct list of
        # specs once as a set; a usage names its set. Memoised by the identity of the limits
        # tuple (a Resolution is shared by every usage it resolved), which lives for the call.
        specs: list[Any] = []
        spec_of: dict[tuple[int, str, str], int] = {}
        sets: list[list[int]] = []
        set_of: dict[tuple[int, str, str], int] = {}
        needs: dict[int, tuple[bool, bool]] = {}
        usages: list[Any] = []
        with_trace = self.recent_length > 0
        for item in items:
            u = item.usage
            res = item.resolution
            limits = res.limits
            sl = u.subject.slice
            k = u.subject.key
            report = u.mode is Mode.REPORT
            flags = (1 if report else 0) | (2 if res.entitled else 0) | (4 if item.suspended else 0)
            if u.session_id:
                flags |= 8
                kidx = idx(f"{prefix}s:{u.session_id}")
            else:
                kidx = idx(f"{prefix}d:{u.request_id}")
            set_no = 0
            if limits:
                lid = id(limits)
                need = needs.get(lid)
                if need is None:
                    scopes = {lim.scope for lim in limits}
                    need = needs[lid] = (
                        Scope.SLICE in scopes or Scope.KEY in scopes,
                        Scope.KEY in scopes,
                    )
                set_key = (lid, sl if need[0] else "", k if need[1] else "")
                set_no = set_of.get(set_key, 0)
                if not set_no:
                    members = []
                    for lim in limits:
                        isl, ik = scope_instance(lim, sl, k)
                        spec_key = (id(lim), isl, ik)
                        n = spec_of.get(spec_key)
                        if n is None:
                            counter = idx(limit_key(tenant, lim, sl, k))
                            if lim.kind is LimitKind.RATE:
                                specs += (
                                    counter, 1, int(lim.soft),
                                    lim.capacity * lim.scale, lim.scale, lim.refill_per_ms, 0,
                                    lim.name,
                                )  # fmt: skip
                            else:
                                specs += (
                                    counter, 2, int(lim.soft), lim.amount, int(lim.period), 0,
                                    idx(grants_key(tenant, lim, sl, k)), lim.name,
                                )  # fmt: skip
                            n = spec_of[spec_key] = len(specs) // 8
                        members.append(n)
                    sets.append(members)
                    set_no = set_of[set_key] = len(sets)
            mode = "report" if report else "admit"
            text = (
                f"{u.request_id}\x1f{item.decision_id}\x1f{sl}\x1f{k}\x1f{u.metric}"
                f"\x1f{u.amount}\x1f{mode}"
            )
            aggregate = res.aggregate_ms if u.mode is Mode.ADMIT else 0
            if aggregate:
                tail = f"|{sl}|{k}|{u.metric}|{mode}"
            elif u.labels or u.occurred_at_ms:
                labels = json.dumps(dict(u.labels), separators=(",", ":")) if u.labels else ""
                tail = f"\x1f{u.occurred_at_ms}\x1f{labels}"
            else:
                tail = ""
            usages += (
                flags, u.amount, kidx, u.sequence, item.fingerprint, item.decision_id, set_no,
                aggregate, text, tail, item.trace_id if with_trace else "",
            )  # fmt: skip
        args = [
            policy_version,
            self.clock_offset_ms,
            self.dedup_window_ms,
            self.session_ttl_ms,
            self.session_window,
            self.recent_length,
            msgpack.packb((specs, sets, usages)),
            "1" if ok_limits else "0",
        ]
        try:
            if self.replica_wait is None:
                reply = await self._decide(keys=keys, args=args)
            else:  # HA: the same EVALSHA, then WAIT on its connection (connect.ReplicaWait)
                reply = await self.replica_wait.run(
                    self.client, self._decide, keys, args, len(items)
                )
        except RedisError as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if reply[0] == 0:
            raise StalePolicyError(int(reply[1]))
        return self._verdicts(reply, items, policy_version)

    @staticmethod
    def _verdicts(reply: list[Any], items: list[DecideItem], version: int) -> list[Verdict]:
        """Verdicts from decide.lua's reply (see its header): per usage a code (decision,
        reason, flags, number of limits), retry_after, the record's decision id for an answer
        from a record, then per limit remaining, reset (negative: exceeded) and, for a quota,
        its capacity."""
        now = int(reply[1])
        pos = 2
        out: list[Verdict] = []
        append = out.append
        for item in items:
            code = reply[pos]
            retry = reply[pos + 1]
            pos += 2
            flags = (code >> 6) & 15
            did = item.decision_id
            if flags & (FLAG_REPLAYED | FLAG_CONFLICT):
                did = reply[pos] or did
                pos += 1
            states: tuple[LimitState, ...] = ()
            nl = code >> 10
            if nl:
                limits: list[LimitState] = []
                for lim in item.resolution.limits[:nl]:
                    rem = reply[pos]
                    reset = reply[pos + 1]
                    pos += 2
                    if lim.kind is LimitKind.RATE:
                        cap = lim.capacity
                    else:
                        cap = reply[pos]
                        pos += 1
                    limits.append(
                        LimitState(
                            name=lim.name,
                            kind=lim.kind,
                            scope=lim.scope,
                            remaining=rem,
                            capacity=cap,
                            reset_after_ms=reset if reset >= 0 else -1 - reset,
                            soft=lim.soft,
                            exceeded=reset < 0,
                        )
                    )
                states = tuple(limits)
            message = ""
            violations: tuple[FieldViolation, ...] = ()
            if flags & FLAG_CONFLICT:
                message, violations = _CONFLICT_MESSAGE, _CONFLICT
            elif flags & FLAG_WINDOW_MISS:
                message, violations = _WINDOW_MESSAGE, _WINDOW_MISS
            append(
                Verdict(
                    request_id=item.usage.request_id,
                    decision=_DECISIONS[code & 3],
                    reason=_REASONS[(code >> 2) & 15],
                    decision_id=did,
                    policy_version=version,
                    retry_after_ms=retry,
                    limits=states,
                    recorded=bool(flags & FLAG_RECORDED),
                    replayed=bool(flags & FLAG_REPLAYED),
                    message=message,
                    decided_at_ms=now,
                    trace_id=item.trace_id,
                    violations=violations,
                )
            )
        return out

    async def publish_policy(
        self,
        document: PolicyDocument,
        *,
        force: bool = False,
        expected_version: int | None = None,
        audit: AuditEvent | None = None,
        plan_file: PolicyDocument | None = None,
    ) -> PublishedPolicy:
        body = document.canonical_json()
        keys = [POLICY_KEY]
        args: list[str | int] = [
            body,
            document.digest(),
            "1" if force else "0",
            "" if expected_version is None else expected_version,
            "" if plan_file is None else plan_file.canonical_json(),
            "" if plan_file is None else plan_file.digest(),
        ]
        if audit is not None:
            keys.append(AUDIT_KEY)
            args += [AUDIT_MAX_ENTRIES, *event_fields(audit, versions=False)]
        try:
            previous = await self.load_policy()
            version, changed = await self._publish(keys=keys, args=args)
            if version == -1:
                raise PolicyConflictError(int(changed))
            tenants = {t.name for t in document.tenants}
            if previous is not None:
                tenants |= {t.name for t in previous.document.tenants}
            for tenant in sorted(tenants):
                await self._stamp(keys=[entitlement_key(tenant)], args=[version])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return PublishedPolicy(int(version), document, bool(changed))

    async def load_policy(self) -> PublishedPolicy | None:
        try:
            v, doc = await self.client.hmget(POLICY_KEY, ["v", "doc"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if v is None or doc is None:
            return None
        return PublishedPolicy(int(v), PolicyDocument.model_validate_json(doc))

    async def load_plan_file(self) -> AppliedPlanFile | None:
        try:
            v, sha, doc = await self.client.hmget(POLICY_KEY, ["file_v", "file_sha", "file_doc"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if v is None or sha is None or doc is None:
            return None
        return AppliedPlanFile(int(v), str(sha), PolicyDocument.model_validate_json(doc))

    async def policy_version(self) -> int:
        try:
            v = await self.client.hget(POLICY_KEY, "v")
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return int(v) if v else 0

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()
