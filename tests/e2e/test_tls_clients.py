"""The TLS options of the first-party clients other than the Python client: the Node.js and Go
examples (--tls-ca, --tls-cert/--tls-key, --api-key) and the load generator (the same options,
with either generator; the echo ceiling over TLS).

The server is a real grpc.aio server in this test process, with the gateway's TLS credentials
(chargepath.transport.tls) and the load generator's echo MeteringService, which records what
every call carried: its ``authorization`` metadata and the identities of its client
certificate. (The gateway itself takes no TLS options yet; they are wired in later.) The
clients run as subprocesses, awaited without blocking the loop that serves them.

The examples and the Go generator are built by `make clients`: a missing build is a failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from chargepath.transport.tls import ServerCertificates, TlsFiles, peer_identities
from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.echo import EchoService
from tests.e2e.test_interop import VERDICT_FIELDS, example_command
from tests.e2e.test_loadtest_smoke import GO_LOADGEN, assert_answered_cleanly

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = ("node", "go")
RUN_TIMEOUT_S = 60.0
API_KEY = "cp_test_0123456789abcdef"
CLIENT_NAMES = ["meter-1.clients.test", "meter-1"]  # the client certificate's SAN DNS, CN


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate it issued,
    and an unrelated CA."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server(self, *, mutual: bool) -> TlsFiles:
        return TlsFiles(self.server_cert, self.server_key, self.ca if mutual else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert(CLIENT_NAMES[0], common_name=CLIENT_NAMES[1])
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    (d / "server.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    (d / "client.pem").write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    return Pki(
        d / "ca.pem",
        d / "other-ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
    )


@dataclass
class Seen:
    """One call as the server saw it."""

    method: str
    authorization: str | None
    identities: tuple[str, ...]


class RecordingEcho(EchoService):
    """The echo MeteringService, noting what each call carried before answering it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Seen] = []

    def note(self, method: str, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        identities = peer_identities(context.auth_context())
        self.calls.append(Seen(method, metadata.get("authorization"), identities))

    async def check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        self.note("Check", context)
        return await super().check(request, context)

    async def stream_usage(self, requests: Any, context: Any) -> Any:
        self.note("StreamUsage", context)
        async for response in super().stream_usage(requests, context):
            yield response


@asynccontextmanager
async def tls_echo(files: TlsFiles) -> AsyncIterator[tuple[str, RecordingEcho]]:
    echo = RecordingEcho()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([echo.handler()])
    port = server.add_secure_port("127.0.0.1:0", ServerCertificates(files).credentials())
    await server.start()
    try:
        yield f"127.0.0.1:{port}", echo
    finally:
        await server.stop(None)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


async def run(*command: str) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def script(tmp_path: Path, language: str) -> tuple[Path, list[str]]:
    """A script of one Check and a stream of one batch of two; its request ids."""
    ids = [f"tls-{language}-c1", f"tls-{language}-s1", f"tls-{language}-s2"]
    usage = {"subject": {"tenant": "cpaas-demo", "key": "k"}, "metric": "api.sms.send"}
    body = {
        "check": [{**usage, "request_id": ids[0], "amount": 1, "mode": "MODE_ADMIT"}],
        "stream": {
            "session_id": f"tls-{language}",
            "batches": [
                [
                    {**usage, "request_id": rid, "amount": 1, "mode": "MODE_REPORT", "sequence": n}
                    for n, rid in enumerate(ids[1:], start=1)
                ]
            ],
        },
    }
    path = tmp_path / f"{language}-tls-script.json"
    path.write_text(json.dumps(body))
    return path, ids


async def run_example(language: str, address: str, path: Path, *args: str) -> Run:
    return await run(*example_command(language), "--addr", address, "--script", str(path), *args)


def answered(result: Run, ids: list[str]) -> None:
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["request_id"] for line in lines] == ids
    assert all(list(line) == VERDICT_FIELDS for line in lines)
    assert {line["decision"] for line in lines} == {"DECISION_ALLOW"}


def refused(result: Run) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Check failed: UNAVAILABLE" in result.stderr, result.stderr
    assert result.stdout == ""


# --- the examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_over_tls_sends_its_api_key_on_every_call(
    language: str, pki: Pki, tmp_path: Path
) -> None:
    path, ids = script(tmp_path, language)
    async with tls_echo(pki.server(mutual=False)) as (address, echo):
        result = await run_example(
            language, address, path, "--tls-ca", str(pki.ca), "--api-key", API_KEY
        )
    answered(result, ids)
    assert [(c.method, c.authorization, c.identities) for c in echo.calls] == [
        ("Check", f"Bearer {API_KEY}", ()),
        ("StreamUsage", f"Bearer {API_KEY}", ()),
    ]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_with_a_client_certificate(language: str, pki: Pki, tmp_path: Path) -> None:
    path, ids = script(tmp_path, language)
    async with tls_echo(pki.server(mutual=True)) as (address, echo):
        result = await run_example(
            language,
            address,
            path,
            "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key),
        )  # fmt: skip
        without_cert = await run_example(language, address, path, "--tls-ca", str(pki.ca))
    answered(result, ids)
    # the server verified the certificate and saw its names; no key given, none sent
    assert [(c.method, c.authorization, list(c.identities)) for c in echo.calls] == [
        ("Check", None, CLIENT_NAMES),
        ("StreamUsage", None, CLIENT_NAMES),
    ]
    refused(without_cert)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_refuses_a_server_it_does_not_trust(
    language: str, pki: Pki, tmp_path: Path
) -> None:
    path, _ = script(tmp_path, language)
    async with tls_echo(pki.server(mutual=False)) as (address, echo):
        untrusted = await run_example(
            language, address, path, "--tls-ca", str(pki.other_ca), "--api-key", API_KEY
        )
        plaintext = await run_example(language, address, path)  # the default
    refused(untrusted)
    refused(plaintext)
    assert echo.calls == []  # the key never reached a server the client did not trust


@pytest.mark.parametrize("language", LANGUAGES)
async def test_example_flag_errors(language: str, pki: Pki, tmp_path: Path) -> None:
    path, _ = script(tmp_path, language)
    missing = tmp_path / "missing.pem"
    cases = [
        (["--tls-cert", str(pki.client_cert)], "--tls-cert and --tls-key go together"),
        (["--tls-ca", str(missing)], f"--tls-ca {missing}: cannot read: no such file"),
        (["--tls-ca", str(pki.client_key)], f"--tls-ca {pki.client_key}: no PEM certificate"),
    ]
    for args, message in cases:
        result = await run_example(language, "127.0.0.1:1", path, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


# --- the load generator ------------------------------------------------------------------------


def loadtest_args(tmp_path: Path, name: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "loadtest", *args,
        "--rate", "40", "--duration", "1", "--warmup", "0", "--drain", "3",
        "--procs", "1", "--connections", "1", "--streams", "1", "--batch", "2",
        "--out", str(tmp_path), "--name", name, "--quiet",
    ]  # fmt: skip


@pytest.mark.parametrize("generator", ["python", "go"])
async def test_loadtest_over_mtls_with_an_api_key(generator: str, pki: Pki, tmp_path: Path) -> None:
    if generator == "go" and not GO_LOADGEN.is_file():
        pytest.fail(f"{GO_LOADGEN} is missing: run `make clients` (scripts/setup-go.sh)")
    scenario = "check" if generator == "go" else "mixed"
    async with tls_echo(pki.server(mutual=True)) as (address, echo):
        result = await run(
            *loadtest_args(
                tmp_path,
                "tls",
                scenario,
                "--generator", generator,
                "--target", address,
                "--tls-ca", str(pki.ca),
                "--tls-cert", str(pki.client_cert),
                "--tls-key", str(pki.client_key),
                "--api-key", API_KEY,
            )
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "tls.json").read_text()
    (phase,) = json.loads(report)["measurements"][0]["phases"]
    for flow in phase["flows"]:
        assert_answered_cleanly(flow)
    methods = {c.method for c in echo.calls}
    assert methods == ({"Check"} if generator == "go" else {"Check", "StreamUsage"})
    assert {(c.authorization, c.identities) for c in echo.calls} == {
        (f"Bearer {API_KEY}", tuple(CLIENT_NAMES))
    }
    assert API_KEY not in report, "the report must not hold the API key"


async def test_loadtest_fails_clearly_on_a_server_it_does_not_trust(
    pki: Pki, tmp_path: Path
) -> None:
    async with tls_echo(pki.server(mutual=False)) as (address, echo):
        result = await run(
            *loadtest_args(
                tmp_path, "untrusted", "check", "--generator", "go",
                "--target", address, "--tls-ca", str(pki.other_ca),
            )
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "certificate" in result.stdout, result.stdout
    assert echo.calls == []


async def test_the_echo_ceiling_over_tls(pki: Pki, tmp_path: Path) -> None:
    """--echo-tls-cert/--echo-tls-key serve the echo ceiling over TLS (the client side trusts
    --tls-ca), so a plaintext client could not have been answered."""
    result = await run(
        *loadtest_args(
            tmp_path, "ceiling", "ceiling", "--only", "echo",
            "--echo-tls-cert", str(pki.server_cert), "--echo-tls-key", str(pki.server_key),
            "--tls-ca", str(pki.ca),
        )
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (measurement,) = json.loads((tmp_path / "ceiling.json").read_text())["measurements"]
    assert measurement["label"] == "echo ceiling"
    (phase,) = measurement["phases"]
    for flow in phase["flows"]:
        assert_answered_cleanly(flow)
