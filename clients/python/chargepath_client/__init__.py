"""Python client of the Chargepath metering gateway (`chargepath.v1.MeteringService`).

Ask before the work (admit) with `check`, tell after it (report) with `report`; both return
a `Verdict` (ALLOW, THROTTLE or DENY, with the reason, `retry_after` in seconds and the state
of every limit touched). A THROTTLE or DENY is data, never an exception; exceptions
(`ChargepathError` and its subclasses) are for real failures.

Asyncio:

    import asyncio
    from chargepath_client import AsyncClient, Decision

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051") as client:
            verdict = await client.check("cpaas-demo", "api.sms.send", 1, key="key-42")
            if verdict.decision is Decision.THROTTLE:
                await asyncio.sleep(verdict.retry_after)

            # Many usages over one stream, batched and resent after a reconnect:
            async with client.stream() as stream:
                verdict = await stream.submit(
                    tenant="mvno-demo", slice="1-000001", metric="slice.bytes", amount=1_500_000
                )

    asyncio.run(main())

Blocking (grpc's synchronous channel, no event loop):

    from chargepath_client import Client

    with Client("127.0.0.1:50051") as client:
        verdict = client.report("mvno-demo", "slice.bytes", 1_500_000, slice="1-000001")
        print(verdict.decision, verdict.reason, verdict.limits)

Quota leases (decide locally, without a round trip): a lease takes up to `units` from every
limit of the subject's plan on the metric (the limits must allow leases in the plan); then
`try_acquire(n)` decides in well under a microsecond, and a background thread (or task)
renews the lease before it runs out, reports what was spent (recorded in the ledger once,
retried with the same request id) and, on closing, gives the unspent units back:

    with client.lease("cpaas-demo", "api.sms.send", units=1000, key="key-42") as lease:
        for message in outbox:
            if not lease.try_acquire():
                break                  # nothing left now: lease.last_answer says why
            send(message)

A process that dies with units spent and not reported loses at most one grant's worth of
usage to the ledger (less with `report_every`); the lease's units come back at its expiry.

Retries: every call carries a request id (a new UUID unless you pass `request_id=`); a
transient failure (UNAVAILABLE, RESOURCE_EXHAUSTED, a per-attempt timeout) is retried with
the same id, exponential backoff and jitter, within the call's overall deadline
(`default_deadline`, or `deadline=` per call). The gateway answers a repeat from its record
(`verdict.replayed`), so nothing is counted twice. See `RetryPolicy`.

TLS and credentials: plaintext unless told otherwise. `tls_ca=` (a PEM file or bytes) verifies
the gateway's certificate, `tls_cert=`/`tls_key=` present a client certificate (mutual TLS),
`tls_server_name=` checks the certificate against another name than the target's host, and
`api_key=` goes as `authorization: Bearer <key>` with every call and stream:

    async with AsyncClient(
        "gateway.example:50051", tls_ca="ca.pem", api_key=os.environ["CHARGEPATH_API_KEY"]
    ) as client:
        ...

Validation: arguments are checked against the server's rules before sending; a bad one
raises `InvalidUsage` (a `ValueError`) naming the field, as does the server's
INVALID_ARGUMENT:

    try:
        await client.check("cpaas demo", "api.sms.send", 1)
    except InvalidUsage as error:
        print(error.field, error.reason)   # tenant  must be 1 to 64 characters of ...
"""

from chargepath_client._async import AsyncClient
from chargepath_client._errors import (
    ChargepathError,
    DeadlineExceeded,
    InvalidUsage,
    PermissionDenied,
    ResourceExhausted,
    StreamClosed,
    StreamFull,
    Unauthenticated,
    Unavailable,
)
from chargepath_client._lease import LeaseAnswer
from chargepath_client._lease_async import AsyncLease
from chargepath_client._lease_sync import Lease
from chargepath_client._retry import RetryPolicy
from chargepath_client._stream import UsageStream
from chargepath_client._sync import Client
from chargepath_client._validation import validate_usage
from chargepath_client._verdict import (
    Decision,
    LimitKind,
    LimitStatus,
    Mode,
    Reason,
    Scope,
    Verdict,
)

__all__ = [
    "AsyncClient",
    "AsyncLease",
    "ChargepathError",
    "Client",
    "DeadlineExceeded",
    "Decision",
    "InvalidUsage",
    "Lease",
    "LeaseAnswer",
    "LimitKind",
    "LimitStatus",
    "Mode",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "RetryPolicy",
    "Scope",
    "StreamClosed",
    "StreamFull",
    "Unauthenticated",
    "Unavailable",
    "UsageStream",
    "Verdict",
    "validate_usage",
]

# Public objects say they live here, not in the private module that defines them
# (as httpx does), so reprs and docs show `chargepath_client.Verdict`.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("chargepath_client."):
        _obj.__module__ = "chargepath_client"
del _name, _obj
