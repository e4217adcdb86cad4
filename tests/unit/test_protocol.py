"""The Python–Lua protocol without Redis: golden payloads and replies, codes and flags, and the
constants the scripts get from chargepath.store.protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import msgpack
import pytest

from chargepath.core.model import (
    Decision,
    FieldViolation,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Scope,
    Subject,
    Usage,
    Verdict,
)
from chargepath.core.periods import Period
from chargepath.core.plans import load_policy_text
from chargepath.core.policy import Policy
from chargepath.store import protocol
from chargepath.store.base import (
    DecideItem,
    Reversal,
    StalePolicyError,
    StoreDeadlineError,
    StoreUnavailableError,
)
from chargepath.store.protocol import (
    RS,
    US,
    decode_reply,
    encode_batch,
    encode_reversal,
    lua_constants,
    read_script,
    reply_code,
    spec_values,
    split_code,
)
from chargepath_protos.v1 import metering_pb2 as pb

POLICY = """
metrics: [{name: api.sms.send}, {name: slice.bytes}, {name: slice.sessions}]
plans:
  - name: p
    limits:
      - {name: burst, metric: api.sms.send, scope: key,
         rate: {capacity: 10, refill: 3, per: second}}
      - {name: monthly, metric: "api.*", scope: tenant, soft: true,
         quota: {amount: 500, per: month}}
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000, refill: 1000, per: second}}
  - name: agg
    ledger: {mode: aggregate, interval_s: 60}
tenants:
  - {name: acme, plan: p,
     caps: {request_ids: null, sessions: null, slices: null, keys: null}}
  - {name: capped, plan: p, caps: {request_ids: 5, sessions: 6, slices: 7, keys: 8}}
"""


@dataclass
class Settings:
    dedup_window_ms: int = 600_000
    session_ttl_ms: int = 86_400_000
    session_window: int = 128
    recent_length: int = 1000
    clock_offset_ms: int = 0
    explain_window_ms: int = 120_000


def _items() -> list[DecideItem]:
    policy = Policy(load_policy_text(POLICY), 7)
    usages = [
        Usage("r-1", Subject("acme", "", "k1"), "api.sms.send", 2, Mode.ADMIT),
        Usage(
            "r-2",
            Subject("acme", "s1", ""),
            "slice.bytes",
            1500,
            Mode.REPORT,
            labels=(("cell", "42"),),
            occurred_at_ms=1_800_000_000_000,
            session_id="sess",
            sequence=5,
        ),
        Usage("r-3", Subject("acme", "", "k1"), "api.sms.send", 1, Mode.ADMIT),
        Usage("r-4", Subject("acme"), "slice.sessions", 1, Mode.ADMIT),
    ]
    return [
        DecideItem(
            u,
            policy.resolve(u.subject, u.metric),
            f"{i:032x}",
            f"fp{i}",
            trace_id="ab" * 16,
            suspended=i == 2,
        )
        for i, u in enumerate(usages)
    ]


def test_a_batch_encodes_to_the_golden_keys_and_payload() -> None:
    keys, args = encode_batch(
        "acme",
        7,
        _items(),
        Settings(),
        ok_limits=False,
        deadline_ms=1_800_000_000_050,
        doubt_ms=1_800_000_000_025,
    )
    p = "cp:{acme}:"
    # a session usage's request-id record is named too when the batch has a doubt time
    assert keys == [
        p + "ent", p + "ledger", p + "recent", p + "agg",
        p + "d:r-1", p + "r:burst::k1", p + "q:monthly::", p + "g:monthly::",
        p + "s:sess", p + "d:r-2", p + "r:bytes:s1:",
        p + "d:r-3", p + "d:r-4",
    ]  # fmt: skip
    assert args[:6] == [7, 0, 600_000, 86_400_000, 128, 1000]
    assert args[7] == "0"
    assert args[protocol.ARG_DEADLINE - 1] == 1_800_000_000_050
    assert args[protocol.ARG_DOUBT - 1] == 1_800_000_000_025
    assert args[protocol.ARG_REPLAY - 1] == "0"
    assert args[protocol.ARG_EXPLAIN_WINDOW - 1] == 120_000
    assert len(args) == protocol.ARG_EXPLAIN_WINDOW
    specs, sets, subjects, usages, caps = msgpack.unpackb(args[6])
    assert caps == [0] * 2 * protocol.CAP_COUNT  # acme has no caps
    # burst: 3/s -> scale 1000 / gcd(3, 1000) = 1000 sub-units per unit, 3 per ms
    assert specs == [
        6, 1, 0, 10_000, 1000, 3, 10, "burst",
        7, 2, 1, 500, 3, 8, 0, "monthly",
        11, 1, 0, 1000, 1, 1, 1000, "bytes",
    ]  # fmt: skip
    # r-1 and r-3 share their set (and their subject); r-4 (no limit matches) has none
    assert sets == [[1, 2], [3]]
    assert subjects == ["", "k1", "s1", "", "", ""]
    text1 = US.join(["r-1", f"{0:032x}", "", "k1", "api.sms.send", "2", "admit"])
    text2 = US.join(["r-2", f"{1:032x}", "s1", "", "slice.bytes", "1500", "report"])
    text3 = US.join(["r-3", f"{2:032x}", "", "k1", "api.sms.send", "1", "admit"])
    text4 = US.join(["r-4", f"{3:032x}", "", "", "slice.sessions", "1", "admit"])
    trace = "ab" * 16
    assert usages == [
        2, 2, 5, 0, "fp0", f"{0:032x}", 1, 0, text1, "", trace, 1, 0,
        1 | 2 | 8, 1500, 9, 5, "fp1", f"{1:032x}", 2, 0, text2,
        f'{US}1800000000000{US}{{"cell":"42"}}', trace, 2, 10,
        2 | 4, 1, 12, 0, "fp2", f"{2:032x}", 1, 0, text3, "", trace, 1, 0,
        0, 1, 13, 0, "fp3", f"{3:032x}", 0, 0, text4, "", trace, 3, 0,
    ]  # fmt: skip
    # without a doubt time, a session usage names only its session; a replay says so
    keys, args = encode_batch("acme", 7, _items(), Settings(), replay=True)
    assert p + "d:r-2" not in keys and args[protocol.ARG_REPLAY - 1] == "1"


def test_the_payload_offsets_name_the_encoded_slots() -> None:
    keys, args = encode_batch("acme", 7, _items()[:1], Settings(recent_length=0))
    specs, _, subjects, usages, _ = msgpack.unpackb(args[6])
    rate = specs[: protocol.SPEC_SLOTS]
    assert rate[protocol.SPEC_KEY - 1] == 6 and keys[5] == "cp:{acme}:r:burst::k1"
    assert rate[protocol.SPEC_KIND - 1] == LimitKind.RATE
    assert rate[protocol.RATE_CAPACITY_SUB - 1] == 10 * rate[protocol.RATE_SCALE - 1]
    assert rate[protocol.RATE_REFILL_PER_MS - 1] == 3
    assert rate[protocol.RATE_CAPACITY - 1] == 10
    assert rate[protocol.SPEC_NAME - 1] == "burst"
    quota = specs[protocol.SPEC_SLOTS : 2 * protocol.SPEC_SLOTS]
    assert quota[protocol.SPEC_SOFT - 1] == 1
    assert quota[protocol.QUOTA_AMOUNT - 1] == 500
    assert quota[protocol.QUOTA_PERIOD - 1] == Period.MONTH
    assert keys[quota[protocol.QUOTA_GRANTS_KEY - 1] - 1] == "cp:{acme}:g:monthly::"
    assert len(usages) == protocol.USAGE_SLOTS
    assert usages[protocol.USAGE_AMOUNT - 1] == 2
    assert keys[usages[protocol.USAGE_DEDUP_KEY - 1] - 1] == "cp:{acme}:d:r-1"
    assert usages[protocol.USAGE_TRACE_ID - 1] == ""  # no trail, no trace ids sent
    n = usages[protocol.USAGE_SUBJECT - 1]
    assert subjects[2 * n - 2 : 2 * n] == ["", "k1"]
    fixed = {
        protocol.KEY_ENTITLEMENT: "cp:{acme}:ent",
        protocol.KEY_LEDGER: "cp:{acme}:ledger",
        protocol.KEY_RECENT: "cp:{acme}:recent",
        protocol.KEY_AGGREGATES: "cp:{acme}:agg",
    }
    assert {i: keys[i - 1] for i in fixed} == fixed


def test_a_golden_reply_decodes_to_verdicts() -> None:
    items = _items()
    replayed = protocol.VERDICT_REPLAYED | protocol.VERDICT_RECORDED
    reply = [
        protocol.REPLY_DECIDED, 1_800_000_000_123,
        # r-1: ALLOW OK, recorded, two limits (burst: 8 left, refills in 667 ms; monthly)
        reply_code(Decision.ALLOW, Reason.OK, protocol.VERDICT_RECORDED, 2), 0,
        8, 667, 497, 100_000, 500,
        # r-2: a resend answered from its session slot: the record's decision id
        reply_code(Decision.THROTTLE, Reason.RATE_LIMITED, replayed, 0), 250, "f" * 32,
        # r-3: request id reused for another usage: DENY INVALID_USAGE, the first decision id
        reply_code(Decision.DENY, Reason.INVALID_USAGE, protocol.VERDICT_CONFLICT, 0), 0,
        "e" * 32,
        # r-4: a sequence beyond the window (here on a request id, for the decoding's sake)
        reply_code(Decision.DENY, Reason.INVALID_USAGE, protocol.VERDICT_WINDOW_MISS, 0), 0,
    ]  # fmt: skip
    # burst is exceeded: its reset is written as -1 - reset
    reply[5] = -1 - 667
    v1, v2, v3, v4 = decode_reply(reply, items, 7)
    assert v1 == Verdict(
        request_id="r-1",
        decision=Decision.ALLOW,
        reason=Reason.OK,
        decision_id=f"{0:032x}",
        policy_version=7,
        limits=(
            LimitState("burst", LimitKind.RATE, Scope.KEY, 8, 10, 667, False, True),
            LimitState("monthly", LimitKind.QUOTA, Scope.TENANT, 497, 500, 100_000, True, False),
        ),
        recorded=True,
        decided_at_ms=1_800_000_000_123,
        trace_id="ab" * 16,
    )
    assert (v2.decision, v2.retry_after_ms, v2.replayed, v2.recorded) == (
        Decision.THROTTLE,
        250,
        True,
        True,
    )
    assert v2.decision_id == "f" * 32 and v2.limits == ()
    assert v3.decision_id == "e" * 32 and not v3.replayed and not v3.recorded
    assert v3.violations == (
        FieldViolation(
            "request_id", "was already used for a different usage within the dedup window"
        ),
    )
    # the message is the violation's text, as it always was
    assert v3.message == (
        "request_id: was already used for a different usage within the dedup window"
    )
    assert v4.decision_id == f"{3:032x}"
    assert v4.message == (
        "sequence: more than the session's replay window behind its highest sequence; whether "
        "it was recorded is no longer known, so nothing was done"
    )
    assert [v.field for v in v4.violations] == ["sequence"]


def test_a_batch_without_a_deadline_sends_0() -> None:
    _, args = encode_batch("acme", 7, _items(), Settings())
    assert args[protocol.ARG_DEADLINE - 1] == 0


def test_a_reused_sequence_decodes_to_a_violation_naming_sequence() -> None:
    items = _items()[1:2]  # r-2: session "sess", sequence 5
    reply = [
        protocol.REPLY_DECIDED, 1_800_000_000_123,
        reply_code(Decision.DENY, Reason.INVALID_USAGE, protocol.VERDICT_CONFLICT, 0), 0,
        "c" * 32,
    ]  # fmt: skip
    (v,) = decode_reply(reply, items, 7)
    assert (v.decision, v.reason, v.recorded, v.replayed) == (
        Decision.DENY,
        Reason.INVALID_USAGE,
        False,
        False,
    )
    assert v.decision_id == "c" * 32
    assert v.violations == (
        FieldViolation(
            "sequence",
            f"sequence 5 of this session was already used for another usage (decision "
            f"{'c' * 32}); a restarted controller must start a new session or continue after "
            "its highest sequence",
        ),
    )


def test_a_late_reply_raises_with_redis_time_and_is_unavailable() -> None:
    with pytest.raises(StoreDeadlineError) as err:
        decode_reply([protocol.REPLY_LATE, 1_800_000_000_077], _items(), 7)
    assert err.value.store_now_ms == 1_800_000_000_077
    assert isinstance(err.value, StoreUnavailableError)  # the engine answers it degraded
    assert len({protocol.REPLY_STALE, protocol.REPLY_DECIDED, protocol.REPLY_LATE}) == 3


def test_the_session_slot_layout() -> None:
    # sequence, decision, reason, recorded, retry, decision id, fingerprint
    assert protocol.SESSION_SLOT == 20 + 3 + 10 + 32 + 16 == 81
    assert protocol.SESSION_SLOT_RECORDED == 22 and protocol.SESSION_SLOT_ID == 33
    assert protocol.SESSION_SLOT_ID + protocol.SESSION_ID_CHARS + protocol.SESSION_FP_CHARS == 81


def test_a_reversal_encodes_to_its_record_and_entry() -> None:
    items = _items()
    answered = Verdict(
        request_id="r-1",
        decision=Decision.DENY,
        reason=Reason.STORE_UNAVAILABLE,
        decision_id=f"{0:032x}",
        policy_version=7,
        degraded=True,
    )
    reversal = Reversal(items[0], answered, 7, 1_700_000_000_123)
    keys, args = encode_reversal("acme", reversal, 128, 25)
    # the record, then the counters of the limits the admit took from, to be credited back
    assert keys == [
        "cp:{acme}:ledger", "cp:{acme}:d:r-1", "cp:{acme}:r:burst::k1", "cp:{acme}:q:monthly::",
    ]  # fmt: skip
    burst, monthly = items[0].resolution.limits
    assert args == [
        f"{0:032x}", -1, 128, "r-1", "", "k1", "api.sms.send", 2, "admit",
        int(Decision.DENY), int(Reason.STORE_UNAVAILABLE), 7,
        25, 1_700_000_000_123,
        msgpack.packb([*spec_values(burst, 3, 0), *spec_values(monthly, 4, 0)]), "acme",
    ]  # fmt: skip
    keys, args = encode_reversal("acme", Reversal(items[1], answered, 7), 128)
    assert keys[:3] == ["cp:{acme}:ledger", "cp:{acme}:s:sess", "cp:{acme}:d:r-2"]
    assert args[1:3] == [5, 128]
    assert args[13] == 0  # when unknown: no quota is credited (reverse.lua)


def _capped_items() -> list[DecideItem]:
    policy = Policy(load_policy_text(POLICY), 7)
    usages = [
        Usage("r-1", Subject("capped", "s1", "k1"), "api.sms.send", 1, Mode.ADMIT),
        Usage("r-2", Subject("capped", "s1", ""), "slice.bytes", 9, Mode.REPORT, session_id="x"),
    ]
    return [
        DecideItem(u, policy.resolve(u.subject, u.metric), f"{i:032x}", f"fp{i}")
        for i, u in enumerate(usages)
    ]


def test_a_capped_tenant_sends_its_counts_and_each_specs_member() -> None:
    keys, args = encode_batch("capped", 7, _capped_items(), Settings())
    p = "cp:{capped}:"
    assert keys[4:8] == [
        p + "cap:request_ids", p + "cap:sessions", p + "cap:slices", p + "cap:keys",
    ]  # fmt: skip
    specs, _, _, _, caps = msgpack.unpackb(args[6])
    assert caps[: 2 * protocol.CAP_COUNT] == [5, 5, 6, 6, 7, 7, 8, 8]
    names = specs[protocol.SPEC_NAME - 1 :: protocol.SPEC_SLOTS]
    assert names == ["burst", "monthly", "bytes"]
    # per spec: burst counts (s1, k1) under keys, monthly (tenant scope) nothing, bytes s1
    assert caps[2 * protocol.CAP_COUNT :] == [
        protocol.CAP_KEYS, f"s1{US}k1", 0, "", protocol.CAP_SLICES, "s1",
    ]  # fmt: skip
    # the cap keys are the ones protocol names
    assert keys[4] == protocol.caps_key("capped", protocol.CAP_REQUEST_IDS)


def test_a_cap_reached_reply_names_the_cap_in_the_message() -> None:
    items = _capped_items()
    reply = [
        protocol.REPLY_DECIDED, 1_800_000_000_123,
        reply_code(Decision.DENY, Reason.CAP_REACHED, 0, 0), 0, protocol.CAP_KEYS,
        reply_code(Decision.DENY, Reason.CAP_REACHED, 0, 0), 0, protocol.CAP_SESSIONS,
    ]  # fmt: skip
    v1, v2 = decode_reply(reply, items, 7)
    assert (v1.decision, v1.reason, v1.recorded, v1.limits) == (
        Decision.DENY,
        Reason.CAP_REACHED,
        False,
        (),
    )
    assert v1.message.startswith("caps.keys: the tenant's 8 keys with live key-scoped")
    assert v2.message.startswith("caps.sessions: the tenant's 6 live stream sessions")
    assert v1.violations == () and v2.violations == ()


def test_an_unknown_tenant_sends_no_trail_and_no_caps() -> None:
    policy = Policy(load_policy_text(POLICY), 7)
    u = Usage("r-1", Subject("nobody", "s1", "k1"), "api.sms.send", 1, Mode.ADMIT)
    item = DecideItem(u, policy.resolve(u.subject, u.metric), "0" * 32, "fp", trace_id="ab")
    assert not item.resolution.tenant_known and not item.resolution.entitled
    keys, args = encode_batch("nobody", 7, [item], Settings(recent_length=1000))
    assert args[protocol.ARG_RECENT_LENGTH - 1] == 0
    assert not [k for k in keys if ":cap:" in k]
    _, _, _, usages, caps = msgpack.unpackb(args[6])
    assert caps == [0] * 2 * protocol.CAP_COUNT
    assert usages[protocol.USAGE_FLAGS - 1] & protocol.USAGE_ENTITLED == 0


def test_a_stale_reply_raises_with_the_stamped_version() -> None:
    with pytest.raises(StalePolicyError) as err:
        decode_reply([protocol.REPLY_STALE, 9], _items(), 7)
    assert err.value.stamped_version == 9


def test_codes_and_flags_round_trip() -> None:
    for d in Decision:
        for r in Reason:
            for flags in range(1 << protocol.VERDICT_FLAG_BITS):
                for n in (0, 1, 7, 300):
                    assert split_code(reply_code(d, r, flags, n)) == (d, r, flags, n)
    bits = [
        protocol.VERDICT_REPLAYED,
        protocol.VERDICT_RECORDED,
        protocol.VERDICT_CONFLICT,
        protocol.VERDICT_WINDOW_MISS,
    ]
    assert sorted(bits) == [1 << i for i in range(protocol.VERDICT_FLAG_BITS)]
    usage_bits = [
        protocol.USAGE_REPORT,
        protocol.USAGE_ENTITLED,
        protocol.USAGE_SUSPENDED,
        protocol.USAGE_SESSION,
    ]
    # decide.lua tests USAGE_SESSION as "flags >= USAGE_SESSION": it must be the highest bit
    assert sorted(usage_bits) == [1 << i for i in range(4)] and max(usage_bits) == 8
    # every reason and decision fits its bits
    assert max(Decision) < 1 << protocol.DECISION_BITS
    assert max(Reason) < 1 << protocol.REASON_BITS


def test_enum_codes_equal_core_and_the_wire() -> None:
    c = lua_constants()
    for d in Decision:
        assert c[d.name] == d == pb.Decision.Value(f"DECISION_{d.name}")
    for r in Reason:
        assert c[r.name] == r == pb.Reason.Value(f"REASON_{r.name}")
    for k in LimitKind:
        assert c[f"KIND_{k.name}"] == k == pb.LimitKind.Value(f"LIMIT_KIND_{k.name}")
    assert [c[f"PERIOD_{p}"] for p in ("HOUR", "DAY", "MONTH", "WEEK")] == list(Period)


_SCRIPTS = resources.files("chargepath.store") / "scripts"
_LUA_FILES = sorted(
    [f for f in _SCRIPTS.iterdir() if f.name.endswith(".lua")]
    + [f for f in (_SCRIPTS / "lib").iterdir() if f.name.endswith(".lua")],
    key=lambda f: f.name,
)
_MAIN_SCRIPTS = [f.name for f in _SCRIPTS.iterdir() if f.name.endswith(".lua")]


def _code(text: str) -> str:
    """Lua text without its comments and strings."""
    return re.sub(r"--[^\n]*|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", "", text)


@pytest.mark.parametrize("name", sorted(_MAIN_SCRIPTS))
def test_every_script_assembles_with_its_constants_written_in(name: str) -> None:
    script = read_script(name)
    assert not [line for line in script.splitlines() if line.startswith("-- #include")]
    code = _code(script)
    shared = set(lua_constants())
    # every shared name was replaced by its value...
    assert not [w for w in re.findall(r"\b[A-Z][A-Z0-9_]*\b", code) if w in shared]
    # ...and every library function is defined once
    defined = re.findall(r"local function (\w+)", code)
    assert len(defined) == len(set(defined))


@pytest.mark.parametrize("lua", _LUA_FILES, ids=lambda f: f.name)
def test_no_lua_file_defines_a_shared_constant(lua: resources.abc.Traversable) -> None:
    code = _code(lua.read_text("utf-8"))
    for name in lua_constants():
        assert not re.search(rf"\blocal\s+[\w\s,]*\b{name}\b", code), name
    # the enum codes and flags are not written as numbers next to their names either
    assert not re.search(r"\b(decision|reason|kind|flags|rf)\s*[=~]=\s*\d", code)


def test_every_script_has_its_header() -> None:
    for lua in _LUA_FILES:
        text = lua.read_text("utf-8")
        assert text.startswith(f"-- {lua.name}: "), lua.name
    for name in _MAIN_SCRIPTS:
        text = (_SCRIPTS / name).read_text("utf-8")
        assert "KEYS[" in text and "ARGV[" in text and "Reply:" in text, name
        assert "Invariant" in text or "invariant" in text.lower(), name


def test_the_texts_separators_are_control_characters() -> None:
    assert (US, RS) == ("\x1f", "\x1e")
    assert lua_constants()["US"] == US
