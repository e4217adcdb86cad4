"""End-to-end fixtures: a real ``chargepath serve`` process on the demo plans, on its own
real redis-server, on free ports.

Gateways run as they ship: authentication on. A :class:`GatewayProcess` knows the operator key
the gateway wrote to its data dir (:attr:`~GatewayProcess.operator_key`); tests that are not
about authentication call it through :meth:`~GatewayProcess.channel` (a channel that sends the
key with every call), :attr:`~GatewayProcess.metadata`, or ``api_key=gateway.operator_key`` for
the clients. The operator acts for every tenant, so such tests see exactly what they saw when
the gateway had no authentication."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chargepath.cli.connection import with_api_key
from chargepath.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_PLANS = ROOT / "examples" / "plans.yaml"


@dataclass
class GatewayProcess:
    address: str
    redis_url: str
    redis: EmbeddedRedis | None
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The gateway's --data-dir: its operator.key is there.
    data_dir: Path
    #: TLS credentials to reach it; None: plaintext.
    credentials: grpc.ChannelCredentials | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def operator_key(self) -> str:
        """The operator key the gateway wrote on its first start."""
        return (self.data_dir / "operator.key").read_text(encoding="ascii").strip()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with the operator key."""
        return (("authorization", f"Bearer {self.operator_key}"),)

    def raw_channel(self, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        """A channel with no credential (TLS if the gateway serves TLS)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self.credentials, options=options)

    def channel(
        self, key: str | None = None, options: list[tuple[str, object]] | None = None
    ) -> grpc.Channel:
        """A channel that sends ``key`` (default: the operator key) with every call."""
        return with_api_key(self.raw_channel(options), key or self.operator_key)

    def health(self, timeout: float = 2.0) -> int:
        with self.raw_channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return int(
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
            )

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_gateway(
    workdir: Path,
    *,
    plans: Path | None = DEMO_PLANS,
    embedded: bool = False,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    redis_url: str = "",
    workers: int = 1,
    credentials: grpc.ChannelCredentials | None = None,
    data_dir: Path | None = None,
    ready_line: str | None = None,
    port: int | None = None,
) -> GatewayProcess:
    """Start ``chargepath serve`` and wait until its health service says SERVING: on its own
    new redis-server, on ``redis_url`` if given, or on the embedded one if ``embedded``.
    ``credentials``: how to reach it when ``extra_args`` make it serve TLS. ``data_dir``
    (default ``workdir/data``) is passed as --data-dir unless it is serve's default,
    ``workdir/.chargepath`` (the gateway runs in ``workdir``). ``ready_line``: wait for this
    text in the log instead (for a gateway no health check can reach). ``port``: listen there
    (to restart a gateway where its clients look for it); default a free port."""
    if any(a == "--data-dir" or a.startswith("--data-dir=") for a in extra_args):
        # it would be overridden by the one given below: say so rather than test another dir
        raise ValueError("start_gateway: pass the data dir as data_dir=, not in extra_args")
    workdir.mkdir(parents=True, exist_ok=True)
    server: EmbeddedRedis | None = None
    data = data_dir or workdir / "data"
    args = [
        sys.executable,
        "-m",
        "chargepath",
        "serve",
        "--port",
        str(port := port or free_port()),
        "--workers",
        str(workers),
        *extra_args,
    ]
    if data != workdir / ".chargepath":
        args += ["--data-dir", str(data)]
    if plans is not None:
        args += ["--plans", str(plans)]
    url = redis_url
    if redis_url:
        args += ["--redis-url", redis_url]
    elif not embedded:
        server = EmbeddedRedis(workdir / "redis")
        server.start()
        url = server.url
        args += ["--redis-url", url]
    log_path = workdir / "gateway.log"
    proc_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=proc_env, cwd=workdir
        )
    gw = GatewayProcess(f"127.0.0.1:{port}", url, server, process, log_path, data, credentials)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
        if ready_line is not None:
            if ready_line in gw.log():
                return gw
            time.sleep(0.1)
            continue
        try:
            if gw.health(timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                return gw
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    gw.stop()
    raise TimeoutError(f"gateway not SERVING within 30 s:\n{gw.log()}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A live gateway on the demo plans, with a fresh Redis for each test module."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


@pytest.fixture
def redis_client(gateway: GatewayProcess) -> Iterator[redis.Redis]:
    """A sync client on the gateway's Redis (to check the ledger and counters)."""
    client = redis.Redis.from_url(gateway.redis_url, decode_responses=True)
    yield client
    client.close()
