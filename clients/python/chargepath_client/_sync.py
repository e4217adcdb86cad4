"""`Client`: the blocking client, on grpc's synchronous channel (no event loop involved).

with Client("127.0.0.1:50051") as client:
    verdict = client.report("mvno-demo", "slice.bytes", 1_500_000, slice="1-000001")
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType

import grpc

from chargepath_client import _wire
from chargepath_client._base import BaseClient, CheckAttempts, logger
from chargepath_client._errors import ChargepathError
from chargepath_client._lease_sync import Lease
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import lease_pb2
from chargepath_protos.v1 import metering_pb2 as pb


class Client(BaseClient):
    """Blocking client of a Chargepath gateway; same arguments and calls as `AsyncClient`
    (without `stream`). Thread-safe: one client may serve many threads."""

    def _connect(
        self,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, int | str]],
    ) -> None:
        self._leases: weakref.WeakSet[Lease] = weakref.WeakSet()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._check: _wire.BlockingCheckCall = self._channel.unary_unary(
            _wire.CHECK_METHOD,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )
        self._lease: _wire.BlockingLeaseCall = self._channel.unary_unary(
            _wire.LEASE_METHOD,
            request_serializer=lease_pb2.LeaseRequest.SerializeToString,
            response_deserializer=lease_pb2.LeaseResponse.FromString,
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
        """Close the channel; calls still running are cancelled. Leases still open are
        closed first (reported and released)."""
        for lease in list(self._leases):
            try:
                lease.close()
            except ChargepathError:
                logger.exception("closing lease of %s/%s", lease.tenant, lease.metric)
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
        usage = self._usage(
            Mode.ADMIT, tenant, metric, amount, slice, key, labels, request_id, None
        )
        return self._decide(self._check_attempts(usage, deadline, metadata))

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
        usage = self._usage(
            Mode.REPORT, tenant, metric, amount, slice, key, labels, request_id, occurred_at
        )
        return self._decide(self._check_attempts(usage, deadline, metadata))

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
    ) -> Lease:
        """Hold a quota lease on `tenant`'s limits for `metric` (see `Lease`): `with
        client.lease(...) as lease:` asks for `units` (each grant, at most; the plan may
        grant fewer), then `lease.try_acquire(n)` decides locally. `holder` names this holder
        in the gateway's state (default: the caller's identity); `labels` go to the lease's
        ledger entries; `report_every` (seconds; None: at renewals only) bounds how long
        spent units wait to be reported. Validated like a usage (`InvalidUsage`)."""
        lease = Lease(
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

    def _decide(self, attempts: CheckAttempts) -> Verdict:
        while (timeout := attempts.next_timeout()) is not None:
            try:
                response = self._check(
                    attempts.request, timeout=timeout, metadata=attempts.metadata
                )
            except grpc.RpcError as error:
                time.sleep(attempts.pause_after(error))
            else:
                return attempts.verdict(response)
        raise attempts.exhausted()
