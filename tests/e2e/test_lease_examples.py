"""The Node.js and Go lease examples against a live gateway: open a lease, spend locally, renew,
report, release; the ledger and the quota hold exactly what each spent.

The examples (clients/node/lease-example.ts, clients/go/cmd/chargepath-lease-example) are
built by `make clients` (scripts/setup-node.sh, scripts/setup-go.sh) from the stubs generated
from protos/. A missing toolchain or build is a failure, not a skip: CI installs both. Each
language leases for its own tenant; the expected answers are spelled out, and the two
languages must print the same lines (ids and times aside).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc, keys_pb2_grpc
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import metering_pb2 as pb
from tests.conftest import ledger_entries
from tests.e2e.conftest import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

NODE_EXAMPLE = ROOT / "clients/node/dist/lease-example.js"
GO_EXAMPLE = ROOT / "clients/go/bin/chargepath-lease-example"
LANGUAGES = ("node", "go")
QUOTA = 1_000_000
UNITS = 10
SPEND = 25

PLANS = f"""
metrics:
  - {{ name: api.voice.minutes, unit: minute, description: Voice minutes }}
plans:
  - name: leased
    limits:
      - name: voice-daily
        metric: api.voice.minutes
        scope: tenant
        quota: {{ amount: {QUOTA}, per: day }}
        lease: {{ max_units: 100, max_share_pct: 100, validity: 30s, renew_below_pct: 20 }}
tenants:
  - {{ name: lease-node, plan: leased }}
  - {{ name: lease-go, plan: leased }}
  - {{ name: lease-other, plan: leased }}
"""

ANSWER_FIELDS = [
    "ask",
    "request_id",
    "lease_id",
    "decision",
    "reason",
    "requested",
    "used",
    "granted",
    "available",
    "renew_below",
    "final_units",
    "recorded",
    "overage",
    "refunded",
    "closed",
    "replayed",
    "valid_for_ms",
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("lease-examples")
    plans = workdir / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(workdir, plans=plans)
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def command(language: str) -> list[str]:
    if language == "node":
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not on PATH: run `make clients` (scripts/setup-node.sh)")
        if not NODE_EXAMPLE.is_file():
            pytest.fail(f"{NODE_EXAMPLE} is missing: run `make clients` (scripts/setup-node.sh)")
        return [node, str(NODE_EXAMPLE)]
    if not GO_EXAMPLE.is_file():
        pytest.fail(f"{GO_EXAMPLE} is missing: run `make clients` (scripts/setup-go.sh)")
    return [str(GO_EXAMPLE)]


def run(language: str, gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(language), "--addr", gateway.address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def voice_used(gateway: GatewayProcess, tenant: str) -> int:
    with gateway.channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        got = admin.GetState(apb.GetStateRequest(subject=pb.Subject(tenant=tenant)), timeout=5)
    assert got.leases == [], "the example released its lease"
    (voice,) = got.limits
    return int(voice.used)


def expected_lines() -> list[tuple[Any, ...]]:
    """(ask, decision, reason, requested, used, granted, available, renew_below, recorded,
    refunded, closed) of each answer: 10 units a grant, renewed when 2 are left (20%)."""
    allow, ok = "DECISION_ALLOW", "REASON_OK"
    return [
        ("open", allow, ok, 10, 0, 10, 10, 2, 0, 0, False),
        ("renew", allow, ok, 10, 8, 10, 12, 2, 8, 0, False),  # at 8 spent, 2 left
        ("renew", allow, ok, 10, 10, 10, 12, 2, 10, 0, False),  # at 18
        ("release", allow, ok, 0, 7, 0, 0, 0, 7, 5, True),  # 25 spent, 5 of 30 given back
    ]


def test_both_examples_lease_spend_renew_report_and_release(
    gateway: GatewayProcess, tmp_path: Any
) -> None:
    seen: dict[str, list[tuple[Any, ...]]] = {}
    client = redis.Redis.from_url(gateway.redis_url, decode_responses=True)
    try:
        for language in LANGUAGES:
            tenant = f"lease-{language}"
            proc = run(
                language,
                gateway,
                "--api-key",
                gateway.operator_key,
                "--tenant",
                tenant,
                "--metric",
                "api.voice.minutes",
                "--units",
                str(UNITS),
                "--spend",
                str(SPEND),
                "--holder",
                f"example-{language}",
            )
            assert proc.returncode == 0, f"{language}: {proc.stderr}"
            lines = [json.loads(line) for line in proc.stdout.splitlines()]
            *answers, summary = lines
            for line in answers:
                assert list(line) == ANSWER_FIELDS, f"{language}: {line}"
            assert summary == {
                "ask": "summary",
                "lease_id": answers[0]["lease_id"],
                "spent": SPEND,
                "reported": SPEND,
                "refused": 0,
            }, language
            seen[language] = [
                (
                    a["ask"],
                    a["decision"],
                    a["reason"],
                    a["requested"],
                    a["used"],
                    a["granted"],
                    a["available"],
                    a["renew_below"],
                    a["recorded"],
                    a["refunded"],
                    a["closed"],
                )
                for a in answers
            ]
            assert seen[language] == expected_lines(), language
            lease_id = answers[0]["lease_id"]
            assert lease_id and {a["lease_id"] for a in answers[:-1]} == {lease_id}
            assert all(0 < a["valid_for_ms"] <= 30_000 for a in answers[:-1])

            # The ledger: one entry per report, under the ask's request id, all of the lease.
            entries = ledger_entries(client, tenant)
            reports = [a for a in answers if a["used"] > 0]
            assert [(e.request_id, e.amount, e.lease_id) for e in entries] == [
                (a["request_id"], a["used"], lease_id) for a in reports
            ]
            # Released: the quota counts what was spent, not what was granted.
            assert voice_used(gateway, tenant) == SPEND
    finally:
        client.close()
    assert seen["node"] == seen["go"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_caller_for_another_tenant_or_without_a_key_is_refused(
    gateway: GatewayProcess, language: str
) -> None:
    with gateway.channel() as channel:
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        other = keys.CreateKey(
            kpb.CreateKeyRequest(tenant="lease-other", role=kpb.ROLE_METER), timeout=5
        ).secret_key
    tenant = f"lease-{language}"
    before = voice_used(gateway, tenant)
    proc = run(language, gateway, "--api-key", other, "--tenant", tenant, "--spend", "3")
    assert proc.returncode == 1
    assert "Lease failed: PERMISSION_DENIED" in proc.stderr
    assert proc.stdout == ""
    proc = run(language, gateway, "--tenant", tenant, "--spend", "3")
    assert proc.returncode == 1 and "Lease failed: UNAUTHENTICATED" in proc.stderr
    assert voice_used(gateway, tenant) == before


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_bad_flag_is_exit_status_2(gateway: GatewayProcess, language: str) -> None:
    proc = run(language, gateway, "--units", "0")
    assert proc.returncode == 2 and "--units must be between 1 and" in proc.stderr
