"""`Client` and `AsyncClient` share everything that is not I/O: the same request for every
attempt, the same retry decisions, the same metadata (api key included) and the same options.
Each client runs here against a fake Check stub (no network, no sleeping: zero backoff)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from chargepath_client import (
    AsyncClient,
    Client,
    Decision,
    InvalidUsage,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    Verdict,
)
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit

API_KEY = "ck_live_0123456789abcdef"
NO_WAIT = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0)


class FakeCheck:
    """Answers attempts from a script: a status code fails the attempt, None allows it."""

    def __init__(self, *script: grpc.StatusCode | None) -> None:
        self.script = list(script)
        self.attempts: list[tuple[pb.CheckRequest, float, tuple[tuple[str, str], ...]]] = []

    def answer(self, request: pb.CheckRequest, timeout: float, metadata: Any) -> pb.CheckResponse:
        self.attempts.append((request, timeout, tuple(metadata)))
        code = self.script.pop(0)
        if code is not None:
            raise fail(code)
        return pb.CheckResponse(
            verdict=pb.Verdict(
                request_id=request.usage.request_id,
                decision=pb.DECISION_ALLOW,
                reason=pb.REASON_OK,
                recorded=True,
            )
        )


def fail(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    # AioRpcError is a grpc.RpcError too: what both clients catch.
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "it failed")


def run_sync(fake: FakeCheck, call: Callable[[Any], Any], **options: Any) -> Any:
    with Client("127.0.0.1:9", **options) as client:

        def check(request: pb.CheckRequest, *, timeout: float, metadata: Any) -> Any:
            return fake.answer(request, timeout, metadata)

        client._check = check
        return call(client)


async def run_async(fake: FakeCheck, call: Callable[[Any], Any], **options: Any) -> Any:
    async with AsyncClient("127.0.0.1:9", **options) as client:
        # The grpc stub's own signature, timeout included.
        async def check(request: pb.CheckRequest, *, timeout: float, metadata: Any) -> Any:  # noqa: ASYNC109
            return fake.answer(request, timeout, metadata)

        client._check = check
        return await call(client)


async def drive(
    run: Callable[..., Any], fake: FakeCheck, call: Callable[[Any], Any], **options: Any
) -> Any:
    """Run `call` on the client `run` makes; the sync client's calls block (on the fake only)."""
    result = run(fake, call, **options)
    return await result if isinstance(result, Awaitable) else result


RUNNERS = pytest.mark.parametrize("run", [run_sync, run_async], ids=["sync", "async"])


@RUNNERS
async def test_every_attempt_sends_the_same_request_with_the_api_key(run: Any) -> None:
    fake = FakeCheck(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    verdict = await drive(
        run,
        fake,
        lambda c: c.report(
            "mvno-demo",
            "slice.bytes",
            1500,
            slice="1-000001",
            key="sub-1",
            labels={"cell": "A"},
            request_id="r-1",
            metadata=[("X-Trace", "t")],
        ),
        retry=NO_WAIT,
        api_key=API_KEY,
        metadata=[("x-tenant", "mvno-demo")],
    )
    assert isinstance(verdict, Verdict)
    assert verdict.decision is Decision.ALLOW and verdict.request_id == "r-1"
    requests = [request for request, _, _ in fake.attempts]
    assert len(requests) == 3 and requests[0] == requests[1] == requests[2]
    usage = requests[0].usage
    assert (usage.subject.tenant, usage.subject.slice, usage.subject.key) == (
        "mvno-demo",
        "1-000001",
        "sub-1",
    )
    assert (usage.metric, usage.amount, usage.mode) == ("slice.bytes", 1500, pb.MODE_REPORT)
    assert dict(usage.labels) == {"cell": "A"}
    sent = (
        ("authorization", f"Bearer {API_KEY}"),
        ("x-tenant", "mvno-demo"),
        ("x-trace", "t"),
    )
    # every attempt after the first says it is a retry, once: a gateway's over-limit cache
    # then leaves it to the store's dedup record
    assert [metadata for _, _, metadata in fake.attempts] == [
        sent,
        (*sent, ("chargepath-retry", "1")),
        (*sent, ("chargepath-retry", "1")),
    ]


@RUNNERS
async def test_a_check_is_an_admit_with_a_generated_request_id(run: Any) -> None:
    fake = FakeCheck(None)
    verdict = await drive(
        run, fake, lambda c: c.check("cpaas-demo", "api.sms.send", 1), retry=NO_WAIT
    )
    [(request, timeout, metadata)] = fake.attempts
    assert request.usage.mode == pb.MODE_ADMIT
    assert len(request.usage.request_id) == 36 and verdict.request_id == request.usage.request_id
    assert 0 < timeout <= 2.0  # default_deadline
    assert metadata == ()  # no api key, no authorization


@RUNNERS
async def test_a_permanent_failure_is_raised_at_once_without_the_key(run: Any) -> None:
    fake = FakeCheck(grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(Unauthenticated) as caught:
        await drive(run, fake, lambda c: c.check("cpaas-demo", "api.sms.send", 1), api_key=API_KEY)
    assert len(fake.attempts) == 1
    assert API_KEY not in str(caught.value) and API_KEY not in repr(caught.value)


@RUNNERS
async def test_retries_stop_at_max_attempts(run: Any) -> None:
    fake = FakeCheck(*[grpc.StatusCode.UNAVAILABLE] * 3)
    with pytest.raises(Unavailable) as caught:
        await drive(run, fake, lambda c: c.check("cpaas-demo", "api.sms.send", 1), retry=NO_WAIT)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(fake.attempts) == 3


@RUNNERS
async def test_arguments_are_validated_before_any_attempt(run: Any) -> None:
    fake = FakeCheck()
    with pytest.raises(InvalidUsage) as caught:
        await drive(run, fake, lambda c: c.check("cpaas demo", "api.sms.send", 1))
    assert caught.value.field == "tenant"
    assert fake.attempts == []


@pytest.mark.parametrize("cls", [Client, AsyncClient])
async def test_the_api_key_stays_out_of_attributes_and_reprs(cls: type[Any]) -> None:
    client = cls("127.0.0.1:9", api_key=API_KEY)
    public = {k: v for k, v in vars(client).items() if not k.startswith("_")}
    shown = repr(client)
    closed = client.close()
    if isinstance(closed, Awaitable):
        await closed
    assert API_KEY not in shown
    assert set(public) == {"target", "default_deadline", "retry", "validate"}
    assert all(API_KEY not in repr(value) for value in public.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"api_key": ""}, "api_key"),
        ({"api_key": API_KEY + "\n"}, "api_key"),
        ({"api_key": "clé"}, "api_key"),
        ({"api_key": API_KEY, "metadata": [("Authorization", "Bearer other")]}, "api_key"),
        ({"tls_cert": b"cert"}, "tls_key"),
        ({"tls_key": b"key"}, "tls_key"),
        (
            {"tls_ca": b"ca", "credentials": grpc.ssl_channel_credentials()},
            "credentials",
        ),
        ({"tls_server_name": "gateway.example"}, "tls_server_name"),
        ({"default_deadline": 0}, "default_deadline"),
    ],
)
@pytest.mark.parametrize("cls", [Client, AsyncClient])
async def test_inconsistent_options_are_refused(
    cls: type[Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        cls("127.0.0.1:9", **options)
    assert API_KEY not in str(caught.value)


def test_tls_material_is_read_from_files(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:9", tls_ca=missing)
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:9", tls_ca=str(missing))
