"""The Python side of the Go generator's protocol: the phase command it writes, the event lines
it reads into a FlowRecorder, and the errors it gives."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.gogen import (
    GoGeneratorError,
    PhaseReader,
    phase_command,
    require_binary,
    start_args,
)
from loadtest.schedule import Schedule
from loadtest.stats import FlowRecorder, decode_histogram
from loadtest.workload import HOT_KEY, Workload

pytestmark = pytest.mark.unit

START = 1000.0


def workload(spread: str = "many") -> Workload:
    return Workload(
        plans="plans.yaml",
        spread="hot" if spread == "hot" else "many",
        keys=7,
        check_tenant="cpaas-demo",
        check_metric="api.sms.send",
        check_amount=3,
        stream_tenant="mvno-demo",
        stream_metric="slice.bytes",
        stream_amount=1500,
        slices=(),
        view=pb.VERDICT_VIEW_BASIC,
    )


def reader(
    rate: float = 10.0, duration: float = 1.0, worker: int = 1, workers: int = 2
) -> PhaseReader:
    schedule = Schedule(START, rate, duration, worker, workers)
    return PhaseReader(4, schedule, FlowRecorder("check", 1, START, duration))


def test_phase_command_fields() -> None:
    schedule = Schedule(START, 333.3, 2.5, 1, 3)
    line = phase_command(
        4,
        schedule,
        start_wall=1_700_000_000.5,
        drain_s=5,
        max_in_flight=100,
        timeout_s=0.75,
        view=pb.VERDICT_VIEW_BASIC,
        metadata=(("authorization", "Bearer a b&c=d"), ("x-k", "v")),
    )
    assert line.endswith("\n") and line.count("\n") == 1
    fields = line.split()
    assert fields[:11] == [
        "phase", "4", "1700000000500000000", "333.3", "2.5", "1", "3", "5.0", "100", "0.75",
        "VERDICT_VIEW_BASIC",
    ]  # fmt: skip
    assert urllib.parse.parse_qsl(fields[11]) == [
        ("authorization", "Bearer a b&c=d"),
        ("x-k", "v"),
    ]
    assert len(fields) == 12


def test_phase_command_without_metadata() -> None:
    line = phase_command(
        1,
        Schedule(START, 10.0, 1.0),
        start_wall=1.0,
        drain_s=0.0,
        max_in_flight=1,
        timeout_s=5.0,
        view=pb.VERDICT_VIEW_FULL,
        metadata=(),
    )
    assert line.split()[-2:] == ["VERDICT_VIEW_FULL", "-"]


def test_start_args_spread_and_hot_key() -> None:
    args = start_args(Path("/x/loadgen"), "127.0.0.1:1", 3, workload(), "lt-run-w0-check")
    assert args[0] == "/x/loadgen"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags == {
        "--target": "127.0.0.1:1",
        "--connections": "3",
        "--id-prefix": "lt-run-w0-check",
        "--tenant": "cpaas-demo",
        "--metric": "api.sms.send",
        "--amount": "3",
        "--keys": "7",
    }
    hot = start_args(Path("/x/loadgen"), "127.0.0.1:1", 1, workload("hot"), "p")
    assert hot[-2:] == ["--hot-key", HOT_KEY]


def test_events_feed_the_recorder() -> None:
    r = reader()  # worker 1 of 2 at 10/s for 1 s: 5 arrivals, at 0.1, 0.3, 0.5, 0.7, 0.9 s
    for line in [
        "s 0", "a 0 1500 1 0",
        "s 1", "d 2",
        "s 3", "a 3 2500 2 1",
        "e 1 5000000 DEADLINE_EXCEEDED Deadline Exceeded: no answer",
        "s 4",
        "end 4",
    ]:  # fmt: skip
        r.feed(line)
    assert r.ended and not r.done
    r.feed("i 1")
    r.feed("done 4")
    assert r.done
    tally = r.recorder.snapshot().tally
    assert (tally.scheduled_ops, tally.sent_ops, tally.dropped_ops) == (5, 4, 1)
    assert (tally.ok_ops, tally.error_ops, tally.incomplete_ops) == (2, 1, 1)
    assert tally.decisions == {"ALLOW": 1, "DEGRADED_THROTTLE": 1}
    assert tally.errors == {"DEADLINE_EXCEEDED": 1}
    assert tally.error_samples == {"DEADLINE_EXCEEDED": "Deadline Exceeded: no answer"}
    assert r.recorder.in_flight == 0
    # Answered at 0.1 + 0.0015 s and 0.7 + 0.0025 s: both in the window (second 0)
    assert tally.window_usages == 2
    seconds = r.recorder.snapshot().seconds
    assert seconds[0].ok_usages == 2
    # The error came 5 s after arrival 1's intended time (0.3 s): second 5
    assert seconds[5].error_ops == 1


def test_latency_is_measured_from_the_intended_time() -> None:
    r = reader(rate=1.0, duration=1.0, worker=0, workers=1)
    r.feed("s 0")
    r.feed("a 0 123456 1 0")
    snapshot = r.recorder.snapshot()
    hist = decode_histogram(snapshot.seconds[0].histogram)
    assert hist.get_total_count() == 1
    assert abs(hist.get_max_value() - 123456) <= 123456 * 0.001 + 1


def test_an_error_without_detail() -> None:
    r = reader()
    r.feed("s 0")
    r.feed("e 0 10 UNAVAILABLE")
    tally = r.recorder.snapshot().tally
    assert tally.errors == {"UNAVAILABLE": 1} and tally.error_samples == {}


@pytest.mark.parametrize(
    "line",
    ["x 1", "s", "s one", "a 0 10 1", "a 0 ten 1 0", "e 0", "end 3", "done 5", "i", ""],
)
def test_malformed_lines_are_errors(line: str) -> None:
    with pytest.raises(GoGeneratorError, match="bad line from the Go generator"):
        reader().feed(line)


def test_end_checks_the_schedule_was_kept() -> None:
    r = reader()
    r.feed("s 0")
    with pytest.raises(GoGeneratorError, match="1 arrivals, the schedule has 5"):
        r.feed("end 4")


def test_a_missing_binary_says_how_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEPATH_LOADGEN", str(tmp_path / "chargepath-loadgen"))
    with pytest.raises(GoGeneratorError, match=r"scripts/setup-go\.sh.*make clients"):
        require_binary()
