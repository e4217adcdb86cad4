"""Every surface that talks to Redis, exercised on a given deployment (a Redis Cluster, Redis
Sentinel): the metering and admin APIs of an in-process gateway (decisions, dedup, policy
edits, suspensions, grants, GetState, ExplainDecision, WatchDecisions), called as they ship:
with authentication, the operator key the gateway bootstrapped in its data dir; the ledger's
export and consumer group, and the API key store with its change feed."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import grpc

from chargepath.app import Gateway
from chargepath.core.auth import Role
from chargepath.settings import Settings
from chargepath.store.connect import RedisTarget
from chargepath.store.keys import OPERATOR_KEY_FILE, RedisKeyStore
from chargepath.store.ledger import Ledger
from chargepath.telemetry import Telemetry
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
PLANS = str(ROOT / "examples" / "plans.yaml")


async def start_gateway(settings: Settings, data_dir: Path) -> Gateway:
    """A gateway on port 0 with the demo plans, on the Redis that ``settings`` name, its
    operator key written to ``data_dir``."""
    settings.port = 0
    settings.plans = PLANS
    settings.data_dir = str(data_dir)
    gateway = Gateway(settings, Telemetry())
    await gateway.start()
    return gateway


def operator_metadata(gateway: Gateway) -> tuple[tuple[str, str], ...]:
    """Call metadata with the operator key ``gateway`` bootstrapped in its data dir."""
    key = (Path(gateway.settings.data_dir) / OPERATOR_KEY_FILE).read_text("ascii").strip()
    return (("authorization", f"Bearer {key}"),)


def usage(key: str, amount: int = 1, *, request_id: str = "", **kw: object) -> pb.Usage:
    fields: dict[str, object] = dict(
        request_id=request_id or str(uuid.uuid4()),
        subject=pb.Subject(tenant="cpaas-demo", key=key),
        metric="api.sms.send",
        amount=amount,
        mode=pb.MODE_ADMIT,
    )
    fields.update(kw)
    return pb.Usage(**fields)  # type: ignore[arg-type]


async def check_every_surface(gateway: Gateway, target: RedisTarget) -> str:
    """Asserts that each surface works on ``target`` (the Redis ``gateway`` runs on); returns
    the request id of the report it made (tenant mvno-demo)."""
    auth = operator_metadata(gateway)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        meter = pb_grpc.MeteringServiceStub(channel)
        admin = apb_grpc.AdminServiceStub(channel)

        async def check(u: pb.Usage) -> pb.Verdict:
            return (await meter.Check(pb.CheckRequest(usage=u), timeout=5, metadata=auth)).verdict

        # WatchDecisions reads from "now": keep deciding until the feed shows a decision
        watch = admin.WatchDecisions(
            apb.WatchDecisionsRequest(tenant="cpaas-demo"), timeout=20, metadata=auth
        )
        watched: list[str] = []

        async def read_watch() -> None:
            async for event in watch:
                if event.HasField("decision"):
                    watched.append(event.decision.decision_id)

        reader = asyncio.create_task(read_watch())
        sent: list[str] = []
        for _ in range(50):
            sent.append((await check(usage("w-1"))).decision_id)
            await asyncio.sleep(0.1)
            if watched:
                break
        watch.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert watched and set(watched) <= set(sent)

        async def monthly_used() -> int:
            state = await admin.GetState(
                apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo", key="s-1")),
                timeout=5,
                metadata=auth,
            )
            return next(lim.used for lim in state.limits if lim.name == "sms-monthly")

        before = await monthly_used()
        # decisions and dedup
        first_usage = usage("s-1", 3)
        first = await check(first_usage)
        assert (first.decision, first.reason, first.recorded) == (
            pb.DECISION_ALLOW,
            pb.REASON_OK,
            True,
        )
        again = await check(first_usage)
        assert again.replayed and again.decision_id == first.decision_id
        report_id = str(uuid.uuid4())
        report = await check(
            pb.Usage(
                request_id=report_id,
                subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
                metric="slice.bytes",
                amount=1000,
                mode=pb.MODE_REPORT,
            )
        )
        assert report.decision == pb.DECISION_ALLOW and report.recorded

        # suspension: a policy edit through the admin API (compare-and-set publish)
        key = pb.Subject(tenant="cpaas-demo", key="s-2")
        suspended = await admin.Suspend(
            apb.SuspendRequest(subject=key, reason="t"), timeout=5, metadata=auth
        )
        denied = await check(usage("s-2"))
        assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SUSPENDED)
        assert denied.policy_version == suspended.policy_version
        await admin.Resume(apb.ResumeRequest(subject=key), timeout=5, metadata=auth)
        assert (await check(usage("s-2"))).decision == pb.DECISION_ALLOW

        # a grant, then the state that shows it
        grant = await admin.Grant(
            apb.GrantRequest(
                subject=pb.Subject(tenant="cpaas-demo"), limit="voice-daily", amount=10, note="T-1"
            ),
            timeout=5,
            metadata=auth,
        )
        assert grant.capacity == 5010
        state = await admin.GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo", key="s-1"), recent=50),
            timeout=5,
            metadata=auth,
        )
        assert [(g.limit, g.amount, g.note) for g in state.grants] == [("voice-daily", 10, "T-1")]
        by_name = {lim.name: lim for lim in state.limits}
        assert 17 <= by_name["sms-per-key"].remaining < 20  # refills at 10/s
        assert by_name["sms-monthly"].used == before + 3 + 1  # s-1's 3 units, then s-2's 1
        assert by_name["voice-daily"].capacity == 5010
        assert first.decision_id in [r.decision_id for r in state.recent]
        explained = (
            await admin.ExplainDecision(
                apb.ExplainDecisionRequest(tenant="cpaas-demo", decision_id=first.decision_id),
                timeout=5,
                metadata=auth,
            )
        ).decision
        assert (explained.request_id, explained.amount) == (first_usage.request_id, 3)

    # the ledger, on connections of its own
    ledger = Ledger.connect(target)
    try:
        exported = [e async for e in ledger.export("cpaas-demo", None, mark=False)]
        ids = [e.request_id for e in exported]
        assert ids.count(first_usage.request_id) == 1
        delivered: list[str] = []
        async for batch in ledger.consume_batches(
            "cpaas-demo", "billing", "c-1", block_ms=100, limit=len(exported)
        ):
            delivered += [e.request_id for _, e in batch]
            assert await ledger.ack("cpaas-demo", "billing", [i for i, _ in batch]) == len(batch)
        assert delivered == ids
        assert await ledger.groups("cpaas-demo") == ["billing"]
        assert await ledger.lag("cpaas-demo", "billing") == 0
        await ledger.mark_exported("cpaas-demo", exported[-1].id)
        assert await ledger.exported_mark("cpaas-demo") == exported[-1].id
    finally:
        await ledger.close()

    # API keys and their change feed (pub/sub)
    keys = RedisKeyStore.connect(target)
    try:
        async with keys.changes() as changed:
            record, _ = await keys.create("cpaas-demo", Role.METER)
            assert await asyncio.wait_for(anext(changed), 5.0) == record.key_id
            stored = await keys.get(record.key_id)
            assert stored is not None and stored.tenant == "cpaas-demo"
            await keys.revoke(record.key_id)
            assert await asyncio.wait_for(anext(changed), 5.0) == record.key_id
    finally:
        await keys.close()
    return report_id


async def ledger_cli_lines(*where: str, tenant: str = "mvno-demo") -> list[dict[str, object]]:
    """``chargepath ledger export --no-mark`` of ``tenant`` with the Redis options ``where``
    (a real process): its JSON lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chargepath", "ledger", "export", "--tenant", tenant, "--no-mark",
        *where, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]
