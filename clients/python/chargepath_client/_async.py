"""`AsyncClient`: the asyncio client, on a `grpc.aio` channel.

async with AsyncClient("127.0.0.1:50051") as client:
    verdict = await client.check("cpaas-demo", "api.sms.send", 1, key="key-42")
    if verdict.decision is Decision.THROTTLE:
        await asyncio.sleep(verdict.retry_after)
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Literal

import grpc
import grpc.aio

from chargepath_client import _wire
from chargepath_client._errors import ChargepathError, DeadlineExceeded, from_rpc_error
from chargepath_client._retry import Attempts, RetryPolicy
from chargepath_client._stream import UsageStream
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import metering_pb2 as pb

logger = logging.getLogger("chargepath_client")


class AsyncClient:
    """Asyncio client of a Chargepath gateway.

    - `target`: "host:port" of the gateway.
    - `credentials`: `grpc.ssl_channel_credentials(...)` (and friends) for TLS/mTLS; None
      for a plaintext channel.
    - `metadata`: (key, value) pairs sent with every call, e.g. a tenant credential.
    - `default_deadline`: seconds a `check`/`report` may take in all, retries included.
    - `retry`: what is retried and how (see `RetryPolicy`).
    - `validate`: check arguments client-side before sending (turn off only to exercise
      the server's own validation).
    - `options`: extra grpc channel options.

    Use it as an async context manager, or call `close()`. One client (one channel) serves
    any number of concurrent calls and streams; create it once per process.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        default_deadline: float = 2.0,
        retry: RetryPolicy | None = None,
        validate: bool = True,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        if default_deadline <= 0:
            raise ValueError("default_deadline must be positive")
        self.target = target
        self.default_deadline = default_deadline
        self.retry = retry if retry is not None else RetryPolicy()
        self.validate = validate
        self._metadata = _wire.metadata(metadata)
        self._streams: weakref.WeakSet[UsageStream] = weakref.WeakSet()
        channel_options = [*_wire.DEFAULT_CHANNEL_OPTIONS, *options]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._check: _wire.CheckCall = self._channel.unary_unary(
            _wire.CHECK_METHOD,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
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
        close your streams before the client to have them drained.
        """
        for stream in list(self._streams):
            await stream.abort()
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
        return await self._decide(
            Mode.ADMIT,
            tenant=tenant,
            metric=metric,
            amount=amount,
            slice=slice,
            key=key,
            labels=labels,
            request_id=request_id,
            occurred_at=None,
            deadline=deadline,
            metadata=metadata,
        )

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
        (ALLOW), slow down (THROTTLE, `retry_after`) or stop (DENY). Check `recorded`: False
        means nothing was recorded and the usage should be reported again with the same
        `request_id`. `occurred_at` defaults to the time the gateway receives it.
        """
        return await self._decide(
            Mode.REPORT,
            tenant=tenant,
            metric=metric,
            amount=amount,
            slice=slice,
            key=key,
            labels=labels,
            request_id=request_id,
            occurred_at=occurred_at,
            deadline=deadline,
            metadata=metadata,
        )

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

    async def _decide(
        self,
        mode: Mode,
        *,
        tenant: str,
        metric: str,
        amount: int,
        slice: str,
        key: str,
        labels: Mapping[str, str] | None,
        request_id: str | None,
        occurred_at: datetime | None,
        deadline: float | None,
        metadata: Sequence[tuple[str, str]] | None,
    ) -> Verdict:
        request = _wire.check_request(
            mode,
            validate=self.validate,
            tenant=tenant,
            metric=metric,
            amount=amount,
            slice=slice,
            key=key,
            labels=labels,
            request_id=request_id,
            occurred_at=occurred_at,
        )
        request_id = request.usage.request_id
        call_metadata = _wire.metadata(self._metadata, metadata)
        attempts = Attempts(self.retry, deadline if deadline is not None else self.default_deadline)
        last_error: ChargepathError | None = None
        while (timeout := attempts.start()) is not None:
            try:
                response = await self._check(request, timeout=timeout, metadata=call_metadata)
            except grpc.aio.AioRpcError as error:
                last_error = from_rpc_error(error, request_id=request_id)
                pause = attempts.retry_after(error.code(), error.details())
                if pause is None:
                    raise last_error from error
                logger.info(
                    "check %s: attempt %d failed with %s, retrying in %.3fs",
                    request_id,
                    attempts.made,
                    error.code().name,
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            return Verdict.from_pb(response.verdict)
        raise last_error or DeadlineExceeded("deadline exceeded", request_id=request_id)
