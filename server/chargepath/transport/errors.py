"""gRPC errors with a machine-readable detail and no leaked exception text, and the bounded
log of refused input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chargepath.core.model import FieldViolation


async def abort_invalid(context: Any, violations: list[FieldViolation]) -> NoReturn:
    """INVALID_ARGUMENT naming every bad field, with a google.rpc.BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason)
                for v in violations
            ]
        )
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="; ".join(str(v) for v in violations),
        details=[detail],
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code``; ``message`` must hold no exception text or secret."""
    await context.abort(code, message)
    raise AssertionError("abort returned")


@dataclass(slots=True)
class _Window:
    started: float
    lines: int = 0
    suppressed: int = 0
    #: refusals suppressed in earlier windows, not yet reported
    unreported: int = 0


class BadInputLog:
    """Warnings about refused input, bounded whatever a caller sends: at most ``burst`` lines
    per ``period_s`` for each kind of refusal, plus one line saying that the rest of the
    window is suppressed. The first line of a later window reports how many were suppressed
    before it. No stack trace: refused input is the caller's fault, not a bug.

    ``kind`` must come from a fixed set chosen by the code (a message type, "oversized
    batch"), never from the input, so the table of kinds stays small; past ``max_kinds``
    new kinds share one entry. Not thread-safe: call from one event loop.
    """

    OTHER = "other refused input"

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        period_s: float = 60.0,
        max_kinds: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._period_s = period_s
        self._max_kinds = max_kinds
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        #: refusals noted, logged or not (for tests and for the curious)
        self.noted = 0

    def refused(self, kind: str, detail: str) -> None:
        """Note one refusal of ``kind``; ``detail`` (sizes, the peer) must hold no input text."""
        self.noted += 1
        now = self._clock()
        if kind not in self._windows and len(self._windows) >= self._max_kinds:
            kind = self.OTHER
        window = self._windows.get(kind)
        if window is None:
            window = self._windows[kind] = _Window(now)
        elif now - window.started >= self._period_s:
            window.unreported += window.suppressed
            window.started, window.lines, window.suppressed = now, 0, 0
        if window.lines < self._burst:
            window.lines += 1
            if window.unreported:
                self._log.warning(
                    "refused %s: %s (%d more refused before this were not logged)",
                    kind,
                    detail,
                    window.unreported,
                )
                window.unreported = 0
            else:
                self._log.warning("refused %s: %s", kind, detail)
            return
        window.suppressed += 1
        if window.suppressed == 1:
            self._log.warning(
                "refused %s: more than %d in %.0f s; not logging more of them for now",
                kind,
                self._burst,
                self._period_s,
            )


#: The gateway's log of refused input (undecodable messages, oversized batches).
bad_input = BadInputLog(logging.getLogger("chargepath.transport.input"))
