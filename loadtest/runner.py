"""The parent side: worker processes, phases, progress, and the merge of what they measured.

One :class:`WorkerPool` serves one target (the gateway, the echo server or Redis) for a whole
measurement: its workers keep their channels and streams open from phase to phase (warm-up,
then the measured phase or the steps of a find-max search).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest import worker as worker_mod
from loadtest.findmax import Judgement, RateSearch, StepOutcome
from loadtest.processes import cpu_seconds
from loadtest.stats import FlowStats, PhaseSummary, merge_by_flow, summarize
from loadtest.worker import Failed, FlowSpec, Phase, PhaseDone, Ready, WorkerSpec
from loadtest.worker import Progress as WorkerProgress

Event = Ready | WorkerProgress | PhaseDone | Failed

# Time the workers get between the phase command and the phase's start.
START_DELAY_S = 0.3
READY_TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


@dataclass(frozen=True, slots=True)
class LiveTotals:
    """All workers together, so far in the current phase."""

    elapsed: float
    sent_ops: int
    answered_usages: int
    error_ops: int


class WorkerPool:
    """``procs`` worker processes serving ``spec``; a context manager."""

    def __init__(self, spec: WorkerSpec, procs: int) -> None:
        self.spec = spec
        self.procs = procs
        # spawn, not fork: gRPC's core does not survive a fork of a process that used it.
        self._ctx = multiprocessing.get_context("spawn")
        self._events: Queue[Event] = self._ctx.Queue()
        self._pipes: list[Connection] = []
        self._processes: list[BaseProcess] = []
        self._phase = 0

    def __enter__(self) -> WorkerPool:
        try:
            for w in range(self.procs):
                reader, writer = self._ctx.Pipe(duplex=False)
                p = self._ctx.Process(
                    target=worker_mod.main,
                    args=(self.spec, w, self.procs, reader, self._events),
                    name=f"loadtest-worker-{w}",
                    daemon=True,
                )
                p.start()
                reader.close()
                self._pipes.append(writer)
                self._processes.append(p)
            ready: set[int] = set()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while len(ready) < self.procs:
                event = self._next_event(deadline)
                if isinstance(event, Ready):
                    ready.add(event.worker)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(None)
                pipe.close()
            except OSError:
                pass
        for p in self._processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._pipes.clear()
        self._processes.clear()

    def run_phase(
        self,
        rate: float,
        duration: float,
        drain_s: float,
        on_progress: Callable[[LiveTotals], None] | None = None,
    ) -> list[list[FlowStats]]:
        """Run one phase on every worker; returns each worker's flow reports."""
        self._phase += 1
        start_wall = time.time() + START_DELAY_S
        phase = Phase(self._phase, rate, duration, start_wall, drain_s)
        for pipe in self._pipes:
            pipe.send(phase)
        latest: dict[int, WorkerProgress] = {}
        done: dict[int, PhaseDone] = {}
        deadline = time.monotonic() + START_DELAY_S + duration + drain_s + 30.0
        while len(done) < self.procs:
            try:
                event = self._next_event(deadline, poll_s=0.1)
            except queue.Empty:
                event = None
            if isinstance(event, WorkerProgress) and event.phase == phase.index:
                latest[event.worker] = event
            elif isinstance(event, PhaseDone) and event.phase == phase.index:
                done[event.worker] = event
            if on_progress is not None:
                on_progress(
                    LiveTotals(
                        elapsed=max(0.0, time.time() - start_wall),
                        sent_ops=sum(p.sent_ops for p in latest.values()),
                        answered_usages=sum(p.answered_usages for p in latest.values()),
                        error_ops=sum(p.error_ops for p in latest.values()),
                    )
                )
        return [done[w].flows for w in sorted(done)]

    def _next_event(self, deadline: float, poll_s: float | None = None) -> Event:
        """The next event of any worker. Raises WorkerError if a worker failed or died,
        TimeoutError past ``deadline``, queue.Empty after ``poll_s`` (when given)."""
        waited = 0.0
        while True:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    # Its last words (a Failed event) may still be on their way.
                    try:
                        last: Event | None = self._events.get(timeout=1.0)
                    except queue.Empty:
                        last = None
                    if isinstance(last, Failed):
                        raise WorkerError(f"worker {last.worker} failed:\n{last.error}") from None
                    raise WorkerError(
                        f"worker {dead[0].name} exited with code {dead[0].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers did not answer in time") from None
                waited += 0.1
                if poll_s is not None and waited >= poll_s:
                    raise
                continue
            if isinstance(event, Failed):
                raise WorkerError(f"worker {event.worker} failed:\n{event.error}")
            return event


@dataclass(frozen=True, slots=True)
class PhasePlan:
    """How to measure: a warm-up, then one phase at ``rate``, or a find-max search from it."""

    rate: float
    duration: float
    warmup_s: float
    drain_s: float
    find_max: bool = False
    step_seconds: float = 10.0
    step_factor: float = 1.5
    max_steps: int = 12
    step_retries: int = 0
    p99_bound_ms: float = 10.0
    min_ratio: float = 0.95


@dataclass(slots=True)
class Measurement:
    """Everything measured against one target."""

    label: str
    target: str
    flows: tuple[FlowSpec, ...]
    phases: list[PhaseSummary] = field(default_factory=list)
    steps: list[tuple[StepOutcome, Judgement]] = field(default_factory=list)
    best_rate: float | None = None
    search_exhausted: bool = False

    @property
    def headline_rate(self) -> float:
        """The highest sustained rate of a search, else the achieved rate of the run."""
        if self.steps:
            return self.best_rate or 0.0
        return self.phases[-1].achieved_rate if self.phases else 0.0

    @property
    def headline_phase(self) -> PhaseSummary | None:
        """The phase the headline figures come from: the best sustained step, or the run."""
        if self.steps:
            for phase, (step, judgement) in zip(self.phases, self.steps, strict=True):
                if judgement.sustained and step.offered_rate == self.best_rate:
                    return phase
            return None
        return self.phases[-1] if self.phases else None


def _progress(console: Console, show_progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[live]}"),
        console=console,
        transient=False,
        disable=not show_progress,
    )


class _Target:
    """One target under measurement: its pool, the phases run so far and, for find-max, its
    search. :meth:`step` runs its next step."""

    def __init__(
        self,
        pool: WorkerPool,
        label: str,
        target: str,
        plan: PhasePlan,
        progress: Progress,
        target_pids: tuple[int, ...],
    ) -> None:
        self.pool = pool
        self.label = label
        self.plan = plan
        self.progress = progress
        self.target_pids = target_pids
        self.result = Measurement(label, target, pool.spec.flows)
        self.search = RateSearch(
            plan.rate,
            plan.step_factor,
            plan.p99_bound_ms,
            plan.min_ratio,
            plan.max_steps,
            plan.step_retries,
        )

    def run(
        self, description: str, rate: float, duration: float
    ) -> tuple[list[list[FlowStats]], float | None]:
        progress = self.progress
        task = progress.add_task(description, total=duration, live="")

        def update(t: LiveTotals) -> None:
            rate_now = t.answered_usages / t.elapsed if t.elapsed > 0 else 0.0
            progress.update(
                task,
                completed=min(t.elapsed, duration),
                live=(
                    f"sent {t.sent_ops:,} ops · answered {t.answered_usages:,} usages "
                    f"({rate_now:,.0f}/s) · errors {t.error_ops:,}"
                ),
            )

        cpu_before = cpu_seconds(self.target_pids)
        reports = self.pool.run_phase(rate, duration, self.plan.drain_s, update)
        cpu_after = cpu_seconds(self.target_pids)
        progress.update(task, completed=duration)
        if cpu_before is None or cpu_after is None:
            return reports, None
        return reports, cpu_after - cpu_before

    def warm_up(self) -> None:
        if self.plan.warmup_s > 0:
            rate = self.plan.rate
            self.run(f"{self.label}: warm-up @ {rate:,.0f}/s", rate, self.plan.warmup_s)

    def run_once(self) -> Measurement:
        """The single phase of a run without find-max."""
        rate, duration = self.plan.rate, self.plan.duration
        reports, cpu = self.run(f"{self.label} @ {rate:,.0f}/s", rate, duration)
        self.result.phases.append(_summary("run", rate, duration, self.pool.spec, reports, cpu))
        return self.result

    def step(self) -> bool:
        """Run the search's next step; False when the search is over."""
        search = self.search
        rate = search.next_rate()
        if rate is None:
            return False
        n = len(search.steps) + 1
        seconds = self.plan.step_seconds
        reports, cpu = self.run(f"{self.label}: step {n} @ {rate:,.0f}/s", rate, seconds)
        phase = _summary(f"step {n}", rate, seconds, self.pool.spec, reports, cpu)
        self.result.phases.append(phase)
        judgement = search.record(
            StepOutcome(rate, phase.achieved_rate, phase.worst_p99_ms, phase.degraded_usages)
        )
        colour = "green" if judgement.sustained else "red"
        self.progress.console.print(
            f"  [{colour}]{self.label}: step {n} @ {rate:,.0f}/s: {judgement.reason}"
        )
        return True

    def finish(self) -> Measurement:
        search = self.search
        self.result.steps = list(search.steps)
        best = search.best
        self.result.best_rate = best.offered_rate if best else None
        self.result.search_exhausted = search.limited_by_max_steps
        return self.result


def measure(
    pool: WorkerPool,
    label: str,
    target: str,
    plan: PhasePlan,
    console: Console,
    *,
    show_progress: bool = True,
    target_pids: tuple[int, ...] = (),
) -> Measurement:
    """Warm up, then run one phase or a find-max search, with a progress bar. With
    ``target_pids``, each phase also records the CPU time those processes used."""
    with _progress(console, show_progress) as progress:
        t = _Target(pool, label, target, plan, progress, target_pids)
        t.warm_up()
        if not plan.find_max:
            return t.run_once()
        while t.step():
            pass
        return t.finish()


@dataclass(frozen=True, slots=True)
class InterleavedTarget:
    """One target of :func:`measure_interleaved`: its pool, label, address and process ids."""

    pool: WorkerPool
    label: str
    target: str
    target_pids: tuple[int, ...] = ()


def measure_interleaved(
    targets: list[InterleavedTarget],
    plan: PhasePlan,
    console: Console,
    *,
    show_progress: bool = True,
) -> list[Measurement]:
    """Find-max searches of several targets (a ceiling and the gateway) in lockstep: each
    target's step 1, then each one's step 2 in the reverse order, and so on (A B B A A B ...),
    until every search is over. Steps of the same index run seconds apart, so a drift of the
    machine's speed during the run weighs on every target alike, where one search after the
    other compares minutes apart. Each search keeps its own rates and judgements."""
    with _progress(console, show_progress) as progress:
        live = [_Target(t.pool, t.label, t.target, plan, progress, t.target_pids) for t in targets]
        for t in live:
            t.warm_up()
        order = list(live)
        running = True
        while running:
            running = False
            for t in order:
                running = t.step() or running
            order.reverse()
        return [t.finish() for t in live]


def _summary(
    label: str,
    rate: float,
    duration: float,
    spec: WorkerSpec,
    reports: list[list[FlowStats]],
    target_cpu_s: float | None,
) -> PhaseSummary:
    shares = {f.name: f.share for f in spec.flows}
    flows = [summarize(m, rate * shares.get(m.flow, 0.0), duration) for m in merge_by_flow(reports)]
    return PhaseSummary(label, rate, duration, flows, target_cpu_s)
