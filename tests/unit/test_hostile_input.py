"""Hostile input, without I/O: occurred_at's bounds, deserializers that never raise, the
bounded log of refused input, and the message size bound."""

from __future__ import annotations

import logging
import random

import pytest
from google.protobuf.message_factory import GetMessageClass

from chargepath.core.validation import (
    MAX_BATCH,
    MAX_OCCURRED_AT_MS,
    OccurredAtWindow,
    check_occurred_at,
)
from chargepath.settings import Settings
from chargepath.transport import services
from chargepath.transport.errors import BadInputLog
from chargepath.transport.mapping import usage_from_pb
from chargepath.transport.metering import usage_violations
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit

NOW_MS = 1_796_000_000_000  # 2026-11-30T...Z
WINDOW = OccurredAtWindow()
DAY_MS = 86_400_000


def occurred(seconds: int, nanos: int = 0, window: OccurredAtWindow = WINDOW) -> str | None:
    v = check_occurred_at(seconds, nanos, NOW_MS, window)
    return None if v is None else v.field


@pytest.mark.parametrize(
    ("ms", "field"),
    [
        (NOW_MS, None),
        (NOW_MS - 35 * DAY_MS, None),
        (NOW_MS - 35 * DAY_MS - 1000, "occurred_at"),
        (NOW_MS + 300_000, None),
        (NOW_MS + 301_000, "occurred_at"),
        (0, "occurred_at"),
        (-1000, "occurred_at"),
    ],
)
def test_occurred_at_must_be_in_the_window(ms: int, field: str | None) -> None:
    assert occurred(ms // 1000, (ms % 1000) * 1_000_000) == field


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000, 2**31 - 1, -(2**31)])
def test_nanos_out_of_range_are_refused_not_rounded(nanos: int) -> None:
    v = check_occurred_at(NOW_MS // 1000, nanos, NOW_MS, WINDOW)
    assert v is not None and v.field == "occurred_at.nanos"
    assert v.reason == f"must be 0 to 999999999, got {nanos}"


def test_nanos_at_their_bounds_are_fine() -> None:
    assert occurred(NOW_MS // 1000 - 1, 999_999_999) is None
    assert occurred(NOW_MS // 1000, 0) is None


@pytest.mark.parametrize("seconds", [2**63 - 1, -(2**63), 2**53, MAX_OCCURRED_AT_MS // 1000 + 1])
def test_seconds_that_overflow_are_refused_with_a_bounded_message(seconds: int) -> None:
    v = check_occurred_at(seconds, 0, NOW_MS, WINDOW)
    assert v is not None and v.field == "occurred_at"
    assert len(v.reason) < 200
    assert "at most 35 days before and 5 minutes after" in v.reason


def test_a_wide_window_still_keeps_milliseconds_exact_in_lua() -> None:
    wide = OccurredAtWindow(max_age_s=2**62, max_ahead_s=2**62)
    assert occurred(0, 0, wide) is None
    assert occurred(MAX_OCCURRED_AT_MS // 1000, 0, wide) is None
    assert occurred(-1, 999_000_000, wide) == "occurred_at"  # -1 ms
    assert occurred(MAX_OCCURRED_AT_MS // 1000 + 1, 0, wide) == "occurred_at"
    assert occurred(2**63 - 1, 0, wide) == "occurred_at"


def test_a_configured_window_is_the_one_applied() -> None:
    hour = OccurredAtWindow(max_age_s=3600, max_ahead_s=0)
    assert occurred(NOW_MS // 1000 - 3600, 0, hour) is None
    assert occurred(NOW_MS // 1000 - 3601, 0, hour) == "occurred_at"
    assert occurred(NOW_MS // 1000 + 1, 0, hour) == "occurred_at"
    v = check_occurred_at(NOW_MS // 1000 + 1, 0, NOW_MS, hour)
    assert v is not None and "at most 1 hour before and 0 seconds after" in v.reason


def test_a_wire_usage_names_nanos_rather_than_the_altered_instant() -> None:
    m = pb.Usage(
        request_id="r-1",
        subject=pb.Subject(tenant="acme"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    m.occurred_at.seconds = 0
    m.occurred_at.nanos = -1  # maps to -1 ms: the core would call it "before 1970"
    bad = usage_violations(m, usage_from_pb(m), on_stream=False, now_ms=NOW_MS, window=WINDOW)
    assert [v.field for v in bad] == ["occurred_at.nanos"]
    m.occurred_at.seconds = 2**63 - 1
    m.occurred_at.nanos = 0
    m.amount = 0
    bad = usage_violations(m, usage_from_pb(m), on_stream=False, now_ms=NOW_MS, window=WINDOW)
    assert [v.field for v in bad] == ["amount", "occurred_at"]


# -- deserializers --------------------------------------------------------------------------


def every_request_class() -> list[type]:
    return [
        GetMessageClass(m.input_type)
        for s in (services.METERING, services.ADMIN, services.KEYS)
        for m in s.methods
    ]


@pytest.mark.parametrize("cls", every_request_class(), ids=lambda c: c.DESCRIPTOR.name)
def test_a_decoder_never_raises_and_decodes_what_is_valid(cls: type) -> None:
    decode = services.decoder(cls)
    rng = random.Random(12)
    undecodable = 0
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 64))
        out = decode(data)
        if isinstance(out, services.Undecodable):
            assert out == services.Undecodable(cls.DESCRIPTOR.full_name, len(data))
            undecodable += 1
        else:
            assert isinstance(out, cls)
    assert undecodable > 1000  # random bytes are mostly not a message
    assert isinstance(decode(b""), cls)  # the empty message
    assert isinstance(decode(b"\x0a\x05"), services.Undecodable)  # a truncated field
    # nested 100,000 deep: past the parser's recursion limit
    assert isinstance(decode(b"\x0a\x80\x80\x01" * 100_000), services.Undecodable)


def test_every_method_of_every_service_gets_a_handler() -> None:
    class Anything:
        def __getattr__(self, name: str) -> object:
            return lambda request, context: None

    for service in (services.METERING, services.ADMIN, services.KEYS):
        handlers = services.method_handlers(Anything(), service)
        assert sorted(handlers) == sorted(m.name for m in service.methods)
        for method in service.methods:
            h = handlers[method.name]
            assert h.request_streaming == method.client_streaming
            assert h.response_streaming == method.server_streaming
            out = h.request_deserializer(b"\xff\xff\xff")
            assert out == services.Undecodable(method.input_type.full_name, 3)


# -- the bounded log ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bad_input_log_is_bounded_and_counts_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = BadInputLog(logging.getLogger("test.bad_input"), burst=5, period_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.bad_input"):
        for i in range(10_000):
            clock.now = i * 0.001  # 10 s of refusals
            log.refused("undecodable chargepath.v1.CheckRequest", "3 bytes from ipv4:10.0.0.1")
            log.refused("oversized batch", "2000 usages from ipv4:10.0.0.1")
    lines = [r.getMessage() for r in caplog.records]
    assert log.noted == 20_000
    assert len(lines) == 2 * (5 + 1)  # per kind: the burst, and one "not logging more"
    assert sum("not logging more" in line for line in lines) == 2
    assert all(r.exc_info is None for r in caplog.records)  # no stack trace
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test.bad_input"):
        clock.now = 61.0
        log.refused("oversized batch", "1001 usages from ipv4:10.0.0.1")
    (line,) = [r.getMessage() for r in caplog.records]
    # 10,000 noted, 5 logged in the first window
    assert line.endswith("(9995 more refused before this were not logged)")


def test_bad_input_log_bounds_its_kinds() -> None:
    log = BadInputLog(logging.getLogger("test.bad_input.kinds"), max_kinds=3, clock=Clock())
    for i in range(100):
        log.refused(f"kind {i}", "-")
    assert len(log._windows) == 4  # three kinds and the shared "other"


# -- message size -----------------------------------------------------------------------------


def largest_valid_usage() -> pb.Usage:
    u = pb.Usage(
        request_id="r" * 128,
        subject=pb.Subject(tenant="t" * 64, slice="s" * 128, key="k" * 128),
        metric="m" * 128,
        amount=10**12,
        mode=pb.MODE_REPORT,
        labels={f"{i:02d}" + "k" * 62: "v" * 256 for i in range(16)},
        session_id="s" * 128,
        sequence=2**53 - 1,
    )
    u.occurred_at.seconds = MAX_OCCURRED_AT_MS // 1000
    u.occurred_at.nanos = 999_999_999
    return u


def test_the_message_bound_takes_a_full_batch_at_its_largest_and_not_much_more() -> None:
    batch = pb.StreamUsageRequest(
        usages=[largest_valid_usage()] * MAX_BATCH, view=pb.VERDICT_VIEW_BASIC
    )
    bound = Settings().max_message_bytes
    assert batch.ByteSize() == 6_009_002  # as settings.py says
    assert batch.ByteSize() < bound < 1.5 * batch.ByteSize()
