"""Mergeable measurements: what a worker records, what it sends back, how the parent merges.

Latencies are HDR histograms of microseconds, measured from the *intended* send time of an
operation (see :mod:`loadtest.schedule`) to the arrival of its answer. A worker keeps one
histogram per second of a phase (by completion time) and sends them encoded (compressed,
base64); the parent decodes and adds them, which gives exactly the histogram of all the values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 300_000_000  # 5 minutes; larger values are recorded as this
SIGNIFICANT_FIGURES = 3

# Names of the chargepath.v1.Decision values, without importing the generated code.
DECISION_NAMES = {0: "UNSPECIFIED", 1: "ALLOW", 2: "THROTTLE", 3: "DENY"}
# A verdict marked degraded (decided by the failure policy, the store unreachable in time) is
# counted under its decision plus this offset, e.g. "DEGRADED_ALLOW".
DEGRADED_OFFSET = 100
DECISION_NAMES.update(
    {DEGRADED_OFFSET + d: f"DEGRADED_{n}" for d, n in list(DECISION_NAMES.items())}
)

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))

# The fewest samples (operations) a percentile is read from in a plotted series: 1 / (1 - q),
# so that at least one sample lies above the percentile and it is never the maximum itself.
# With fewer, p99 and p99.9 of a second would be the same sample (at 50 messages/s both are
# the slowest message). A second with enough samples is plotted on its own; otherwise
# consecutive seconds are merged into a window until it has enough (see ``window_bounds``).
MIN_SAMPLES: dict[str, int] = {"p50": 2, "p90": 10, "p99": 100, "p99.9": 1_000, "max": 1}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def decode_histogram(blob: bytes) -> HdrHistogram:
    return HdrHistogram.decode(blob)


@dataclass(slots=True)
class Tally:
    """Counts of one flow. ``add`` gives the tally of both operands (workers, phases).

    An operation is one Check call, one stream message (a batch of usages) or one Redis batch.
    """

    scheduled_ops: int = 0
    """Arrivals the schedule produced."""
    sent_ops: int = 0
    dropped_ops: int = 0
    """Not sent: the worker already had its maximum of operations in flight."""
    incomplete_ops: int = 0
    """Sent, but not answered by the end of the drain; cancelled."""
    ok_ops: int = 0
    """Answered with verdicts (whatever the decisions)."""
    ok_usages: int = 0
    window_usages: int = 0
    """Usages answered before the end of the phase's window: the numerator of the achieved rate."""
    error_ops: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    """Usages by decision: ALLOW, THROTTLE, DENY."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed operations by gRPC status code (or exception type)."""
    error_samples: dict[str, str] = field(default_factory=dict)
    """The first message seen for each kind of error."""

    def add(self, other: Tally) -> None:
        self.scheduled_ops += other.scheduled_ops
        self.sent_ops += other.sent_ops
        self.dropped_ops += other.dropped_ops
        self.incomplete_ops += other.incomplete_ops
        self.ok_ops += other.ok_ops
        self.ok_usages += other.ok_usages
        self.window_usages += other.window_usages
        self.error_ops += other.error_ops
        for name, n in other.decisions.items():
            self.decisions[name] = self.decisions.get(name, 0) + n
        for name, n in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + n
        for name, text in other.error_samples.items():
            self.error_samples.setdefault(name, text)


@dataclass(slots=True)
class Second:
    """What completed during one second of a phase; ``histogram`` is encoded, empty if none."""

    ok_usages: int = 0
    error_ops: int = 0
    histogram: bytes = b""
    degraded_usages: int = 0


@dataclass(slots=True)
class FlowStats:
    """What one worker saw of one flow during one phase: the message a worker sends back."""

    flow: str
    usages_per_op: int
    tally: Tally
    seconds: dict[int, Second]


class FlowRecorder:
    """Records one flow in one worker during one phase.

    Times are seconds on ``time.monotonic()``; ``start`` and ``duration`` are the phase's
    window. Not thread-safe: a worker's event loop is its only caller.
    """

    def __init__(self, flow: str, usages_per_op: int, start: float, duration: float) -> None:
        self.flow = flow
        self.usages_per_op = usages_per_op
        self.start = start
        self.end = start + duration
        self.tally = Tally()
        self.in_flight = 0
        self.on_idle: Callable[[], None] | None = None
        """Called whenever the last operation in flight is answered, fails or is abandoned."""
        self._decisions: dict[int, int] = {}
        self._histograms: dict[int, HdrHistogram] = {}
        self._seconds: dict[int, Second] = {}

    def scheduled(self) -> None:
        self.tally.scheduled_ops += 1

    def sent(self) -> None:
        self.tally.sent_ops += 1
        self.in_flight += 1

    def dropped(self) -> None:
        self.tally.dropped_ops += 1

    def incomplete(self, ops: int) -> None:
        self.tally.incomplete_ops += ops
        self._settled(ops)

    def answered(self, intended: float, now: float, decisions: Sequence[int]) -> None:
        """An operation sent at ``intended`` got its verdicts at ``now``."""
        self._settled(1)
        tally = self.tally
        tally.ok_ops += 1
        tally.ok_usages += len(decisions)
        if now < self.end:
            tally.window_usages += len(decisions)
        counts = self._decisions
        for d in decisions:
            counts[d] = counts.get(d, 0) + 1
        sec = int(now - self.start)
        hist = self._histograms.get(sec)
        if hist is None:
            hist = self._histograms[sec] = new_histogram()
        hist.record_value(min(max(int((now - intended) * 1e6), LOWEST_US), HIGHEST_US))
        second = self._second(sec)
        second.ok_usages += len(decisions)
        second.degraded_usages += sum(1 for d in decisions if d >= DEGRADED_OFFSET)

    def failed(self, now: float, error: str, detail: str = "") -> None:
        """An operation failed at ``now`` with ``error`` (a gRPC status code name, an exception
        type); ``detail`` (the first one per kind is kept) says more."""
        self._settled(1)
        tally = self.tally
        tally.error_ops += 1
        tally.errors[error] = tally.errors.get(error, 0) + 1
        if detail and error not in tally.error_samples:
            tally.error_samples[error] = detail[:500]
        self._second(int(now - self.start)).error_ops += 1

    def snapshot(self) -> FlowStats:
        tally = Tally()
        tally.add(self.tally)
        tally.decisions = {
            DECISION_NAMES.get(d, f"DECISION_{d}"): n for d, n in sorted(self._decisions.items())
        }
        seconds = {
            sec: Second(s.ok_usages, s.error_ops, b"", s.degraded_usages)
            for sec, s in self._seconds.items()
        }
        for sec, hist in self._histograms.items():
            seconds[sec].histogram = hist.encode()
        return FlowStats(self.flow, self.usages_per_op, tally, seconds)

    def _settled(self, ops: int) -> None:
        self.in_flight -= ops
        if self.in_flight == 0 and self.on_idle is not None:
            self.on_idle()

    def _second(self, sec: int) -> Second:
        s = self._seconds.get(sec)
        if s is None:
            s = self._seconds[sec] = Second()
        return s


@dataclass(slots=True)
class MergedSecond:
    ok_usages: int
    error_ops: int
    histogram: HdrHistogram
    degraded_usages: int = 0


@dataclass(slots=True)
class MergedFlow:
    """One flow of one phase, all workers together."""

    flow: str
    usages_per_op: int
    tally: Tally
    histogram: HdrHistogram
    seconds: dict[int, MergedSecond]


def merge(parts: Sequence[FlowStats]) -> MergedFlow:
    """Add up the workers' reports of one flow."""
    if not parts:
        raise ValueError("nothing to merge")
    flows = {p.flow for p in parts}
    if len(flows) != 1:
        raise ValueError(f"cannot merge different flows: {sorted(flows)}")
    tally = Tally()
    total = new_histogram()
    seconds: dict[int, MergedSecond] = {}
    for part in parts:
        tally.add(part.tally)
        for sec, s in part.seconds.items():
            merged = seconds.get(sec)
            if merged is None:
                merged = seconds[sec] = MergedSecond(0, 0, new_histogram())
            merged.ok_usages += s.ok_usages
            merged.error_ops += s.error_ops
            merged.degraded_usages += s.degraded_usages
            if s.histogram:
                hist = decode_histogram(s.histogram)
                merged.histogram.add(hist)
                total.add(hist)
    return MergedFlow(
        parts[0].flow, parts[0].usages_per_op, tally, total, dict(sorted(seconds.items()))
    )


def merge_by_flow(reports: Iterable[Sequence[FlowStats]]) -> list[MergedFlow]:
    """Merge each worker's list of flow reports, flow by flow, in order of first appearance."""
    grouped: dict[str, list[FlowStats]] = {}
    for report in reports:
        for part in report:
            grouped.setdefault(part.flow, []).append(part)
    return [merge(parts) for parts in grouped.values()]


def latency_ms(hist: HdrHistogram) -> dict[str, float | None]:
    """p50, p90, p99, p99.9, max and mean in milliseconds; None when nothing was recorded."""
    if hist.get_total_count() == 0:
        return {name: None for name in (*(n for n, _ in PERCENTILES), "max", "mean")}
    out: dict[str, float | None] = {
        name: hist.get_value_at_percentile(q) / 1000.0 for name, q in PERCENTILES
    }
    out["max"] = hist.get_max_value() / 1000.0
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3)
    return out


@dataclass(frozen=True, slots=True)
class Window:
    """Seconds ``[start, end)`` of a phase (by completion time) merged to read one percentile:
    ``ms`` is that percentile of the ``samples`` operations answered in them, in milliseconds."""

    start: int
    end: int
    samples: int
    ms: float


def window_bounds(counts: Sequence[tuple[int, int]], min_samples: int) -> list[tuple[int, int]]:
    """Windows ``[start, end)`` of consecutive seconds, each with at least ``min_samples``.

    ``counts`` is (second, samples) in increasing order of second. A second with enough samples
    is a window of its own; one with fewer opens a window that takes the following seconds
    until it has enough. A remainder too small at the end joins the last window; with fewer
    than ``min_samples`` in all, there is no window. Seconds absent from ``counts`` had no
    answer: a window that spans them includes them.
    """
    bounds: list[tuple[int, int]] = []
    start: int | None = None
    total = 0
    last = 0
    for second, samples in counts:
        if start is None:
            start = second
        total += samples
        last = second
        if total >= min_samples:
            bounds.append((start, second + 1))
            start, total = None, 0
    if start is not None and bounds:
        bounds[-1] = (bounds[-1][0], last + 1)
    return bounds


def percentile_windows(seconds: Mapping[int, MergedSecond]) -> dict[str, list[Window]]:
    """Each of p50, p90, p99, p99.9 and max over windows of ``seconds`` that hold at least
    its ``MIN_SAMPLES``, from the merged histograms of the seconds in each window."""
    ordered = sorted(seconds.items())
    counts = [(sec, s.histogram.get_total_count()) for sec, s in ordered]
    quantiles = dict(PERCENTILES)
    out: dict[str, list[Window]] = {}
    for name, min_samples in MIN_SAMPLES.items():
        windows = []
        for start, end in window_bounds(counts, min_samples):
            hist = new_histogram()
            for sec in range(start, end):
                if (merged := seconds.get(sec)) is not None:
                    hist.add(merged.histogram)
            value = (
                hist.get_max_value()
                if name == "max"
                else hist.get_value_at_percentile(quantiles[name])
            )
            windows.append(Window(start, end, hist.get_total_count(), value / 1000.0))
        out[name] = windows
    return out


@dataclass(slots=True)
class FlowSummary:
    """One flow of one phase, ready for a table, the JSON file and the plot.

    Rates are usages per second. ``latency_ms`` is per operation (a Check call, a stream
    message, a Redis batch) from its intended send time. ``series`` has one entry per second
    of the phase (by completion time); ``windows`` gives each percentile (and max) over
    windows of seconds with enough samples to read it (``MIN_SAMPLES``): what the plot draws.
    """

    flow: str
    usages_per_op: int
    offered_rate: float
    achieved_rate: float
    latency_ms: dict[str, float | None]
    tally: Tally
    series: list[dict[str, float | None]]
    windows: dict[str, list[Window]] = field(default_factory=dict)


def summarize(flow: MergedFlow, offered_rate: float, duration: float) -> FlowSummary:
    series: list[dict[str, float | None]] = []
    for sec, s in flow.seconds.items():
        point: dict[str, float | None] = {
            "t": float(sec),
            "usages_per_s": float(s.ok_usages),
            "errors": float(s.error_ops),
            "degraded": float(s.degraded_usages),
        }
        point.update(latency_ms(s.histogram))
        series.append(point)
    achieved = flow.tally.window_usages / duration if duration > 0 else 0.0
    return FlowSummary(
        flow=flow.flow,
        usages_per_op=flow.usages_per_op,
        offered_rate=offered_rate,
        achieved_rate=achieved,
        latency_ms=latency_ms(flow.histogram),
        tally=flow.tally,
        series=series,
        windows=percentile_windows(flow.seconds),
    )


@dataclass(slots=True)
class PhaseSummary:
    """One phase (a run, or one step of a find-max search): every flow at one offered rate."""

    label: str
    offered_rate: float
    duration: float
    flows: list[FlowSummary]
    target_cpu_s: float | None = None
    """CPU time the target process used during the phase (its drain included), when known."""

    @property
    def achieved_rate(self) -> float:
        return sum(f.achieved_rate for f in self.flows)

    @property
    def degraded_usages(self) -> int:
        return sum(
            n
            for f in self.flows
            for name, n in f.tally.decisions.items()
            if name.startswith("DEGRADED")
        )

    @property
    def worst_p99_ms(self) -> float | None:
        values = [f.latency_ms["p99"] for f in self.flows if f.latency_ms["p99"] is not None]
        return max(values) if values else None

    @property
    def error_ops(self) -> int:
        return sum(f.tally.error_ops for f in self.flows)

    @property
    def decided_usages(self) -> int:
        return sum(f.tally.ok_usages for f in self.flows)

    @property
    def target_cpu_us_per_usage(self) -> float | None:
        """Target CPU per usage answered, in microseconds."""
        if self.target_cpu_s is None or self.decided_usages == 0:
            return None
        return self.target_cpu_s * 1e6 / self.decided_usages

    @property
    def target_usages_per_cpu_s(self) -> float | None:
        """Usages answered per CPU-second of the target: the rate at which the target would
        keep one core busy, i.e. its ceiling if it is single-threaded and CPU-bound (Redis,
        the echo server, one gateway process) and nothing else competed for the core."""
        if not self.target_cpu_s:
            return None
        return self.decided_usages / self.target_cpu_s
