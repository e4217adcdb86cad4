"""Where the CPU of a Check goes, layer by layer: a real gateway (``chargepath.app.Gateway``,
its embedded redis-server, authentication on) in this process, driven by a client process
over loopback, and this process' CPU per call measured over the calls (``time.process_time``:
every thread of the process, not the redis-server). Run once per configuration:

    python -m loadtest.check_layers --scenario over-limit            # the gateway as served
    python -m loadtest.check_layers --scenario over-limit --drop otel  # without the OTel
    python -m loadtest.check_layers --scenario over-limit --drop audit,auth,otel
    python -m loadtest.check_layers --scenario over-limit --profile /tmp/p.pstats

``--drop`` leaves interceptors out of the server (``audit``, ``auth``, ``otel``: by the name
of their class); with ``auth`` dropped the client sends no key and the gateway serves with
``--auth none``. ``--profile`` writes a cProfile of the event loop's thread over the
measured calls. A benchmark only: a gateway without its interceptors is not a thing to serve.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

PLANS = {
    "over-limit": "loadtest/overlimit-plans.yaml",
    "leased-hot": "loadtest/leased-plans.yaml",
    "check": "loadtest/bench-plans.yaml",
}
INTERCEPTORS = {
    "audit": "AuditInterceptor",
    "auth": "AuthInterceptor",
    "otel": "OpenTelemetryAioServerInterceptor",
}


async def client(target: str, key: str, calls: int, warmup: int, concurrency: int) -> None:
    """Send ``warmup`` then ``calls`` Checks (admits of one SMS for key-hot of cpaas-demo),
    ``concurrency`` at a time, printing ``go`` between the two and ``done`` at the end."""
    import grpc

    from chargepath_protos.v1 import metering_pb2 as pb
    from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    decisions: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MeteringServiceStub(channel)

        async def run(n: int) -> None:
            async def lane(count: int) -> None:
                for _ in range(count):
                    answer = await stub.Check(
                        pb.CheckRequest(
                            usage=pb.Usage(
                                request_id=uuid.uuid4().hex,
                                subject=pb.Subject(tenant="cpaas-demo", key="key-hot"),
                                metric="api.sms.send",
                                amount=1,
                                mode=pb.MODE_ADMIT,
                            )
                        ),
                        metadata=metadata,
                        timeout=10,
                    )
                    name = pb.Decision.Name(answer.verdict.decision).removeprefix("DECISION_")
                    decisions[name] = decisions.get(name, 0) + 1

            await asyncio.gather(*(lane(n // concurrency) for _ in range(concurrency)))

        await run(warmup)
        print("go", flush=True)
        decisions.clear()
        await run(calls)
        counts = " ".join(f"{k}={v}" for k, v in sorted(decisions.items()))
        print(f"done {counts}", flush=True)


async def serve(args: argparse.Namespace) -> None:
    import grpc

    from chargepath import telemetry as telemetry_module
    from chargepath.app import Gateway
    from chargepath.settings import Settings

    drop = {INTERCEPTORS[d] for d in args.drop.split(",") if d}
    real_server = grpc.aio.server

    def server(*a: Any, interceptors: Any = (), **kw: Any) -> Any:
        kept = [i for i in interceptors if type(i).__name__ not in drop]
        return real_server(*a, interceptors=kept, **kw)

    grpc.aio.server = server
    data = tempfile.mkdtemp(prefix="cp-layers-")
    settings = Settings.from_env(
        port=0,
        data_dir=data,
        plans=PLANS[args.scenario],
        overlimit_cache=args.scenario == "over-limit",
        auth="none" if "AuthInterceptor" in drop else "keys",
        insecure_allow_no_auth=True,
        log_level="WARNING",
    )
    setup = telemetry_module.for_gateway(settings)
    gateway = Gateway(settings, setup.telemetry)
    await gateway.start()
    try:
        key = ""
        if "AuthInterceptor" not in drop:
            key = (Path(data) / "operator.key").read_text().strip()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest.check_layers",
            "--client",
            f"127.0.0.1:{gateway.port}",
            "--key",
            key,
            "--calls",
            str(args.calls),
            "--warmup",
            str(args.warmup),
            "--concurrency",
            str(args.concurrency),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"go"
        profile = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        line = await proc.stdout.readline()
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await proc.wait()
        done, _, counts = line.decode().strip().partition(" ")
        assert done == "done", line
        calls = args.calls // args.concurrency * args.concurrency
        print(
            f"{args.scenario} drop={args.drop or '-'}: {calls} calls ({counts}), "
            f"{cpu / calls * 1e6:.0f} us CPU per call, {calls / wall:.0f} calls/s, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        if profile is not None:
            profile.dump_stats(args.profile)
    finally:
        await gateway.stop()
        setup.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(PLANS), default="over-limit")
    parser.add_argument("--drop", default="", help="audit,auth,otel: interceptors left out")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--profile", default="")
    parser.add_argument("--client", default="", help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client(args.client, args.key, args.calls, args.warmup, args.concurrency))
        return
    import uvloop

    uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
