"""`Lease`: a quota lease of the blocking `Client`, renewed and reported by a background thread.

with client.lease("cpaas-demo", "api.sms.send", units=1000, key="key-42") as lease:
    if lease.try_acquire():
        send_sms()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import grpc

from chargepath_client import _wire
from chargepath_client._lease import _NEVER, DONE, BaseLease, LeaseAnswer, PlannedAsk
from chargepath_client._retry import RetryPolicy
from chargepath_protos.v1 import lease_pb2

logger = logging.getLogger("chargepath_client")


class Lease(BaseLease):
    """A quota lease held by a blocking `Client` (made by `Client.lease`; see `BaseLease`
    for the counting).

    `with client.lease(...) as lease:` opens it (one round trip: the first grant) and
    closes it at the end (reports what was spent, releases the rest); or call `open()` and
    `close()`. `try_acquire` is thread-safe (a lock around an integer addition) and does no
    I/O. A daemon thread renews, reports and replaces the lease in the background.
    """

    __slots__ = ("_call", "_event", "_metadata", "_mutex", "_thread")

    def __init__(
        self,
        call: _wire.BlockingLeaseCall,
        metadata: _wire.Metadata,
        tenant: str,
        metric: str,
        *,
        units: int,
        slice: str = "",
        key: str = "",
        holder: str = "",
        labels: Mapping[str, str] | None = None,
        report_every: float | None = 1.0,
        validate: bool = True,
        retry: RetryPolicy | None = None,
        attempt_timeout: float = 2.0,
    ) -> None:
        super().__init__(
            tenant,
            metric,
            units=units,
            slice=slice,
            key=key,
            holder=holder,
            labels=labels,
            report_every=report_every,
            validate=validate,
            retry=retry if retry is not None else RetryPolicy(),
            attempt_timeout=attempt_timeout,
            clock=time.monotonic,
        )
        self._mutex = threading.Lock()
        self._lock = self._mutex
        self._call = call
        self._metadata = metadata
        self._event = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self, n: int = 1) -> bool:
        """Take `n` units (default 1) if they fit in the lease: True if allowed. Local (no
        I/O); thread-safe."""
        # acquire/release in try/finally rather than `with`: the same guarantee, and about
        # 1.5 times the decisions per second (loadtest lease-local).
        mutex = self._mutex
        mutex.acquire()
        try:
            spent = self._spent + n
            if spent > self._limit or type(n) is not int or n < 1:
                return self._refused(n)
            self._spent = spent
            if spent >= self._renew_at:
                self._renew_at = _NEVER
                self._event.set()
            return True
        finally:
            mutex.release()

    def _wake(self) -> None:
        self._event.set()

    def open(self, deadline: float | None = None) -> Lease:
        """Ask for the first grant (retried within `deadline` seconds, by default the
        client's `default_deadline`), then start the background thread. A THROTTLE or DENY is
        not an error: the lease holds nothing yet and the background asks again
        (`last_answer` says why). Raises the call's `ChargepathError` when the gateway
        refuses the caller or cannot be reached."""
        if self._thread is not None:
            raise RuntimeError("the lease is already open")
        wait = deadline if deadline is not None else self._attempt_timeout
        self._give_up_at = self._clock() + wait
        step = self.plan(self._clock())
        if not isinstance(step, PlannedAsk):
            raise RuntimeError("the lease is closed (or failed): make another one")
        self._send(step)
        self._give_up_at = float("inf")
        if self._failure is not None:
            raise self._failure
        self._thread = threading.Thread(
            target=self._run, name=f"chargepath-lease-{self.metric}", daemon=True
        )
        self._thread.start()
        return self

    def close(self, within: float = 5.0) -> None:
        """Report what was spent and release the lease (its unspent units go back to the
        limits); waits up to `within` seconds. Raises `ChargepathError` when units spent
        could not be reported (they are then lost to the ledger; the gateway takes the
        lease's units back at its expiry). Closing twice does nothing."""
        if self._closing:
            return
        self._start_closing(within)
        thread = self._thread
        if thread is None:  # never opened
            return
        self._event.set()
        thread.join(within + 1.0)
        error = self._close_error()
        if error is not None:
            raise error

    def __enter__(self) -> Lease:
        if self._thread is None:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the body's exception is the one to see; this one is logged
            logger.exception("closing lease of %s/%s", self.tenant, self.metric)

    def _run(self) -> None:
        while True:
            self._event.clear()
            step = self.plan(self._clock())
            if step is DONE:
                return
            if isinstance(step, PlannedAsk):
                self._send(step)
            else:
                assert step is None or isinstance(step, float)
                self._event.wait(step)

    def _send(self, ask: PlannedAsk) -> None:
        """Send `ask` until it is answered or fails for good (same request id each time)."""
        request = lease_pb2.LeaseRequest(ask=ask.request)
        sent_at = self._clock()
        while True:
            try:
                response = self._call(
                    request, timeout=self.attempt_timeout(self._clock()), metadata=self._metadata
                )
            except grpc.RpcError as error:
                pause = self.pause_after(ask, error, self._clock())
                if pause is None:
                    return
                time.sleep(pause)
            else:
                answer = LeaseAnswer.from_pb(response.answer)
                pause = self.resend_after(ask, answer, self._clock())
                if pause is None:
                    self.applied(ask, answer, sent_at, self._clock())
                    return
                time.sleep(pause)
