"""`Client`: the blocking client, on grpc's synchronous channel (no event loop involved).

with Client("127.0.0.1:50051") as client:
    verdict = client.report("mvno-demo", "slice.bytes", 1_500_000, slice="1-000001")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType

import grpc

from chargepath_client import _wire
from chargepath_client._errors import ChargepathError, DeadlineExceeded, from_rpc_error
from chargepath_client._retry import Attempts, RetryPolicy
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import metering_pb2 as pb

logger = logging.getLogger("chargepath_client")


class Client:
    """Blocking client of a Chargepath gateway; same arguments and calls as `AsyncClient`
    (without `stream`). Thread-safe: one client may serve many threads."""

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
        channel_options = [*_wire.DEFAULT_CHANNEL_OPTIONS, *options]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._check: _wire.BlockingCheckCall = self._channel.unary_unary(
            _wire.CHECK_METHOD,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def check(
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
        """Admit: may `tenant` spend `amount` units of `metric` now? See `AsyncClient.check`."""
        return self._decide(
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

    def report(
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
        """Report: `tenant` has used `amount` units of `metric`. See `AsyncClient.report`."""
        return self._decide(
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

    def _decide(
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
                response = self._check(request, timeout=timeout, metadata=call_metadata)
            except grpc.RpcError as error:
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
                time.sleep(pause)
                continue
            return Verdict.from_pb(response.verdict)
        raise last_error or DeadlineExceeded("deadline exceeded", request_id=request_id)
