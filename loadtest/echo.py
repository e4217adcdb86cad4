"""The gRPC ceiling: a bare grpc.aio MeteringService that answers every usage with a canned
verdict, without deciding anything.

Same service, same messages, verdicts of the same shape and size as the gateway's (an ALLOW with
the limits the demo plans touch: three for an admit, four for a report), so a run against it
measures what gRPC, protobuf and the load generator cost on this machine, and nothing else.

Run it with ``python -m loadtest.echo [--port N]``; it prints ``listening on HOST:PORT`` once
it accepts calls, and stops on SIGTERM or SIGINT.

With ``--tls-cert FILE --tls-key FILE`` it serves over TLS (and with ``--tls-client-ca FILE``,
mTLS), with the gateway's TLS credentials (:mod:`chargepath.transport.tls`): the ceiling of a
gateway that serves TLS.

With ``--redis-url URL`` every Check call and every stream message first awaits one Redis round
trip through redis.asyncio (an ``EVALSHA`` of a script that returns at once, on a pool like the
gateway's store): the floor of any gateway of this stack that consults Redis once per call,
with no decision logic at all.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio
import uvloop

from chargepath.transport.tls import ServerCertificates, TlsConfigError, TlsFiles
from chargepath_protos.v1 import metering_pb2 as pb

SERVICE = "chargepath.v1.MeteringService"
ROUND_TRIP_SCRIPT = "return 1"


def canned_verdict(mode: int) -> pb.Verdict:
    """An ALLOW shaped like the gateway's for ``mode``: limits, ids, version, timestamps."""
    verdict = pb.Verdict(
        decision=pb.DECISION_ALLOW,
        reason=pb.REASON_OK,
        policy_version=1,
        decision_id="0123456789abcdef0123456789abcdef",
        recorded=True,
        trace_id="fedcba9876543210fedcba9876543210",
    )
    verdict.decided_at.GetCurrentTime()
    if mode == pb.MODE_ADMIT:
        limits = [
            ("sms-per-key", pb.LIMIT_KIND_RATE, pb.SCOPE_KEY, 19, 20, 100),
            ("sms-account", pb.LIMIT_KIND_RATE, pb.SCOPE_TENANT, 199, 200, 10),
            ("sms-monthly", pb.LIMIT_KIND_QUOTA, pb.SCOPE_TENANT, 999_999, 1_000_000, 2_000_000),
        ]
    else:
        limits = [
            (
                "tenant-bytes-rate",
                pb.LIMIT_KIND_RATE,
                pb.SCOPE_TENANT,
                1_999_998_500,
                2_000_000_000,
                2,
            ),
            (
                "tenant-bytes-monthly",
                pb.LIMIT_KIND_QUOTA,
                pb.SCOPE_TENANT,
                49_999_999_998_500,
                50_000_000_000_000,
                2_000_000_000,
            ),
            ("slice-bytes-rate", pb.LIMIT_KIND_RATE, pb.SCOPE_SLICE, 199_998_500, 200_000_000, 15),
            (
                "slice-bytes-monthly",
                pb.LIMIT_KIND_QUOTA,
                pb.SCOPE_SLICE,
                9_999_999_998_500,
                10_000_000_000_000,
                2_000_000_000,
            ),
        ]
    for name, kind, scope, remaining, capacity, reset_ms in limits:
        status = verdict.limits.add(
            name=name, kind=kind, scope=scope, remaining=remaining, capacity=capacity
        )
        status.reset_after.FromMilliseconds(reset_ms)
    return verdict


class EchoService:
    """Check and StreamUsage, answered with canned verdicts carrying the request ids; after one
    Redis round trip each when ``redis_client`` is given."""

    def __init__(self, redis_client: redis.asyncio.Redis | None = None) -> None:
        self._redis = redis_client
        self._sha = ""
        self._verdicts = {m: canned_verdict(m) for m in (pb.MODE_ADMIT, pb.MODE_REPORT)}
        # VERDICT_VIEW_BASIC: an ALLOW lists no limits
        self._basic = {m: pb.Verdict() for m in self._verdicts}
        for m, v in self._verdicts.items():
            self._basic[m].CopyFrom(v)
            del self._basic[m].limits[:]

    async def prepare(self) -> None:
        if self._redis is not None:
            self._sha = await self._redis.script_load(ROUND_TRIP_SCRIPT)

    async def _round_trip(self) -> None:
        if self._redis is not None:
            await self._redis.evalsha(self._sha, 0)

    def _canned(self, view: int) -> dict[pb.Mode, pb.Verdict]:
        return self._basic if view == pb.VERDICT_VIEW_BASIC else self._verdicts

    async def check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        await self._round_trip()
        resp = pb.CheckResponse()
        canned = self._canned(request.view)
        verdict = canned.get(request.usage.mode, canned[pb.MODE_ADMIT])
        resp.verdict.CopyFrom(verdict)
        resp.verdict.request_id = request.usage.request_id
        return resp

    async def stream_usage(
        self,
        requests: AsyncIterator[pb.StreamUsageRequest],
        context: grpc.aio.ServicerContext[pb.StreamUsageRequest, pb.StreamUsageResponse],
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        async for req in requests:
            await self._round_trip()
            canned = self._canned(req.view)
            fallback = canned[pb.MODE_REPORT]
            resp = pb.StreamUsageResponse()
            for usage in req.usages:
                v = resp.verdicts.add()
                v.CopyFrom(canned.get(usage.mode, fallback))
                v.request_id = usage.request_id
            yield resp

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=pb.CheckRequest.FromString,
                    response_serializer=pb.CheckResponse.SerializeToString,
                ),
                "StreamUsage": grpc.stream_stream_rpc_method_handler(
                    self.stream_usage,
                    request_deserializer=pb.StreamUsageRequest.FromString,
                    response_serializer=pb.StreamUsageResponse.SerializeToString,
                ),
            },
        )


async def serve(host: str, port: int, redis_url: str = "", tls: TlsFiles | None = None) -> None:
    client = None
    if redis_url:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, decode_responses=True, max_connections=64, timeout=None
        )
        client = redis.asyncio.Redis.from_pool(pool)
    service = EchoService(client)
    await service.prepare()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([service.handler()])
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", ServerCertificates(tls).credentials())
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    if client is not None:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument(
        "--redis-url",
        default="",
        help="await one Redis round trip (EVALSHA of a script that returns at once) per Check "
        "call and per stream message before answering",
    )
    parser.add_argument("--tls-cert", default="", metavar="FILE", help="serve TLS: cert chain")
    parser.add_argument("--tls-key", default="", metavar="FILE", help="serve TLS: private key")
    parser.add_argument(
        "--tls-client-ca",
        default="",
        metavar="FILE",
        help="mTLS: require client certificates issued by a CA in this file",
    )
    args = parser.parse_args(argv)
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            parser.error("--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        tls = TlsFiles(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.tls_client_ca) if args.tls_client_ca else None,
        )
        try:  # a bad file is one line, not a traceback
            ServerCertificates(tls)
        except TlsConfigError as exc:
            parser.error(str(exc))
    uvloop.run(serve(args.host, args.port, args.redis_url, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
