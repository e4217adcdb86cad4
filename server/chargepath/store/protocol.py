"""The protocol between the store's Python and its Lua scripts, owned by this one module.

Everything both sides must agree on is here, once: the Redis key layout (the scripts' KEYS),
the decision script's arguments, the MessagePack batch payload (its slots and flag bits), the
packed reply codes, the enum codes and the separators of the texts the scripts write. Python
uses the names below; the Lua sources use the same names, and :func:`read_script` writes their
values in when it assembles a script (:func:`with_constants`), so no number is written twice in
the source tree. ``tests/unit/test_protocol.py`` holds golden payloads and replies.

Payload of ``decide.lua`` (ARGV[7], one MessagePack array of five arrays; offsets below are the
1-based offsets Lua reads, named ``SPEC_*``/``RATE_*``/``QUOTA_*``/``USAGE_*``/``CAP_*``):

1. limit specs, flat, :data:`SPEC_SLOTS` values per spec: key index, kind, soft (0/1), then
   for a rate its capacity in sub-units, sub-units per unit (scale), refill in sub-units per
   ms, capacity in units; for a quota its amount in units, period code, grants key index, 0;
   then the limit's name. Every number is computed in core (:class:`~chargepath.core.policy.
   Limit`), never in Lua. Two specs may name the same key (same limit name and scope
   instance): they share the counter.
2. limit sets: arrays of spec numbers, in the order of a usage's limits (each distinct set
   once per batch).
3. subjects: flat (slice, key) pairs, each distinct pair once per batch (what a quota
   threshold event names).
4. usages, flat, :data:`USAGE_SLOTS` values per usage: flags (``USAGE_*`` bits), amount,
   dedup or session key index (0: none), sequence, fingerprint, decision id, limit set number
   (0: no limits), ledger aggregation interval in ms (0: one ledger entry per usage), text
   (``request_id US decision_id US slice US key US metric US amount US mode``: how its ledger
   entry and its trail record begin; no part may hold US), ledger tail (``""``, or
   ``US occurred_at_ms US labels JSON``; for an aggregated usage ``|slice|key|metric|mode``,
   its aggregate's field after the interval), trace id, subject number, and for a session
   usage the key index of its request id's dedup record (0 otherwise; see :data:`ARG_DOUBT`).
5. the tenant's caps (store/scripts/lib/caps.lua): for each cap ``CAP_REQUEST_IDS`` ..
   ``CAP_KEYS`` in turn, the key index of its count (0: no cap) and its bound; then, when the
   slices or keys cap is set, per spec its cap (``CAP_SLICES``, ``CAP_KEYS``, or 0) and the
   member it counts under (the slice, or ``slice US key``).

Reply of ``decide.lua``: ``{REPLY_STALE, stamped_version}`` (nothing written),
``{REPLY_LATE, time_ms}`` (Redis' ``TIME`` was past ARGV[ARG_DEADLINE]: nothing written), or
``{REPLY_DECIDED, now_ms, then per usage: code, retry_after_ms, [the record's decision id when
the verdict flags say replayed or conflict], then per limit reported: remaining units,
reset_after_ms (``-1 - reset_after_ms`` when exceeded), and for a quota its capacity}``, where
``code = decision + REASON_UNIT * reason + FLAGS_UNIT * verdict flags + LIMITS_UNIT * limits``.
A verdict with reason ``CAP_REACHED`` carries one more value after retry_after_ms: the number
of the cap it reached (``CAP_*``); it has no limits.
"""

from __future__ import annotations

import functools
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import msgpack

from chargepath.core.counters import MAX_DEBT
from chargepath.core.leases import LeaseAnswer, LeaseTerms
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
from chargepath.core.periods import DAY_MS, HOUR_MS, WEEK_MS, WEEK_OFFSET_MS, Period
from chargepath.core.policy import NO_CAPS, Caps, Limit
from chargepath.store.base import (
    DecideItem,
    LeaseItem,
    Reversal,
    StalePolicyError,
    StoreDeadlineError,
)

# -- key layout (every key of a tenant shares the hash tag {tenant}) ---------------------------


def tenant_prefix(tenant: str) -> str:
    return f"cp:{{{tenant}}}:"


def ledger_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}ledger"


def entitlement_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}ent"


def recent_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}recent"


def aggregates_key(tenant: str) -> str:
    """The per-interval ledger aggregates written by decide.lua (hash)."""
    return f"{tenant_prefix(tenant)}agg"


def grant_notes_key(tenant: str) -> str:
    """The notes of a tenant's grants: grant id -> note (hash)."""
    return f"{tenant_prefix(tenant)}gnotes"


def caps_key(tenant: str, cap: int) -> str:
    """The count of a tenant's cap ``cap`` (``CAP_*``): a sorted set of the live members, each
    scored with the ms its record expires at (store/scripts/lib/caps.lua)."""
    return f"{tenant_prefix(tenant)}cap:{CAP_NAMES[cap]}"


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


# -- room events ----------------------------------------------------------------------------

#: The pub/sub channel of room events: a tenant's name, published by a script that may add
#: room to the tenant's limits (grant.lua, stamp.lua: a new policy version); store/room.py
#: reads it for the over-limit cache. Pub/sub channels are not bound to a slot: a PUBLISH on
#: any node of a cluster reaches the subscribers of every node.
ROOM_CHANNEL = "cp:room"

# -- gateway_report.lua: the replies ----------------------------------------------------------

GATEWAY_REPORTED = 1
#: the lease is closed, expired, or cannot cover the admits: nothing written
GATEWAY_LEASE_GONE = 0

# -- decide.lua: KEYS and ARGV --------------------------------------------------------------

KEY_ENTITLEMENT = 1
KEY_LEDGER = 2
KEY_RECENT = 3
KEY_AGGREGATES = 4

ARG_POLICY_VERSION = 1
ARG_CLOCK_OFFSET = 2
ARG_DEDUP_WINDOW = 3
ARG_SESSION_TTL = 4
ARG_SESSION_WINDOW = 5
ARG_RECENT_LENGTH = 6
ARG_PAYLOAD = 7
ARG_FULL_VIEW = 8
#: the batch's deadline on Redis' clock (``TIME``, without the clock offset), ms (0: none); see
#: :class:`~chargepath.store.clock.StoreClock`
ARG_DEADLINE = 9
#: the batch's doubt time on Redis' clock (``TIME``), ms (0: never): a session usage of a batch
#: that runs later may have been answered by the failure policy (and spooled) before its reply
#: is read, so it is also checked against, and written to, its request id's dedup record (the
#: key at ``USAGE_DOUBT_KEY``), which the spool's replay finds whatever the session window
#: says (docs/design.md, "Late commits and the spool")
ARG_DOUBT = 10
#: "1": the batch replays spooled usages (already acknowledged to their callers): the
#: tenant's caps are not applied to it, else "0"
ARG_REPLAY = 11
#: how long the trail keeps every decision (explain's window), ms: at most the dedup window
ARG_EXPLAIN_WINDOW = 12

# -- the payload: slots of a spec and of a usage (1-based, as Lua reads them) -----------------

SPEC_SLOTS = 8
SPEC_KEY = 1
SPEC_KIND = 2
SPEC_SOFT = 3
RATE_CAPACITY_SUB = 4
RATE_SCALE = 5
RATE_REFILL_PER_MS = 6
RATE_CAPACITY = 7
QUOTA_AMOUNT = 4
QUOTA_PERIOD = 5
QUOTA_GRANTS_KEY = 6
SPEC_NAME = 8

USAGE_SLOTS = 13
USAGE_FLAGS = 1
USAGE_AMOUNT = 2
USAGE_DEDUP_KEY = 3
USAGE_SEQUENCE = 4
USAGE_FINGERPRINT = 5
USAGE_DECISION_ID = 6
USAGE_SET = 7
USAGE_AGGREGATE_MS = 8
USAGE_TEXT = 9
USAGE_LEDGER_TAIL = 10
USAGE_TRACE_ID = 11
USAGE_SUBJECT = 12
USAGE_DOUBT_KEY = 13  # a session usage's request-id dedup key index (0: none); see ARG_DOUBT

# flag bits of a usage (the USAGE_FLAGS slot)
USAGE_REPORT = 1
USAGE_ENTITLED = 2
USAGE_SUSPENDED = 4
USAGE_SESSION = 8  # the key index is a session, else a request-id dedup record

# the caps of a tenant (the payload's fifth array; core.plans.CapsSpec names them)
CAP_REQUEST_IDS = 1
CAP_SESSIONS = 2
CAP_SLICES = 3
CAP_KEYS = 4
CAP_COUNT = 4
#: cap number -> its name in a policy's ``caps:`` block (and in its count's key)
CAP_NAMES = {
    CAP_REQUEST_IDS: "request_ids",
    CAP_SESSIONS: "sessions",
    CAP_SLICES: "slices",
    CAP_KEYS: "keys",
}
_CAP_WHAT = {
    CAP_REQUEST_IDS: "live request ids (each kept for the dedup window)",
    CAP_SESSIONS: "live stream sessions (each kept for the session ttl after its last usage)",
    CAP_SLICES: "slices with live slice-scoped counters (each kept until its period ends)",
    CAP_KEYS: "keys with live key-scoped counters (each kept until its period ends)",
}


def cap_message(cap: int, caps: Caps) -> str:
    """The message of a CAP_REACHED verdict: which cap, its bound, what it counts."""
    name = CAP_NAMES[cap]
    return (
        f"caps.{name}: the tenant's {getattr(caps, name)} {_CAP_WHAT[cap]} are all in use; "
        "nothing was counted or recorded"
    )


# -- the reply ------------------------------------------------------------------------------

REPLY_STALE = 0
REPLY_DECIDED = 1
#: decide.lua found Redis' clock past the batch's deadline and wrote nothing
REPLY_LATE = 2
#: publish.lua (a compare-and-set that lost) and grant.lua (an expiry already past)
REPLY_REFUSED = -1

DECISION_BITS = 2
REASON_BITS = 4
VERDICT_FLAG_BITS = 4
REASON_UNIT = 1 << DECISION_BITS
FLAGS_UNIT = REASON_UNIT << REASON_BITS
LIMITS_UNIT = FLAGS_UNIT << VERDICT_FLAG_BITS

# verdict flags (in a code, and the "recorded" digit of a dedup record or session slot)
VERDICT_REPLAYED = 1
VERDICT_RECORDED = 2
VERDICT_CONFLICT = 4  # the request id (or the session sequence) was used for another usage
VERDICT_WINDOW_MISS = 8  # a resend older than the session's replay window

#: a quota threshold event is written when a decision crosses this share of the capacity (and
#: another at 100 %)
QUOTA_WARN_PERCENT = 80

# -- a session's replay slots (written and read by lib/dedup.lua only; here so that each width
# is written once and the Lua gets literals) --------------------------------------------------

SESSION_SEQ_DIGITS = 20  # the header (highest sequence) and a slot's sequence
SESSION_RETRY_DIGITS = 10  # a slot's retry_after_ms, at most 10**10 - 1
SESSION_ID_CHARS = 32  # a slot's decision id, space-padded
#: a slot's fingerprint of the usage (its request id and content): what tells a resend from a
#: reused sequence; the engine's :func:`~chargepath.engine.session_fingerprint` is this long
SESSION_FP_CHARS = 16
#: bytes per slot: sequence, decision, reason, recorded (a digit each), retry, decision id,
#: fingerprint
SESSION_SLOT = SESSION_SEQ_DIGITS + 3 + SESSION_RETRY_DIGITS + SESSION_ID_CHARS + SESSION_FP_CHARS
#: 0-based offsets in a slot (what a reader of the session key outside Lua needs)
SESSION_SLOT_RECORDED = SESSION_SEQ_DIGITS + 2
SESSION_SLOT_ID = SESSION_SEQ_DIGITS + 3 + SESSION_RETRY_DIGITS
SESSION_SEQ_FORMAT = f"%0{SESSION_SEQ_DIGITS}d"
SESSION_RETRY_FORMAT = f"%0{SESSION_RETRY_DIGITS}d"
SESSION_RETRY_MAX = 10**SESSION_RETRY_DIGITS - 1
SESSION_RETRY_ZERO = "0" * SESSION_RETRY_DIGITS
SESSION_ID_FORMAT = f"%-{SESSION_ID_CHARS}s"
SESSION_FP_FORMAT = f"%-{SESSION_FP_CHARS}s"

# -- texts the scripts write, read back by the ledger and the trail readers -----------------

US = "\x1f"  # between the fields of a usage, a ledger entry, a trail decision
RS = "\x1e"  # between the decisions of a trail entry

_DECISIONS: dict[int, Decision] = {d.value: d for d in Decision}
_REASONS: dict[int, Reason] = {r.value: r for r in Reason}

CONFLICT = FieldViolation(
    "request_id", "was already used for a different usage within the dedup window"
)


def reused_sequence(sequence: int, decision_id: str) -> FieldViolation:
    """A session sequence already decided for another usage (another request id, or the
    same one with other content): refused, never answered from the other usage's record."""
    return FieldViolation(
        "sequence",
        f"sequence {sequence} of this session was already used for another usage (decision "
        f"{decision_id}); a restarted controller must start a new session or continue after "
        "its highest sequence",
    )


WINDOW_MISS = FieldViolation(
    "sequence",
    "more than the session's replay window behind its highest sequence; whether it was "
    "recorded is no longer known, so nothing was done",
)


def lua_constants() -> dict[str, int | str]:
    """Every constant the scripts share with Python, by the name Lua knows it by: the enum
    codes (``ALLOW``, ``RATE_LIMITED``, ``KIND_RATE``, ``PERIOD_MONTH``...) and every public
    upper-case number or text of this module."""
    out: dict[str, int | str] = {}
    out.update({d.name: int(d) for d in Decision})
    out.update({r.name: int(r) for r in Reason})
    out.update({f"KIND_{k.name}": int(k) for k in LimitKind})
    out.update({f"PERIOD_{p.name}": int(p) for p in Period})
    out.update(HOUR_MS=HOUR_MS, DAY_MS=DAY_MS, WEEK_MS=WEEK_MS, WEEK_OFFSET_MS=WEEK_OFFSET_MS)
    out.update(MAX_DEBT=MAX_DEBT)
    for name, value in globals().items():
        if name.isupper() and not name.startswith("_") and isinstance(value, int | str):
            out[name] = value
    return out


def _lua_value(value: int | str) -> str:
    if isinstance(value, int):
        return str(value)
    if value.isprintable() and "'" not in value and "\\" not in value:
        return f"'{value}'"
    return "'" + "".join(f"\\{ord(c)}" for c in value) + "'"


# a Lua string literal or comment (left as it is), or a name
_LUA_TOKEN = re.compile(r"""--[^\n]*|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"|\b[A-Z][A-Z0-9_]*\b""")


def with_constants(source: str) -> str:
    """``source`` with each shared constant's name (outside comments and strings) replaced by
    its value, and a comment in front listing those used. Literals, not locals: a local of the
    main chunk is an upvalue in every function that reads it, one more VM instruction per
    use, and the decision script reads these in its innermost loops."""
    constants = lua_constants()
    used: dict[str, str] = {}

    def substitute(m: re.Match[str]) -> str:
        token = m.group(0)
        value = constants.get(token)
        if value is None or token.startswith(("--", "'", '"')):
            return token
        used[token] = _lua_value(value)
        return used[token]

    body = _LUA_TOKEN.sub(substitute, source)
    listed = " ".join(f"{n}={v}" for n, v in sorted(used.items()))
    header = "-- constants of chargepath.store.protocol, written in below as literals:\n"
    header += "".join(
        f"--   {line}\n" for line in textwrap.wrap(listed, 94, break_long_words=False)
    )
    return header + body


_INCLUDE = "-- #include "


def assemble(source: str) -> str:
    """A runnable script from Lua ``source``: each line ``-- #include lib/NAME.lua`` replaced by
    that file of ``store/scripts`` (once, however often it is asked for; a library may include
    others), then the shared constants written in (:func:`with_constants`). Redis scripts
    cannot load modules, so shared Lua is inlined at load."""
    folder = resources.files("chargepath.store") / "scripts"
    seen: set[str] = set()

    def inline(text: str) -> list[str]:
        out = []
        for line in text.splitlines():
            if line.startswith(_INCLUDE):
                name = line.removeprefix(_INCLUDE).strip()
                if name not in seen:
                    seen.add(name)
                    out.extend(inline((folder / name).read_text("utf-8")))
            else:
                out.append(line)
        return out

    return with_constants("\n".join(inline(source)) + "\n")


@functools.cache
def read_script(name: str) -> str:
    """The script ``store/scripts/NAME``, assembled (see :func:`assemble`); package data, so
    assembled once per process."""
    folder = resources.files("chargepath.store") / "scripts"
    return assemble((folder / name).read_text(encoding="utf-8"))


# -- encoding -------------------------------------------------------------------------------


class BatchSettings(Protocol):
    """The store's settings every batch carries (a :class:`~chargepath.store.redis_store.
    RedisStore` has them): windows and ttl in ms, the trail length in decisions."""

    dedup_window_ms: int
    #: how long the trail keeps every decision, whatever the tenant's rate (at most
    #: ``dedup_window_ms``); beyond it, about ``recent_length`` decisions
    explain_window_ms: int
    session_ttl_ms: int
    session_window: int
    recent_length: int
    clock_offset_ms: int


def spec_values(limit: Limit, counter: int, grants: int) -> tuple[Any, ...]:
    """The :data:`SPEC_SLOTS` payload values of ``limit`` counted at key index ``counter`` (a
    quota's grants at key index ``grants``)."""
    if limit.kind is LimitKind.RATE:
        return (
            counter, int(LimitKind.RATE), int(limit.soft),
            limit.capacity_sub, limit.scale, limit.refill_per_ms, limit.capacity,
            limit.name,
        )  # fmt: skip
    return (
        counter, int(LimitKind.QUOTA), int(limit.soft),
        limit.amount, int(limit.period), grants, 0,
        limit.name,
    )  # fmt: skip


def encode_batch(
    tenant: str,
    policy_version: int,
    items: Sequence[DecideItem],
    settings: BatchSettings,
    *,
    ok_limits: bool = True,
    deadline_ms: int = 0,
    doubt_ms: int = 0,
    replay: bool = False,
) -> tuple[list[str], list[Any]]:
    """decide.lua's KEYS and ARGV for ``items`` (all of ``tenant``); ``deadline_ms``: the
    batch's deadline on Redis' clock (0: none; see :class:`~chargepath.store.clock.
    StoreClock`); ``doubt_ms``: see :data:`ARG_DOUBT`; ``replay``: see :data:`ARG_REPLAY`."""
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
    # specs once as a set, each distinct subject once; a usage names its set and subject.
    # Memoised by the identity of the limits tuple (a Resolution is shared by every usage it
    # resolved), which lives for the call.
    specs: list[Any] = []
    spec_of: dict[tuple[int, str, str], int] = {}
    sets: list[list[int]] = []
    set_of: dict[tuple[int, str, str], int] = {}
    subjects: list[str] = []
    subject_of: dict[Any, int] = {}
    needs: dict[int, tuple[bool, bool]] = {}
    usages: list[Any] = []
    # A tenant the policy does not name: nothing is written for it, not even the trail.
    known = bool(items) and items[0].resolution.tenant_known
    recent_length = settings.recent_length if known else 0
    with_trace = recent_length > 0
    caps = items[0].resolution.caps if known else NO_CAPS
    cap_values: list[Any] = []
    for cap, name in CAP_NAMES.items():
        bound = getattr(caps, name)
        cap_values += (idx(caps_key(tenant, cap)) if bound else 0, bound)
    spec_caps: list[Any] | None = [] if caps.slices or caps.keys else None
    for item in items:
        u = item.usage
        res = item.resolution
        limits = res.limits
        sl = u.subject.slice
        k = u.subject.key
        report = u.mode is Mode.REPORT
        flags = (
            (USAGE_REPORT if report else 0)
            | (USAGE_ENTITLED if res.entitled else 0)
            | (USAGE_SUSPENDED if item.suspended else 0)
        )
        doubt_idx = 0
        if u.session_id:
            flags |= USAGE_SESSION
            kidx = idx(f"{prefix}s:{u.session_id}")
            if doubt_ms:
                doubt_idx = idx(f"{prefix}d:{u.request_id}")
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
                        grants = (
                            idx(grants_key(tenant, lim, sl, k))
                            if lim.kind is LimitKind.QUOTA
                            else 0
                        )
                        specs += spec_values(lim, counter, grants)
                        if spec_caps is not None:
                            spec_caps += _spec_cap(lim, isl, ik, caps)
                        n = spec_of[spec_key] = len(specs) // SPEC_SLOTS
                    members.append(n)
                sets.append(members)
                set_no = set_of[set_key] = len(sets)
        subject_no = subject_of.get(u.subject)
        if subject_no is None:
            subjects += (sl, k)
            subject_no = subject_of[u.subject] = len(subjects) // 2
        mode = "report" if report else "admit"
        text = (
            f"{u.request_id}{US}{item.decision_id}{US}{sl}{US}{k}{US}{u.metric}"
            f"{US}{u.amount}{US}{mode}"
        )
        aggregate = res.aggregate_ms if u.mode is Mode.ADMIT else 0
        if aggregate:
            tail = f"|{sl}|{k}|{u.metric}|{mode}"
        elif u.labels or u.occurred_at_ms:
            labels = json.dumps(dict(u.labels), separators=(",", ":")) if u.labels else ""
            tail = f"{US}{u.occurred_at_ms}{US}{labels}"
        else:
            tail = ""
        usages += (
            flags, u.amount, kidx, u.sequence, item.fingerprint, item.decision_id, set_no,
            aggregate, text, tail, item.trace_id if with_trace else "", subject_no, doubt_idx,
        )  # fmt: skip
    args: list[Any] = [
        policy_version,
        settings.clock_offset_ms,
        settings.dedup_window_ms,
        settings.session_ttl_ms,
        settings.session_window,
        recent_length,
        msgpack.packb((specs, sets, subjects, usages, cap_values + (spec_caps or []))),
        "1" if ok_limits else "0",
        deadline_ms,
        doubt_ms,
        "1" if replay else "0",
        settings.explain_window_ms,
    ]
    return keys, args


def _spec_cap(limit: Limit, slice_: str, key: str, caps: Caps) -> tuple[int, str]:
    """The cap a spec's counter counts under, and its member there: (0, "") for none."""
    if limit.scope is Scope.SLICE and caps.slices:
        return CAP_SLICES, slice_
    if limit.scope is Scope.KEY and caps.keys:
        return CAP_KEYS, f"{slice_}{US}{key}"
    return 0, ""


# -- decoding -------------------------------------------------------------------------------

_DECISION_MASK = (1 << DECISION_BITS) - 1
_REASON_MASK = (1 << REASON_BITS) - 1
_FLAGS_MASK = (1 << VERDICT_FLAG_BITS) - 1
_REASON_SHIFT = DECISION_BITS
_FLAGS_SHIFT = DECISION_BITS + REASON_BITS
_LIMITS_SHIFT = _FLAGS_SHIFT + VERDICT_FLAG_BITS


def reply_code(decision: Decision, reason: Reason, flags: int, limits: int) -> int:
    """The code decide.lua replies for a verdict (what its Lua computes, stated in Python)."""
    return int(decision) + REASON_UNIT * int(reason) + FLAGS_UNIT * flags + LIMITS_UNIT * limits


def split_code(code: int) -> tuple[Decision, Reason, int, int]:
    """The inverse of :func:`reply_code`: (decision, reason, verdict flags, limits)."""
    return (
        _DECISIONS[code & _DECISION_MASK],
        _REASONS[(code >> _REASON_SHIFT) & _REASON_MASK],
        (code >> _FLAGS_SHIFT) & _FLAGS_MASK,
        code >> _LIMITS_SHIFT,
    )


def decode_reply(reply: Sequence[Any], items: Sequence[DecideItem], version: int) -> list[Verdict]:
    """Verdicts, in the order of ``items``, from decide.lua's reply to them (see the module
    docstring); raises :class:`StalePolicyError` for a stale reply and
    :class:`StoreDeadlineError` for a late one (nothing written either way)."""
    if reply[0] != REPLY_DECIDED:
        if reply[0] == REPLY_LATE:
            raise StoreDeadlineError(int(reply[1]))
        raise StalePolicyError(int(reply[1]))
    now = int(reply[1])
    pos = 2
    out: list[Verdict] = []
    append = out.append
    # locals: this loop runs once per usage on the gateway's hot path
    decisions, reasons, rate = _DECISIONS, _REASONS, LimitKind.RATE
    with_id, recorded_bit = VERDICT_REPLAYED | VERDICT_CONFLICT, VERDICT_RECORDED
    replayed_bit, refused = VERDICT_REPLAYED, VERDICT_CONFLICT | VERDICT_WINDOW_MISS
    cap_reached = int(Reason.CAP_REACHED)
    for item in items:
        code = reply[pos]
        retry = reply[pos + 1]
        pos += 2
        flags = (code >> _FLAGS_SHIFT) & _FLAGS_MASK
        reason = (code >> _REASON_SHIFT) & _REASON_MASK
        did = item.decision_id
        message = ""
        if flags & with_id:
            did = reply[pos] or did
            pos += 1
        elif reason == cap_reached:
            message = cap_message(reply[pos], item.resolution.caps)
            pos += 1
        states: tuple[LimitState, ...] = ()
        nl = code >> _LIMITS_SHIFT
        if nl:
            limits: list[LimitState] = []
            for lim in item.resolution.limits[:nl]:
                rem = reply[pos]
                reset = reply[pos + 1]
                pos += 2
                if lim.kind is rate:
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
        violations: tuple[FieldViolation, ...] = ()
        if flags & refused:
            if not flags & VERDICT_CONFLICT:
                violations = (WINDOW_MISS,)
            elif item.usage.session_id:
                violations = (reused_sequence(item.usage.sequence, did.rstrip()),)
            else:
                violations = (CONFLICT,)
        append(
            Verdict(
                request_id=item.usage.request_id,
                decision=decisions[code & _DECISION_MASK],
                reason=reasons[reason],
                decision_id=did,
                policy_version=version,
                retry_after_ms=retry,
                limits=states,
                recorded=bool(flags & recorded_bit),
                replayed=bool(flags & replayed_bit),
                message=str(violations[0]) if violations else message,
                decided_at_ms=now,
                trace_id=item.trace_id,
                violations=violations,
            )
        )
    return out


# -- reverse.lua ----------------------------------------------------------------------------


def encode_reversal(
    tenant: str, reversal: Reversal, session_window: int, clock_offset_ms: int = 0
) -> tuple[list[str], list[Any]]:
    """reverse.lua's KEYS and ARGV for one reversal (see its header): the limits credited
    back are those of the reversed item's resolution (the ones its late decision took
    from)."""
    u = reversal.item.usage
    prefix = tenant_prefix(tenant)
    keys = [prefix + "ledger"]
    if u.session_id:
        # and its request id's record, written too if the batch ran in doubt (ARG_DOUBT)
        keys += [f"{prefix}s:{u.session_id}", f"{prefix}d:{u.request_id}"]
        sequence = u.sequence
    else:
        keys.append(f"{prefix}d:{u.request_id}")
        sequence = -1
    mode = "report" if u.mode is Mode.REPORT else "admit"
    v = reversal.verdict
    args: list[Any] = [
        reversal.item.decision_id, sequence, session_window,
        u.request_id, u.subject.slice, u.subject.key, u.metric, u.amount, mode,
        int(v.decision), int(v.reason), reversal.policy_version,
    ]  # fmt: skip
    specs: list[Any] = []
    for lim in reversal.item.resolution.limits:
        keys.append(limit_key(tenant, lim, u.subject.slice, u.subject.key))
        specs += spec_values(lim, len(keys), 0)
    args += [clock_offset_ms, reversal.decided_at_ms, msgpack.packb(specs), tenant]
    return keys, args


# -- read_limits.lua ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CounterReading:
    """A limit's live counter as read_limits.lua reads it: whole units, milliseconds."""

    remaining: int
    capacity: int
    used: int
    granted: int
    reset_after_ms: int
    #: live grants of a quota: (grant id, amount, expires_at_ms (0: end of period), note)
    grants: tuple[tuple[str, int, int, str], ...] = ()


def encode_read(
    tenant: str, limits: Sequence[Limit], slice_: str, key: str, clock_offset_ms: int
) -> tuple[list[str], list[Any]]:
    """read_limits.lua's KEYS and ARGV for ``limits`` of the subject (tenant, slice, key)."""
    keys = [grant_notes_key(tenant)]
    specs: list[Any] = []
    for lim in limits:
        keys.append(limit_key(tenant, lim, slice_, key))
        grants = 0
        if lim.kind is LimitKind.QUOTA:
            keys.append(grants_key(tenant, lim, slice_, key))
            grants = len(keys)
        specs += spec_values(lim, len(keys) - (1 if grants else 0), grants)
    return keys, [clock_offset_ms, msgpack.packb(specs)]


def decode_read(reply: Sequence[Any], count: int) -> tuple[int, list[CounterReading]]:
    """(now_ms, one reading per limit) from read_limits.lua's reply (see its header)."""
    now = int(reply[0])
    pos = 1
    out = []
    for _ in range(count):
        remaining, capacity, used, granted, reset, n = (int(x) for x in reply[pos : pos + 6])
        pos += 6
        grants = []
        for _ in range(n):
            gid, amount, expires, note = reply[pos : pos + 4]
            grants.append((str(gid), int(amount), int(expires), str(note or "")))
            pos += 4
        out.append(CounterReading(remaining, capacity, used, granted, reset, tuple(grants)))
    return now, out


# -- lease.lua, lease_sweep.lua, lease_read.lua (quota leases) -------------------------------
#
# Payload of lease.lua (ARGV[LEASE_ARG_PAYLOAD], one MessagePack array of three arrays):
#
# 1. limit specs, flat, LSPEC_SLOTS values each: the SPEC_SLOTS of decide.lua's specs
#    (:func:`spec_values`), then the limit's lease terms: max_units, max_share_pct,
#    validity_ms, renew_below_pct.
# 2. limit sets: arrays of spec numbers, in the order of an ask's limits.
# 3. asks, flat, ASK_SLOTS values each (ASK_*): flags (ASK_RELEASE, ASK_SUSPENDED, ASK_NEW),
#    requested, used, dedup key index, lease key index, lease id, fingerprint, decision id,
#    limit set number (0: none), request id, slice, key, metric, holder, labels (JSON or
#    ""), trace id.
#
# Reply: {REPLY_STALE, v} | {REPLY_LATE, time_ms} | {REPLY_DECIDED, now_ms, answer...}, an
# answer being an array of ANS_SLOTS values (ANS_*), then remaining, reset_after_ms and
# capacity per limit of the ask's set. A dedup record (``cp:{T}:ld:<request_id>``) holds
# MessagePack {fingerprint, answer}.


def lease_key(tenant: str, lease_id: str) -> str:
    """An open lease (hash; lib/lease.lua lists its fields)."""
    return f"{tenant_prefix(tenant)}lease:{lease_id}"


def lease_index_key(tenant: str) -> str:
    """The tenant's open leases: lease id scored by expiry, ms (sorted set)."""
    return f"{tenant_prefix(tenant)}leases"


def lease_trail_key(tenant: str) -> str:
    """The tenant's recent lease decisions (stream, capped): what explain reads."""
    return f"{tenant_prefix(tenant)}ltrail"


def lease_dedup_key(tenant: str, request_id: str) -> str:
    """The first answer to a lease ask's request id, for the dedup window."""
    return f"{tenant_prefix(tenant)}ld:{request_id}"


#: the terms sent for a limit without lease settings, on an ask that asks for nothing
NO_TERMS = LeaseTerms(max_units=0, max_share_pct=0, validity_ms=0, renew_below_pct=0)

LEASE_KEY_INDEX = 3
LEASE_KEY_TRAIL = 4

LEASE_ARG_POLICY_VERSION = 1
LEASE_ARG_CLOCK_OFFSET = 2
LEASE_ARG_DEDUP_WINDOW = 3
LEASE_ARG_DEADLINE = 4
LEASE_ARG_TRAIL_LENGTH = 5
LEASE_ARG_PAYLOAD = 6
#: the most leases a tenant may hold open (its lease index's members, expired ones not yet
#: swept included): the policy's ``caps.leases``; 0: no bound
LEASE_ARG_MAX_OPEN = 7
LEASE_ARG_TENANT = 8

LSPEC_SLOTS = SPEC_SLOTS + 4
LSPEC_MAX_UNITS = SPEC_SLOTS + 1
LSPEC_SHARE = SPEC_SLOTS + 2
LSPEC_VALIDITY = SPEC_SLOTS + 3
LSPEC_RENEW = SPEC_SLOTS + 4

ASK_SLOTS = 16
ASK_FLAGS = 1
ASK_REQUESTED = 2
ASK_USED = 3
ASK_DEDUP_KEY = 4
ASK_LEASE_KEY = 5
ASK_LEASE_ID = 6
ASK_FINGERPRINT = 7
ASK_DECISION_ID = 8
ASK_SET = 9
ASK_REQUEST_ID = 10
ASK_SLICE = 11
ASK_KEY = 12
ASK_METRIC = 13
ASK_HOLDER = 14
ASK_LABELS = 15
ASK_TRACE_ID = 16

# flag bits of an ask
ASK_RELEASE = 1
ASK_SUSPENDED = 2
ASK_NEW = 4  # open a lease (its id is the payload's, made by the gateway)

ANS_SLOTS = 14
ANS_DECISION = 1
ANS_REASON = 2
ANS_FLAGS = 3
ANS_LEASE_ID = 4
ANS_GRANTED = 5
ANS_AVAILABLE = 6
ANS_VALID_FOR = 7
ANS_RENEW_BELOW = 8
ANS_RETRY = 9
ANS_RECORDED = 10
ANS_OVERAGE = 11
ANS_REFUNDED = 12
ANS_DECISION_ID = 13
ANS_DECIDED_AT = 14

# flag bits of an answer
LEASE_REPLAYED = 1
LEASE_CONFLICT = 2  # the request id was used for another ask
LEASE_MISMATCH = 4  # the lease is for another subject or metric: nothing done
LEASE_FINAL = 8
LEASE_CLOSED = 16
LEASE_CAPPED = 32  # refused: the tenant holds the most open leases it may (CAP_REACHED)

# a hold of a lease (its "hd" field, MessagePack, HOLD_SLOTS values each)
HOLD_SLOTS = 7
HOLD_KEY = 1
HOLD_KIND = 2
HOLD_CAPACITY_SUB = 3  # a quota's period code
HOLD_SCALE = 4
HOLD_REFILL_PER_MS = 5
HOLD_UNITS = 6
HOLD_START = 7

LEASE_CONFLICT_VIOLATION = FieldViolation(
    "request_id", "was already used for a different lease ask within the dedup window"
)
LEASE_MISMATCH_VIOLATION = FieldViolation(
    "lease_id", "is a lease of another subject or metric; nothing was done"
)


class LeaseBatchSettings(Protocol):
    """The store's settings a lease batch carries."""

    dedup_window_ms: int
    recent_length: int
    clock_offset_ms: int


def lease_cap_message(caps: Caps) -> str:
    """The message of a lease refused CAP_REACHED: the cap, its bound, what it counts."""
    return (
        f"caps.leases: the tenant's {caps.leases} open leases (expired ones not yet swept "
        "included) are all in use: release one or let one expire; nothing was granted"
    )


def encode_lease_batch(
    tenant: str,
    policy_version: int,
    items: Sequence[LeaseItem],
    lease_ids: Sequence[str],
    settings: LeaseBatchSettings,
    *,
    deadline_ms: int = 0,
) -> tuple[list[str], list[Any]]:
    """lease.lua's KEYS and ARGV for ``items`` (all of ``tenant``); ``lease_ids``: per item,
    the lease it is about (the ask's, or a new id for an ask that opens one)."""
    prefix = tenant_prefix(tenant)
    keys: list[str] = [
        prefix + "ent", prefix + "ledger", lease_index_key(tenant), lease_trail_key(tenant),
    ]  # fmt: skip
    index: dict[str, int] = {}

    def idx(k: str) -> int:
        i = index.get(k)
        if i is None:
            keys.append(k)
            i = index[k] = len(keys)
        return i

    specs: list[Any] = []
    spec_of: dict[tuple[str, str], int] = {}
    sets: list[list[int]] = []
    set_of: dict[tuple[int, ...], int] = {}
    asks: list[Any] = []
    for item, lease_id in zip(items, lease_ids, strict=True):
        a = item.ask
        sl, k = a.subject.slice, a.subject.key
        members: list[int] = []
        for lim in item.resolution.limits:
            counter = limit_key(tenant, lim, sl, k)
            spec_key = (counter, lim.name)
            n = spec_of.get(spec_key)
            if n is None:
                terms = lim.lease
                if terms is None:
                    # a report or release on a lease whose limit lost its lease settings
                    # (the caller asks for nothing then): no terms are needed
                    if a.requested:
                        raise ValueError(f"limit {lim.name!r} has no lease terms")
                    terms = NO_TERMS
                grants = idx(grants_key(tenant, lim, sl, k)) if lim.kind is LimitKind.QUOTA else 0
                specs += spec_values(lim, idx(counter), grants)
                specs += (
                    terms.max_units, terms.max_share_pct, terms.validity_ms,
                    terms.renew_below_pct,
                )  # fmt: skip
                n = spec_of[spec_key] = len(specs) // LSPEC_SLOTS
            members.append(n)
        set_no = 0
        if members:
            set_no = set_of.get(tuple(members), 0)
            if not set_no:
                sets.append(members)
                set_no = set_of[tuple(members)] = len(sets)
        flags = (
            (ASK_RELEASE if a.release else 0)
            | (ASK_SUSPENDED if item.suspended else 0)
            | (ASK_NEW if not a.lease_id else 0)
        )
        labels = json.dumps(dict(a.labels), separators=(",", ":")) if a.labels else ""
        asks += (
            flags, a.requested, a.used, idx(lease_dedup_key(tenant, a.request_id)),
            idx(lease_key(tenant, lease_id)), lease_id, item.fingerprint, item.decision_id,
            set_no, a.request_id, sl, k, a.metric, item.holder, labels, item.trace_id,
        )  # fmt: skip
    args: list[Any] = [
        policy_version,
        settings.clock_offset_ms,
        settings.dedup_window_ms,
        deadline_ms,
        settings.recent_length,
        msgpack.packb((specs, sets, asks)),
        # one tenant per batch: its caps are those of every item
        items[0].resolution.caps.leases if items else 0,
        tenant,
    ]
    return keys, args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_lease_reply(
    reply: Sequence[Any], items: Sequence[LeaseItem], version: int
) -> list[LeaseAnswer]:
    """Answers, in the order of ``items``, from lease.lua's reply; raises
    :class:`StalePolicyError` or :class:`StoreDeadlineError` (nothing written)."""
    if reply[0] != REPLY_DECIDED:
        if reply[0] == REPLY_LATE:
            raise StoreDeadlineError(int(reply[1]))
        raise StalePolicyError(int(reply[1]))
    out: list[LeaseAnswer] = []
    for item, ans in zip(items, reply[2:], strict=True):
        flags = int(ans[ANS_FLAGS - 1])
        limits: list[LimitState] = []
        values = ans[ANS_SLOTS:]
        for n, lim in enumerate(item.resolution.limits):
            if 3 * n + 2 >= len(values):
                break
            rem, reset, cap = (int(x) for x in values[3 * n : 3 * n + 3])
            limits.append(
                LimitState(lim.name, lim.kind, lim.scope, rem, cap, reset, lim.soft, rem < 0)
            )
        violations: tuple[FieldViolation, ...] = ()
        if flags & LEASE_CONFLICT:
            violations = (LEASE_CONFLICT_VIOLATION,)
        elif flags & LEASE_MISMATCH:
            violations = (LEASE_MISMATCH_VIOLATION,)
        out.append(
            LeaseAnswer(
                request_id=item.ask.request_id,
                decision=_DECISIONS[int(ans[ANS_DECISION - 1])],
                reason=_REASONS[int(ans[ANS_REASON - 1])],
                lease_id=_text(ans[ANS_LEASE_ID - 1]),
                granted=int(ans[ANS_GRANTED - 1]),
                available=int(ans[ANS_AVAILABLE - 1]),
                valid_for_ms=int(ans[ANS_VALID_FOR - 1]),
                renew_below=int(ans[ANS_RENEW_BELOW - 1]),
                final_units=bool(flags & LEASE_FINAL),
                retry_after_ms=int(ans[ANS_RETRY - 1]),
                recorded=int(ans[ANS_RECORDED - 1]),
                overage=int(ans[ANS_OVERAGE - 1]),
                refunded=int(ans[ANS_REFUNDED - 1]),
                limits=tuple(limits),
                policy_version=version,
                replayed=bool(flags & LEASE_REPLAYED),
                message=(
                    str(violations[0])
                    if violations
                    else lease_cap_message(item.resolution.caps)
                    if flags & LEASE_CAPPED
                    else ""
                ),
                violations=violations,
                decided_at_ms=int(ans[ANS_DECIDED_AT - 1]),
                closed=bool(flags & LEASE_CLOSED),
                decision_id=_text(ans[ANS_DECISION_ID - 1]),
            )
        )
    return out
