"""The Python client's quota leases against a live gateway (real `chargepath serve`, its own
redis-server): renewal, reporting, release, expiry and exactness, as the ledger and the
gateway's state show them, and a caller who must be refused.

Each test leases for its own tenant (one gateway serves the module), all on one plan:
`sms-rate` a token bucket that grants leases, `voice-daily` a period quota that grants short
leases (1 s: refunds are exact there, no refill blurs them), and `bytes-rate` a bucket without
lease settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from chargepath_client import (
    AsyncClient,
    Client,
    Decision,
    InvalidUsage,
    Lease,
    PermissionDenied,
    Reason,
    Unauthenticated,
)
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc, keys_pb2_grpc
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import metering_pb2 as pb
from tests.conftest import ledger_entries
from tests.e2e.conftest import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

CAPACITY = 2000
REFILL_PER_S = 1000
QUOTA = 1_000_000
TENANTS = (
    "lease-exact",
    "lease-killed",
    "lease-renew",
    "lease-expiry",
    "lease-fault",
    "lease-refused",
    "lease-nolease",
    "lease-invalid",
)

PLANS = f"""
metrics:
  - {{ name: api.sms.send, unit: message, description: SMS sent }}
  - {{ name: api.voice.minutes, unit: minute, description: Voice minutes }}
  - {{ name: slice.bytes, unit: byte, description: Bytes }}
plans:
  - name: leased
    description: limits that grant leases, and one that does not
    limits:
      - name: sms-rate
        metric: api.sms.send
        scope: tenant
        rate: {{ capacity: {CAPACITY}, refill: {REFILL_PER_S}, per: second }}
        lease: {{ max_units: 200, max_share_pct: 50, validity: 5s }}
      - name: voice-daily
        metric: api.voice.minutes
        scope: tenant
        quota: {{ amount: {QUOTA}, per: day }}
        lease: {{ max_units: 100, max_share_pct: 100, validity: 1s }}
      - name: bytes-rate
        metric: slice.bytes
        scope: tenant
        rate: {{ capacity: 1000, refill: 1000, per: second }}
tenants:
""" + "".join(f"  - {{ name: {t}, plan: leased }}\n" for t in TENANTS)

WAIT_S = 20.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("lease-gateway")
    plans = workdir / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(workdir, plans=plans)
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


@pytest.fixture
def redis_client(gateway: GatewayProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(gateway.redis_url, decode_responses=True)
    yield client
    client.close()


def state(gateway: GatewayProcess, tenant: str) -> apb.GetStateResponse:
    with gateway.channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        return admin.GetState(apb.GetStateRequest(subject=pb.Subject(tenant=tenant)), timeout=5)


def quota_used(gateway: GatewayProcess, tenant: str) -> int:
    (voice,) = [lim for lim in state(gateway, tenant).limits if lim.name == "voice-daily"]
    return int(voice.used)


def wait_until_no_lease(gateway: GatewayProcess, tenant: str) -> None:
    """Until the gateway holds no open lease of `tenant` (released, or expired and swept)."""
    deadline = time.monotonic() + WAIT_S
    while state(gateway, tenant).leases:
        assert time.monotonic() < deadline, state(gateway, tenant).leases
        time.sleep(0.1)


def wait_for_quota_used(gateway: GatewayProcess, tenant: str, expected: int) -> None:
    """Until the quota counts `expected` units: GetState stops showing a lease at its expiry,
    and the sweeper (every second) gives back what it still held."""
    deadline = time.monotonic() + WAIT_S
    while (used := quota_used(gateway, tenant)) != expected:
        assert time.monotonic() < deadline, (used, expected)
        time.sleep(0.1)


def lease_ledger(client: redis.Redis, tenant: str) -> list[tuple[str, int, int]]:
    """(lease id, amount, overage) of every lease report in the tenant's ledger."""
    return [(e.lease_id, e.amount, e.overage) for e in ledger_entries(client, tenant)]


def spend_steadily(lease: Lease, units: int, timeout: float = WAIT_S) -> None:
    """Take `units` one at a time from a (sync) lease, waiting a little whenever it has
    nothing left (its background is then renewing)."""
    deadline = time.monotonic() + timeout
    taken = 0
    while taken < units:
        if lease.try_acquire():
            taken += 1
        else:
            assert time.monotonic() < deadline, f"took {taken} of {units}"
            time.sleep(0.001)


def holder_command(gateway: GatewayProcess, tenant: str, metric: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.e2e.client_lease_holder",
        "--target",
        gateway.address,
        "--api-key",
        gateway.operator_key,
        "--tenant",
        tenant,
        "--metric",
        metric,
        *args,
    ]


def test_eight_holders_in_four_processes_spend_no_more_than_the_bucket_allows(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    """Eight leases (two threads in each of four processes; sync client, background threads
    renewing and reporting) spend one bucket as fast as they can: never more than capacity +
    refill x T, and the ledger holds exactly what try_acquire allowed."""
    tenant = "lease-exact"
    command = holder_command(
        gateway, tenant, "api.sms.send", "--units", "100", "--seconds", "3", "--leases", "2"
    )
    holders = [
        subprocess.Popen(
            [*command, "--holder", f"holder-{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = []
    for holder in holders:
        out, err = holder.communicate(timeout=90)
        assert holder.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    spent = sum(r["spent"] for r in results)
    window_s = max(r["ended"] for r in results) - min(r["started"] for r in results)
    assert spent <= CAPACITY + REFILL_PER_S * window_s, (spent, window_s)
    # Renewals kept them going past the first bucketful (what refilled was leased too).
    assert spent > CAPACITY
    assert all(len(r["per_lease"]) == 2 and min(r["per_lease"]) > 0 for r in results)
    assert all(r["unreported"] == 0 for r in results)

    reports = lease_ledger(redis_client, tenant)
    assert sum(amount for _, amount, _ in reports) == spent
    assert all(lease_id for lease_id, _, _ in reports)
    assert sum(overage for _, _, overage in reports) == 0
    wait_until_no_lease(gateway, tenant)


def test_a_holder_killed_loses_at_most_a_grant_and_its_units_come_back(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    """A holder process SIGKILLed while spending: what it had reported is in the ledger,
    what it spent and had not reported is lost to it (at most about one grant: the documented
    bound), and at the lease's expiry the quota counts exactly what the ledger holds."""
    tenant = "lease-killed"
    units = 50
    holder = subprocess.Popen(
        holder_command(
            gateway,
            tenant,
            "api.voice.minutes",
            "--units",
            str(units),
            "--seconds",
            "60",
            "--report-every",
            "0.2",
            "--progress",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    progress = {"spent": 0}
    try:
        while progress["spent"] < 500:
            line = holder.stdout.readline()
            assert line, holder.stderr.read() if holder.stderr else ""
            progress = json.loads(line)
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
        if holder.stderr is not None:
            holder.stderr.close()
    wait_until_no_lease(gateway, tenant)
    recorded = sum(amount for _, amount, _ in lease_ledger(redis_client, tenant))
    assert recorded >= progress["reported"]
    assert progress["spent"] - recorded <= 2 * units  # a grant, and a renewal on its way
    wait_for_quota_used(gateway, tenant, recorded)  # expired and swept: its units came back


def test_a_lease_renews_reports_and_gives_back_what_was_not_spent(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    tenant = "lease-renew"
    with (
        Client(gateway.address, api_key=gateway.operator_key) as client,
        client.lease(tenant, "api.voice.minutes", units=10, holder="e2e-holder") as lease,
    ):
        assert lease.lease_id and lease.available == 10
        first = lease.lease_id
        spend_steadily(lease, 95)
        (held,) = state(gateway, tenant).leases
        assert (held.lease_id, held.holder, held.metric) == (
            first,
            "e2e-holder",
            "api.voice.minutes",
        )
        # Renewed at the threshold: more than the nine further grants 95 units need.
        assert lease.answers >= 10 and lease.lease_id == first
        assert lease.spent == 95
    assert lease.unreported == 0 and lease.lease_id == ""
    # Released: the quota counts what was spent, not what was granted.
    assert state(gateway, tenant).leases == []
    assert quota_used(gateway, tenant) == 95
    reports = lease_ledger(redis_client, tenant)
    assert sum(amount for _, amount, _ in reports) == 95
    assert {lease_id for lease_id, _, _ in reports} == {first}
    assert lease.last_answer is not None and lease.last_answer.closed
    assert lease.last_answer.refunded == lease.last_answer.raw.refunded > 0


async def test_an_expired_lease_is_known_gone_and_replaced(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    """The async holder's loop is blocked past the lease's validity (1 s): the gateway takes
    the units back, the holder's report of what it spent is recorded as overage, and it
    holds a new lease; the quota ends with exactly what was spent."""
    tenant = "lease-expiry"
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        async with client.lease(tenant, "api.voice.minutes", units=20, report_every=None) as lease:
            first = lease.lease_id
            assert first and sum(lease.try_acquire() for _ in range(10)) == 10
            # The loop (and with it the lease's background task) cannot run meanwhile.
            time.sleep(1.5)  # noqa: ASYNC251
            deadline = time.monotonic() + WAIT_S
            while lease.lease_id in ("", first):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert lease.available == 20
            assert sum(lease.try_acquire() for _ in range(5)) == 5
        assert lease.unreported == 0
    reports = {
        lease_id: (amount, overage)
        for lease_id, amount, overage in lease_ledger(redis_client, tenant)
    }
    assert reports[first] == (10, 10)  # reported after the expiry: overage
    assert sum(amount for amount, _ in reports.values()) == 15
    wait_for_quota_used(gateway, tenant, 15)


def test_reports_survive_a_paused_redis_and_the_ledger_holds_every_unit_spent(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    """Redis is stopped (SIGSTOP) while a holder spends: its asks are answered THROTTLE
    STORE_UNAVAILABLE (nothing recorded), the lease stops spending at its local expiry, and
    every report is resent with its request id once Redis is back: the ledger and the quota
    then hold exactly what try_acquire allowed."""
    tenant = "lease-fault"
    assert gateway.redis is not None and gateway.redis.process is not None
    pid = gateway.redis.process.pid
    with Client(gateway.address, api_key=gateway.operator_key) as client:
        lease = client.lease(tenant, "api.voice.minutes", units=20, report_every=0.2)
        with lease:
            spend_steadily(lease, 50)
            os.kill(pid, signal.SIGSTOP)
            try:
                end = time.monotonic() + 2.5
                while time.monotonic() < end:
                    lease.try_acquire()
                    time.sleep(0.001)
                # Past the validity without a renewal: the lease spends no more.
                assert lease.available == 0 and lease.try_acquire() is False
            finally:
                os.kill(pid, signal.SIGCONT)
            spend_steadily(lease, 30)
        spent = lease.spent
    assert lease.unreported == 0
    assert spent >= 80
    reports = lease_ledger(redis_client, tenant)
    assert sum(amount for _, amount, _ in reports) == spent
    # every report once: no request id twice
    ids = [e.request_id for e in ledger_entries(redis_client, tenant)]
    assert len(ids) == len(set(ids))
    wait_for_quota_used(gateway, tenant, spent)


def test_a_caller_for_another_tenant_or_without_a_key_is_refused(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    with gateway.channel() as channel:
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        other = keys.CreateKey(
            kpb.CreateKeyRequest(tenant="lease-exact", role=kpb.ROLE_METER), timeout=5
        ).secret_key
    tenant = "lease-refused"
    with Client(gateway.address, api_key=other) as client:
        lease = client.lease(tenant, "api.voice.minutes", units=10)
        with pytest.raises(PermissionDenied):
            lease.open()
        assert lease.try_acquire() is False
        # the same key may lease for its own tenant
        with client.lease("lease-exact", "api.voice.minutes", units=1) as own:
            assert own.try_acquire() is True
    with Client(gateway.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.lease(tenant, "api.voice.minutes", units=10).open()
    assert lease_ledger(redis_client, tenant) == []
    assert state(gateway, tenant).leases == []
    assert quota_used(gateway, tenant) == 0


def test_a_limit_without_lease_settings_is_a_deny_that_names_it(gateway: GatewayProcess) -> None:
    with (
        Client(gateway.address, api_key=gateway.operator_key) as client,
        client.lease("lease-nolease", "slice.bytes", units=10) as lease,
    ):
        assert lease.try_acquire() is False
        answer = lease.last_answer
        assert answer is not None
        assert (answer.decision, answer.reason) == (Decision.DENY, Reason.NO_ENTITLEMENT)
        assert "bytes-rate" in answer.message and lease.lease_id == ""


def test_the_gateway_names_a_bad_argument_as_the_client_does(gateway: GatewayProcess) -> None:
    with Client(gateway.address, api_key=gateway.operator_key, validate=False) as client:
        with pytest.raises(InvalidUsage) as caught:
            client.lease("lease-invalid", "api.voice.minutes", units=10, holder="a b").open()
        assert caught.value.field == "holder"
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with Client(gateway.address, api_key=gateway.operator_key) as client:
        with pytest.raises(InvalidUsage) as local:
            client.lease("lease-invalid", "api.voice.minutes", units=10, holder="a b")
        assert (
            local.value.field == "holder" and local.value.code == grpc.StatusCode.INVALID_ARGUMENT
        )
