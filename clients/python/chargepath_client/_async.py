"""`AsyncClient`: the asyncio client, on a `grpc.aio` channel.

async with AsyncClient("127.0.0.1:50051") as client:
    verdict = await client.check("cpaas-demo", "api.sms.send", 1, key="key-42")
    if verdict.decision is Decision.THROTTLE:
        await asyncio.sleep(verdict.retry_after)
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Literal

import grpc
import grpc.aio

from chargepath_client import _wire
from chargepath_client._base import BaseClient, CheckAttempts, logger
from chargepath_client._errors import ChargepathError
from chargepath_client._lease_async import AsyncLease
from chargepath_client._retry import RetryPolicy
from chargepath_client._stream import UsageStream
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import lease_pb2
from chargepath_protos.v1 import metering_pb2 as pb


class AsyncClient(BaseClient):
    """Asyncio client of a Chargepath gateway (the options are `__init__`'s).

    Use it as an async context manager, or call `close()`. One client (one channel) serves
    any number of concurrent calls and streams; create it once per process.
    """

    def _connect(
        self,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, int | str]],
    ) -> None:
        self._streams: weakref.WeakSet[UsageStream] = weakref.WeakSet()
        self._leases: weakref.WeakSet[AsyncLease] = weakref.WeakSet()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        self._check: _wire.CheckCall = self._channel.unary_unary(
            _wire.CHECK_METHOD,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )
        self._lease: _wire.LeaseCall = self._channel.unary_unary(
            _wire.LEASE_METHOD,
            request_serializer=lease_pb2.LeaseRequest.SerializeToString,
            response_deserializer=lease_pb2.LeaseResponse.FromString,
        )
        self._stream_usage: _wire.StartUsageStream = self._channel.stream_stream(
            _wire.STREAM_USAGE_METHOD,
            request_serializer=pb.StreamUsageRequest.SerializeToString,
            response_deserializer=pb.StreamUsageResponse.FromString,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running get CANCELLED after `grace` seconds.

        Streams still open are aborted first (their pending usages fail with StreamClosed):
        close your streams before the client to have them drained. Leases still open are
        closed (reported and released).
        """
        for stream in list(self._streams):
            await stream.abort()
        for lease in list(self._leases):
            try:
                await lease.close()
            except ChargepathError:
                logger.exception("closing lease of %s/%s", lease.tenant, lease.metric)
        await self._channel.close(grace)

    async def check(
        self,
        tenant: str,
        metric: str,
        amount: int,
        *,
        slice: str = "",
        key: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Verdict:
        """Admit: may `tenant` spend `amount` units of `metric` now?

        Units are taken only if the verdict is ALLOW. A THROTTLE or DENY is a Verdict, not an
        exception. `request_id` defaults to a new UUID; every retry reuses it, so the usage
        is never counted twice. `deadline` (seconds) overrides `default_deadline`.
        """
        usage = self._usage(
            Mode.ADMIT, tenant, metric, amount, slice, key, labels, request_id, None
        )
        return await self._decide(self._check_attempts(usage, deadline, metadata))

    async def report(
        self,
        tenant: str,
        metric: str,
        amount: int,
        *,
        slice: str = "",
        key: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        occurred_at: datetime | None = None,
        deadline: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Verdict:
        """Report: `tenant` has used `amount` units of `metric`.

        Always recorded and debited, even past a limit; the verdict says whether to go on
        (ALLOW), slow down (THROTTLE, `retry_after`) or stop (DENY). Check `recorded` and
        `spooled`: both False means nothing was recorded and the usage should be reported
        again with the same `request_id`. `occurred_at` defaults to the time the gateway
        receives it.
        """
        usage = self._usage(
            Mode.REPORT, tenant, metric, amount, slice, key, labels, request_id, occurred_at
        )
        return await self._decide(self._check_attempts(usage, deadline, metadata))

    def lease(
        self,
        tenant: str,
        metric: str,
        *,
        units: int,
        slice: str = "",
        key: str = "",
        holder: str = "",
        labels: Mapping[str, str] | None = None,
        report_every: float | None = 1.0,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> AsyncLease:
        """Hold a quota lease on `tenant`'s limits for `metric` (see `AsyncLease`): `async
        with client.lease(...) as lease:` asks for `units` (each grant, at most; the plan
        may grant fewer), then `lease.try_acquire(n)` decides locally, and a background task
        renews and reports. `holder` names this holder in the gateway's state (default: the
        caller's identity); `labels` go to the lease's ledger entries; `report_every`
        (seconds; None: at renewals only) bounds how long spent units wait to be reported.
        Validated like a usage (`InvalidUsage`)."""
        lease = AsyncLease(
            self._lease,
            _wire.metadata(self._metadata, metadata),
            tenant,
            metric,
            units=units,
            slice=slice,
            key=key,
            holder=holder,
            labels=labels,
            report_every=report_every,
            validate=self.validate,
            retry=self.retry,
            attempt_timeout=self.default_deadline,
        )
        self._leases.add(lease)
        return lease

    def stream(
        self,
        *,
        session_id: str | None = None,
        batch_size: int = 64,
        linger: float = 0.002,
        max_in_flight: int = 1024,
        first_sequence: int = 1,
        stall_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        view: Literal["full", "basic"] = "full",
    ) -> UsageStream:
        """Open a batching, reconnecting StreamUsage session (see `UsageStream`).

        `stall_timeout` (seconds; default `default_deadline`) is how long a sent batch may
        go unanswered before the connection is presumed dead and replaced. `view="basic"`
        asks for verdicts without limits when they are ALLOW with reason OK (much cheaper
        for the gateway and for this process on a busy report stream).
        """
        stream = UsageStream(
            self._stream_usage,
            session_id=session_id,
            batch_size=batch_size,
            linger=linger,
            max_in_flight=max_in_flight,
            first_sequence=first_sequence,
            stall_timeout=stall_timeout if stall_timeout is not None else self.default_deadline,
            retry=retry if retry is not None else self.retry,
            metadata=_wire.metadata(self._metadata, metadata),
            validate=self.validate,
            view=view,
        )
        self._streams.add(stream)
        return stream

    async def _decide(self, attempts: CheckAttempts) -> Verdict:
        while (timeout := attempts.next_timeout()) is not None:
            try:
                response = await self._check(
                    attempts.request, timeout=timeout, metadata=attempts.metadata
                )
            except grpc.aio.AioRpcError as error:
                await asyncio.sleep(attempts.pause_after(error))
            else:
                return attempts.verdict(response)
        raise attempts.exhausted()
