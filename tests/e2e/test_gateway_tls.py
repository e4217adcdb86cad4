"""TLS and mTLS on a live gateway (``chargepath serve --tls-cert/--tls-key``, ``--tls-client-ca``,
``--tls-identities``): who gets through the handshake, and who a client certificate is.

Certificates come from trustme: a CA, an unrelated CA, and certificates issued for 127.0.0.1 and
for clients, some already expired."""

from __future__ import annotations

import datetime
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
TENANT, OTHER = "cpaas-demo", "mvno-demo"
IDENTITIES = f"""\
identities:
  meter-a.clients.test: {{role: meter, tenant: {TENANT}}}
  ops.clients.test: {{role: operator}}
"""


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: trustme.CA
    other_ca: trustme.CA

    def write(self, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def trust(self, ca: trustme.CA, client: str | None = None) -> grpc.ChannelCredentials:
        """Credentials trusting ``ca``, with the client certificate ``client`` (written by
        :meth:`write`) if given."""
        key = chain = None
        if client is not None:
            chain = (self.dir / f"{client}.pem").read_bytes()
            key = (self.dir / f"{client}.key").read_bytes()
        return grpc.ssl_channel_credentials(ca.cert_pem.bytes(), key, chain)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    p = Pki(d, trustme.CA(), trustme.CA())
    p.ca.cert_pem.write_to_path(str(d / "ca.pem"))
    p.write("server", p.ca.issue_cert("127.0.0.1", "localhost"))
    p.write(
        "expired-server",
        p.ca.issue_cert("127.0.0.1", not_before=NOW - 2 * DAY, not_after=NOW - DAY),
    )
    p.write("meter-a", p.ca.issue_cert("meter-a.clients.test"))
    p.write("ops", p.ca.issue_cert("ops.clients.test"))
    p.write("stranger", p.ca.issue_cert("stranger.clients.test"))
    p.write(
        "expired-meter-a",
        p.ca.issue_cert("meter-a.clients.test", not_before=NOW - 2 * DAY, not_after=NOW - DAY),
    )
    p.write("foreign", p.other_ca.issue_cert("meter-a.clients.test"))
    (d / "identities.yaml").write_text(IDENTITIES)
    return p


def stop(gw: GatewayProcess) -> None:
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


@pytest.fixture(scope="module")
def tls_gateway(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    d = pki.dir
    gw = start_gateway(
        tmp_path_factory.mktemp("tls"),
        extra_args=("--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key")),
        credentials=pki.trust(pki.ca),
    )
    yield gw
    stop(gw)


@pytest.fixture(scope="module")
def mtls_gateway(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    d = pki.dir
    gw = start_gateway(
        tmp_path_factory.mktemp("mtls"),
        extra_args=(
            "--tls-cert",
            str(d / "server.pem"),
            "--tls-key",
            str(d / "server.key"),
            "--tls-client-ca",
            str(d / "ca.pem"),
            "--tls-identities",
            str(d / "identities.yaml"),
        ),
        credentials=pki.trust(pki.ca, "ops"),
    )
    yield gw
    stop(gw)


def check(
    address: str, credentials: grpc.ChannelCredentials | None, tenant: str, key: str = ""
) -> grpc.StatusCode:
    """The status of one Check for ``tenant`` over a channel of its own."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.insecure_channel(address, options=options)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    usage = pb.Usage(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, key="tls"),
        metric="api.sms.send" if tenant == TENANT else "slice.bytes",
        amount=1,
        mode=pb.MODE_ADMIT if tenant == TENANT else pb.MODE_REPORT,
    )
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with channel:
        try:
            pb_grpc.MeteringServiceStub(channel).Check(
                pb.CheckRequest(usage=usage), metadata=metadata, timeout=5
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def test_tls_serves_a_client_that_trusts_its_ca(tls_gateway: GatewayProcess, pki: Pki) -> None:
    trusted = pki.trust(pki.ca)
    assert check(tls_gateway.address, trusted, TENANT, tls_gateway.operator_key).name == "OK"
    # TLS is not a credential: without a key the call is refused.
    assert check(tls_gateway.address, trusted, TENANT).name == "UNAUTHENTICATED"
    assert "(TLS, auth keys" in tls_gateway.log()


def test_tls_refuses_a_wrong_ca_and_a_plaintext_client(
    tls_gateway: GatewayProcess, pki: Pki
) -> None:
    key = tls_gateway.operator_key
    assert check(tls_gateway.address, pki.trust(pki.other_ca), TENANT, key).name == "UNAVAILABLE"
    assert check(tls_gateway.address, None, TENANT, key).name == "UNAVAILABLE"


def test_an_expired_server_certificate_is_refused_by_clients(pki: Pki, tmp_path: Path) -> None:
    d = pki.dir
    gw = start_gateway(
        tmp_path,
        extra_args=(
            "--tls-cert",
            str(d / "expired-server.pem"),
            "--tls-key",
            str(d / "expired-server.key"),
        ),
        credentials=pki.trust(pki.ca),
        ready_line="serving chargepath.v1",  # no health check gets through that certificate
    )
    try:
        assert check(gw.address, pki.trust(pki.ca), TENANT, gw.operator_key).name == "UNAVAILABLE"
    finally:
        stop(gw)


def test_mtls_identity_acts_for_its_tenant_only(mtls_gateway: GatewayProcess, pki: Pki) -> None:
    meter = pki.trust(pki.ca, "meter-a")
    assert check(mtls_gateway.address, meter, TENANT).name == "OK"
    assert check(mtls_gateway.address, meter, OTHER).name == "PERMISSION_DENIED"
    operator = pki.trust(pki.ca, "ops")
    assert check(mtls_gateway.address, operator, OTHER).name == "OK"
    # A verified certificate that the identity map does not name is nobody: it needs a key.
    stranger = pki.trust(pki.ca, "stranger")
    assert check(mtls_gateway.address, stranger, TENANT).name == "UNAUTHENTICATED"
    assert check(mtls_gateway.address, stranger, TENANT, mtls_gateway.operator_key).name == "OK"
    assert "(mTLS, auth keys" in mtls_gateway.log()


def test_mtls_refuses_no_expired_and_foreign_client_certificates(
    mtls_gateway: GatewayProcess, pki: Pki
) -> None:
    key = mtls_gateway.operator_key
    for credentials in (
        pki.trust(pki.ca),
        pki.trust(pki.ca, "expired-meter-a"),
        pki.trust(pki.ca, "foreign"),
    ):
        assert check(mtls_gateway.address, credentials, TENANT, key).name == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-cert", "server.pem"), "--tls-key: --tls-cert and --tls-key go together"),
        (("--tls-identities", "identities.yaml"), "--tls-identities: needs --tls-client-ca"),
        (("--tls-cert", "missing.pem", "--tls-key", "server.key"), "missing.pem"),
        (("--auth", "maybe"), "invalid choice"),
    ],
)
def test_bad_security_options_are_one_line_and_start_nothing(
    pki: Pki, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    data = tmp_path / "data"
    out = subprocess.run(
        [sys.executable, "-m", "chargepath", "serve", "--workers", "1", "--port", "0",
         "--data-dir", str(data), *args],
        capture_output=True, text=True, timeout=60, cwd=pki.dir,
    )  # fmt: skip
    assert out.returncode == 2
    assert message in out.stderr
    if "invalid choice" not in message:  # argparse prints its usage first
        assert len(out.stderr.splitlines()) == 1, out.stderr
    assert not data.exists()
