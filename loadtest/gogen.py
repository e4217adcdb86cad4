"""The native (Go) generator for unary Check calls: ``--generator go``.

A Python Check call costs the generator about as much CPU as the echo server spends answering
it, so on a small machine the Python generator bounds what it measures. With ``--generator go``
each worker process starts one ``clients/go/bin/chargepath-loadgen`` (built by
``scripts/setup-go.sh``) for its check flow and keeps it for the whole measurement, so its
connections stay warm from phase to phase. The Go program owns the phase's open-loop schedule
(the same :class:`~loadtest.schedule.Schedule`), sends the calls and times them; this module
feeds what it reports into the flow's :class:`~loadtest.stats.FlowRecorder`, so that everything
downstream (progress, merge, reports, find-max) is the same as with the Python generator.

The protocol (documented in full in ``clients/go/cmd/chargepath-loadgen/main.go``): after
``ready``, one command line per phase on its stdin::

    phase INDEX START_NS RATE DURATION_S WORKER WORKERS DRAIN_S MAX_IN_FLIGHT DEADLINE_S VIEW
          METADATA                                                          (one line)

and one event line per arrival and outcome on its stdout, ``I`` being this worker's arrival
number (:meth:`Schedule.time_of`) and latencies in µs from the intended time::

    s I | d I | a I LATENCY_US DECISION DEGRADED | e I LATENCY_US CODE [DETAIL]
    end INDEX | i N | done INDEX
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.credentials import PLAINTEXT, ClientCredentials
from loadtest.drivers import Flow, Metadata
from loadtest.schedule import Schedule
from loadtest.stats import DEGRADED_OFFSET, FlowRecorder
from loadtest.workload import HOT_KEY, Workload

BINARY = Path(__file__).resolve().parent.parent / "clients" / "go" / "bin" / "chargepath-loadgen"
# Names another binary (e.g. one built in module mode elsewhere).
BINARY_ENV = "CHARGEPATH_LOADGEN"
READY_TIMEOUT_S = 20.0  # the Go side gives up connecting after 10 s
# How long past its expected end a phase may take before the Go side counts as hung.
SLACK_S = 30.0
_READ_CHUNK = 1 << 16
_STDERR_KEPT = 4000


class GoGeneratorError(RuntimeError):
    """The Go generator is missing, failed, or broke the protocol."""


def require_binary() -> Path:
    """The generator's path ($CHARGEPATH_LOADGEN, else the one setup-go.sh builds), or a
    GoGeneratorError saying how to build it."""
    path = Path(os.environ.get(BINARY_ENV) or BINARY)
    if not path.is_file():
        raise GoGeneratorError(
            f"the Go load generator {path} is not built: run `bash scripts/setup-go.sh` "
            "(or `make clients`), or use --generator python"
        )
    return path


def start_args(
    binary: Path,
    target: str,
    connections: int,
    workload: Workload,
    id_prefix: str,
    credentials: ClientCredentials = PLAINTEXT,
) -> list[str]:
    """The command line that starts the generator for ``workload``'s Check requests, over TLS
    if ``credentials`` say so (their API key travels in each phase's metadata instead)."""
    args = [
        str(binary),
        "--target",
        target,
        "--connections",
        str(connections),
        "--id-prefix",
        id_prefix,
        "--tenant",
        workload.check_tenant,
        "--metric",
        workload.check_metric,
        "--amount",
        str(workload.check_amount),
        "--keys",
        str(workload.keys),
    ]
    if workload.spread == "hot":
        args += ["--hot-key", HOT_KEY]
    return args + credentials.go_args()


def phase_command(
    index: int,
    schedule: Schedule,
    *,
    start_wall: float,
    drain_s: float,
    max_in_flight: int,
    timeout_s: float,
    view: int,
    metadata: Metadata,
) -> str:
    """The ``phase`` line for ``schedule``, which starts at ``start_wall`` (``time.time()``).
    Floats are written with ``repr``, so the Go side parses exactly the same values and
    computes the same number of arrivals."""
    encoded = urllib.parse.urlencode(metadata) if metadata else "-"
    fields = [
        "phase",
        str(index),
        str(round(start_wall * 1e9)),
        repr(float(schedule.rate)),
        repr(float(schedule.duration)),
        str(schedule.worker),
        str(schedule.workers),
        repr(float(drain_s)),
        str(max_in_flight),
        repr(float(timeout_s)),
        pb.VerdictView.Name(view),
        encoded,
    ]
    return " ".join(fields) + "\n"


class PhaseReader:
    """Applies the event lines of one phase to its recorder.

    Intended times come from ``schedule`` (the worker's monotonic clock); an answer's time is
    its intended time plus the reported latency, so the recorder's per-second series and its
    window do not depend on when the lines were read.
    """

    def __init__(self, index: int, schedule: Schedule, recorder: FlowRecorder) -> None:
        self.index = index
        self.schedule = schedule
        self.recorder = recorder
        self.ended = False
        """Every arrival has been sent or dropped."""
        self.done = False
        """The phase is over (drained, the rest counted incomplete)."""

    def feed(self, line: str) -> None:
        """Apply one line (without its newline). Raises GoGeneratorError if it is malformed."""
        try:
            self._apply(line)
        except (ValueError, IndexError) as exc:
            raise GoGeneratorError(f"bad line from the Go generator: {line!r} ({exc})") from None

    def _apply(self, line: str) -> None:
        rec = self.recorder
        kind, _, rest = line.partition(" ")
        if kind == "a":
            i, latency_us, decision, degraded = rest.split(" ")
            intended = self.schedule.time_of(int(i))
            outcome = int(decision) + (DEGRADED_OFFSET if degraded == "1" else 0)
            rec.answered(intended, intended + int(latency_us) / 1e6, (outcome,))
        elif kind == "s":
            int(rest)
            rec.scheduled()
            rec.sent()
        elif kind == "d":
            int(rest)
            rec.scheduled()
            rec.dropped()
        elif kind == "e":
            i, latency_us, code, *detail = rest.split(" ", 3)
            intended = self.schedule.time_of(int(i))
            rec.failed(intended + int(latency_us) / 1e6, code, detail[0] if detail else "")
        elif kind == "end":
            self._check_index(rest)
            if rec.tally.scheduled_ops != self.schedule.total:
                raise ValueError(
                    f"{rec.tally.scheduled_ops} arrivals, the schedule has {self.schedule.total}"
                )
            self.ended = True
        elif kind == "i":
            rec.incomplete(int(rest))
        elif kind == "done":
            self._check_index(rest)
            self.ended = self.done = True
        else:
            raise ValueError(f"unknown event {kind!r}")

    def _check_index(self, text: str) -> None:
        if int(text) != self.index:
            raise ValueError(f"phase {text}, expected {self.index}")


class GoCheckFlow(Flow):
    """Unary Check calls (MODE_ADMIT) sent by a ``chargepath-loadgen`` process that owns the
    phase's schedule. Create it with :meth:`start`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        timeout_s: float,
        metadata: Metadata,
        view: int,
        max_in_flight: int,
        name: str,
    ) -> None:
        super().__init__(name, 1, max_in_flight)
        self._proc = proc
        self._timeout_s = timeout_s
        self._metadata = metadata
        self._view = view
        self._phases = 0
        self._reader: PhaseReader | None = None
        self._partial = b""
        self._stderr = bytearray()
        self._stderr_task = asyncio.get_running_loop().create_task(self._collect_stderr())

    @classmethod
    async def start(
        cls,
        target: str,
        *,
        connections: int,
        workload: Workload,
        id_prefix: str,
        timeout_s: float,
        metadata: Metadata,
        max_in_flight: int,
        name: str = "check",
        credentials: ClientCredentials = PLAINTEXT,
    ) -> GoCheckFlow:
        """Start the generator and wait until its connections to ``target`` are ready.
        ``metadata`` goes with every call (include the API key in it)."""
        args = start_args(require_binary(), target, connections, workload, id_prefix, credentials)
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        flow = cls(
            proc,
            timeout_s=timeout_s,
            metadata=metadata,
            view=workload.view,
            max_in_flight=max_in_flight,
            name=name,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
            if line != b"ready\n":
                said = f" (it said {line.decode(errors='replace').strip()!r})" if line else ""
                raise await flow._failure(f"did not start{said}")
        except BaseException:
            await flow.close()
            raise
        return flow

    async def play(self, schedule: Schedule, *, start_wall: float, drain_s: float) -> None:
        """Hand the phase to the Go side; return once it has sent (or dropped) every arrival."""
        self._phases += 1
        reader = self._reader = PhaseReader(self._phases, schedule, self.recorder)
        command = phase_command(
            self._phases,
            schedule,
            start_wall=start_wall,
            drain_s=drain_s,
            max_in_flight=self.max_in_flight,
            timeout_s=self._timeout_s,
            view=self._view,
            metadata=self._metadata,
        )
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(command.encode())
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._failure("exited before the phase") from None
        end = schedule.start + schedule.duration
        await self._read_until(lambda: reader.ended, end + SLACK_S)

    async def drain(self, deadline: float) -> None:
        """Wait for the end of the Go side's drain (it drains by the phase command's own
        ``drain_s``, counted from the end of its schedule)."""
        reader = self._reader
        if reader is not None:
            await self._read_until(lambda: reader.done, deadline + self._timeout_s + SLACK_S)
            self._reader = None

    async def _read_until(self, finished: Callable[[], bool], deadline: float) -> None:
        stdout = self._proc.stdout
        reader = self._reader
        assert stdout is not None and reader is not None
        loop = asyncio.get_running_loop()
        try:
            # One timeout for the whole wait: a timeout per read would cost a task per read.
            async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                while not finished():
                    chunk = await stdout.read(_READ_CHUNK)
                    if not chunk:
                        raise await self._failure(f"exited during phase {reader.index}")
                    *lines, self._partial = (self._partial + chunk).split(b"\n")
                    for line in lines:
                        reader.feed(line.decode())
        except TimeoutError:
            raise await self._failure(f"phase {reader.index} did not finish in time") from None

    async def _failure(self, what: str) -> GoGeneratorError:
        """An error saying what happened, with the process's exit status and last words."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), 2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        said = self._stderr.decode(errors="replace").strip()
        status = self._proc.returncode
        return GoGeneratorError(
            f"the Go load generator {what}"
            + (f" (exit status {status})" if status is not None else "")
            + (f": {said}" if said else "")
        )

    async def _collect_stderr(self) -> None:
        stderr = self._proc.stderr
        assert stderr is not None
        while chunk := await stderr.read(_READ_CHUNK):
            self._stderr += chunk
            del self._stderr[:-_STDERR_KEPT]

    async def close(self) -> None:
        """Ask the process to quit (it closes its connections), or kill it."""
        proc = self._proc
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(b"quit\n")
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._stderr_task.cancel()
        await asyncio.gather(self._stderr_task, return_exceptions=True)
