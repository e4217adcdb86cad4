"""The plan file at start against a real redis-server (chargepath.policy_sync): the store
remembers the file last applied, a start with the same file publishes nothing, a changed file
is merged with compare-and-set, and publishing never touches grants, counters or ledgers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import yaml

from chargepath.core import policy_edit
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.plans import PolicyDocument, PolicyError
from chargepath.engine import Engine, EngineSettings
from chargepath.policy_files import load_policy_file
from chargepath.policy_sync import apply_plan_file
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import POLICY_KEY, RedisStore
from chargepath.telemetry import Telemetry

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "plans.yaml"
PLATINUM = {
    "name": "platinum",
    "limits": [{"name": "sms", "metric": "api.sms.send", "rate": {"capacity": 5, "refill": 1}}],
}


def write_plans(path: Path, *, extra_plan: bool = False, comment: str = "") -> Path:
    data = yaml.safe_load(DEMO.read_text())
    if extra_plan:
        data["plans"].append(PLATINUM)
    path.write_text(comment + yaml.safe_dump(data, sort_keys=False))
    return path


async def admin_edit(store: RedisStore, change: Callable[[PolicyDocument], PolicyDocument]) -> int:
    """What the admin API does: change the live document with compare-and-set."""
    live = await store.load_policy()
    assert live is not None
    return (
        await store.publish_policy(change(live.document), expected_version=live.version)
    ).version


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chargepath.policy"]


async def test_the_first_start_publishes_and_records_the_file(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "chargepath.policy")
    path = write_plans(tmp_path / "plans.yaml")
    assert await apply_plan_file(store, str(path)) == 1
    record = await store.load_plan_file()
    assert record is not None
    assert (record.version, record.sha) == (1, load_policy_file(path).digest())
    assert messages(caplog) == [
        f"plan file {path} published as policy version 1 (no live policy before)"
    ]


async def test_an_admin_change_leaves_the_record_and_the_same_file_publishes_nothing(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    key = Subject("cpaas-demo", "", "k-stolen")
    await admin_edit(store, lambda d: policy_edit.set_suspension(d, key, "fraud"))
    v = await admin_edit(store, lambda d: policy_edit.set_failure_mode(d, "cpaas-demo", "allow"))
    assert v == 3
    record = await store.load_plan_file()
    assert record is not None and record.version == 1
    # the same plans, with a comment and another layout: the same document
    write_plans(path, comment="# edited by hand\n")
    caplog.set_level(logging.INFO, "chargepath.policy")
    assert await apply_plan_file(store, str(path)) == 3
    live = await store.load_policy()
    assert live is not None and live.version == 3
    cpaas = next(t for t in live.document.tenants if t.name == "cpaas-demo")
    assert [(k.name, k.suspended) for k in cpaas.keys] == [("k-stolen", "fraud")]
    assert cpaas.failure_policy.mode == "allow"
    assert messages(caplog) == [
        f"plan file {path} unchanged since version 1; live policy version 3 kept "
        "(2 runtime changes since)",
        f"live policy version 3 drifts from plan file {path} in 2 fields (runtime changes "
        "kept): tenants ~cpaas-demo",
        "drift from the plan file: ~ tenants.cpaas-demo.failure_policy.mode: 'deny' -> 'allow'",
        "drift from the plan file: + tenants.cpaas-demo.keys.k-stolen suspended='fraud'",
    ]


async def test_a_changed_file_is_merged_keeping_runtime_state_and_recorded(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    key = Subject("cpaas-demo", "", "k-stolen")
    await admin_edit(store, lambda d: policy_edit.set_suspension(d, key, "fraud"))
    write_plans(path, extra_plan=True)
    caplog.set_level(logging.INFO, "chargepath.policy")
    assert await apply_plan_file(store, str(path)) == 3
    live = await store.load_policy()
    record = await store.load_plan_file()
    assert live is not None and record is not None
    assert "platinum" in {p.name for p in live.document.plans}
    cpaas = next(t for t in live.document.tenants if t.name == "cpaas-demo")
    assert [(k.name, k.suspended) for k in cpaas.keys] == [("k-stolen", "fraud")]
    assert (record.version, record.sha) == (3, load_policy_file(path).digest())
    logged = messages(caplog)
    assert logged[0] == (
        f"plan file {path} changed since version 1: plans +platinum; live policy published as "
        "version 3, runtime changes since kept unless the file changes the same field "
        "(0 overridden)"
    )
    assert "plan file change: + plans.platinum 1 limits, ledger={'mode': 'entries', " in (logged[1])
    assert "drift from the plan file: + tenants.cpaas-demo.keys.k-stolen suspended='fraud'" in (
        logged
    )
    # and the next start with that file is a no-op again
    assert await apply_plan_file(store, str(path)) == 3


async def test_a_file_that_differs_only_in_order_records_the_file_without_a_new_version(
    store: RedisStore, tmp_path: Path
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    data = yaml.safe_load(path.read_text())
    data["plans"].reverse()
    path.write_text(yaml.safe_dump(data))
    assert await apply_plan_file(store, str(path)) == 1
    record = await store.load_plan_file()
    assert record is not None and record.sha == load_policy_file(path).digest()


async def test_starts_racing_with_a_new_file_publish_it_once(
    store: RedisStore, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    write_plans(path, extra_plan=True)
    others = [RedisStore.from_url(redis_server.url, connect_timeout=1.0) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(apply_plan_file(s, str(path)) for s in others))
    finally:
        for s in others:
            await s.close()
    assert set(versions) == {2}
    assert await store.policy_version() == 2


async def test_an_admin_change_racing_a_start_is_merged_not_lost(
    store: RedisStore, tmp_path: Path
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    write_plans(path, extra_plan=True)
    calls = 0
    real_load = store.load_plan_file

    async def load_then_edit() -> object:
        # the admin API publishes between the start's read and its compare-and-set
        nonlocal calls
        calls += 1
        record = await real_load()
        if calls == 1:
            await admin_edit(
                store,
                lambda d: policy_edit.set_suspension(d, Subject("cpaas-demo", "", "k"), "x"),
            )
        return record

    store.load_plan_file = load_then_edit  # type: ignore[method-assign]
    assert await apply_plan_file(store, str(path)) == 3
    live = await store.load_policy()
    assert live is not None
    assert "platinum" in {p.name for p in live.document.plans}
    assert [k.name for t in live.document.tenants for k in t.keys] == ["k"]
    assert calls == 2


async def test_replace_makes_the_file_win_and_logs_what_it_drops(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    await admin_edit(
        store, lambda d: policy_edit.set_suspension(d, Subject("cpaas-demo", "", "k"), "x")
    )
    caplog.set_level(logging.INFO, "chargepath.policy")
    assert await apply_plan_file(store, str(path), "replace") == 3
    live = await store.load_policy()
    assert live is not None and live.document == load_policy_file(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"plan file {path} replaces live policy version 2 (--plans-mode replace): now version "
        "3; runtime changes dropped: tenants ~cpaas-demo",
        "dropped by --plans-mode replace: - tenants.cpaas-demo.keys.k",
    ]


async def test_a_store_without_a_record_merges_and_says_so(
    store: RedisStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    # a store written by an older chargepath: a live policy, no record of the file
    doc = load_policy_file(path)
    await store.publish_policy(policy_edit.set_suspension(doc, Subject("cpaas-demo", "", "k"), "x"))
    caplog.set_level(logging.INFO, "chargepath.policy")
    assert await apply_plan_file(store, str(path)) == 1
    record = await store.load_plan_file()
    assert record is not None and record.version == 1
    assert "no record of the plan file applied before" in messages(caplog)[0]
    live = await store.load_policy()
    assert live is not None and [k.name for t in live.document.tenants for k in t.keys] == ["k"]


async def test_a_merge_that_does_not_validate_publishes_nothing(
    store: RedisStore, tmp_path: Path
) -> None:
    path = tmp_path / "plans.yaml"
    data = yaml.safe_load(DEMO.read_text())
    path.write_text(yaml.safe_dump({**data, "plans": [*data["plans"], PLATINUM]}))
    await apply_plan_file(store, str(path))
    await admin_edit(store, lambda d: policy_edit.assign(d, "cpaas-demo", "", "platinum"))
    path.write_text(yaml.safe_dump(data))  # the file drops the plan the runtime assigned
    with pytest.raises(PolicyError, match="--plans-mode replace"):
        await apply_plan_file(store, str(path))
    assert await store.policy_version() == 2


async def test_publishing_never_touches_grants_counters_or_ledgers(
    store: RedisStore, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    path = write_plans(tmp_path / "plans.yaml")
    await apply_plan_file(store, str(path))
    engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
    await engine.reload_policy()
    for i in range(3):
        v = await engine.check(
            Usage(f"r{i}", Subject("cpaas-demo", "", "k1"), "api.sms.send", 2, Mode.ADMIT)
        )
        assert (v.decision, v.reason) == (Decision.ALLOW, Reason.OK)
    subject = Subject("cpaas-demo", "", "")
    quota = next(
        lim
        for _, lim in engine.policy.entitlements["cpaas-demo"].limits
        if lim.name == "voice-daily"
    )
    granted = await AdminStore(store).grant(subject, quota, 500, 0, "ticket-1")
    assert granted is not None

    def snapshot() -> dict[str, bytes]:
        binary = redis.Redis.from_url(redis_server.url)
        try:
            # everything but the policy, the version stamps, and rate buckets (they refill,
            # and vanish when full, as time passes)
            names = [
                k
                for k in raw_redis.keys("cp:*")
                if k != POLICY_KEY and not k.endswith(":ent") and ":r:" not in k
            ]
            return {k: binary.dump(k) for k in sorted(names)}  # type: ignore[misc]
        finally:
            binary.close()

    before = snapshot()
    kinds = {k.split(":")[2] for k in before}
    assert {"g", "q", "ledger", "d", "gnotes"} <= kinds, kinds
    write_plans(path, extra_plan=True)
    await apply_plan_file(store, str(path))
    await apply_plan_file(store, str(path), "replace")
    await store.publish_policy(PolicyDocument(), force=True)
    assert snapshot() == before
