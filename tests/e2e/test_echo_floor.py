"""``python -m loadtest.echo --redis-url``: the echo ceiling plus one Redis round trip per call
or stream message, the floor of any gateway of this stack that consults Redis once per call.
Against the session's real redis-server; counts, no timing."""

from __future__ import annotations

import grpc
import pytest
import redis

from chargepath.store.embedded import EmbeddedRedis
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from loadtest import processes

pytestmark = pytest.mark.e2e


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_every_call_and_every_message_makes_one_round_trip(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    raw_redis.config_resetstat()
    usage = pb.Usage(
        request_id="r-1",
        subject=pb.Subject(tenant="cpaas-demo", key="k1"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    with (
        processes.echo_server(redis_server.url) as (address, _),
        grpc.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.MeteringServiceStub(channel)
        for i in range(3):
            usage.request_id = f"r-{i}"
            verdict = stub.Check(pb.CheckRequest(usage=usage), timeout=10).verdict
            assert verdict.request_id == f"r-{i}" and verdict.decision == pb.DECISION_ALLOW
        messages = [pb.StreamUsageRequest(usages=[usage] * 5) for _ in range(2)]
        answers = list(stub.StreamUsage(iter(messages), timeout=10))
    assert [len(a.verdicts) for a in answers] == [5, 5]
    assert evalsha_calls(raw_redis) == 3 + 2
