"""A lease holder process for the lease tests: ``python -m tests.e2e.lease_holder CONFIG.json``.

It runs ``holders`` holders on raw LeaseService stubs (not the client's ``lease()``), each of
which opens a lease and spends its units locally at ``rate`` units a second (far more than the
bucket refills), reports what it spent and asks for more once ``available`` falls to
``renew_below``, waits ``retry_after`` when refused, and at the end (``seconds``) reports the
rest and releases. It writes what each holder spent, reported and saw to ``out`` (JSON).

With ``hold_forever``, each holder opens its lease, reports ``report_then_hold`` units, writes
``out`` and then waits to be killed (the SIGKILL test)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import lease_pb2_grpc as lpb_grpc
from chargepath_protos.v1 import metering_pb2 as pb

TICK_S = 0.005


class Holder:
    def __init__(self, stub: Any, cfg: dict[str, Any], name: str, metadata: Any) -> None:
        self.stub = stub
        self.cfg = cfg
        self.name = name
        self.metadata = metadata
        self.subject = pb.Subject(tenant=cfg["tenant"], slice=cfg.get("slice", ""))
        self.lease_id = ""
        self.available = 0
        self.renew_below = 0
        self.unreported = 0
        self.spent = 0
        self.reported = 0
        self.recorded = 0
        self.overage = 0
        self.granted = 0
        self.asks = 0
        self.refused = 0
        self.unavailable = 0
        #: the lease's expiry on this process's clock: no unit is spent after it
        self.valid_until = 0.0
        self.request_ids: list[str] = []
        self.decided_at: list[int] = []

    async def ask(self, *, requested: int, release: bool = False) -> Any:
        rid = f"{self.name}-{uuid.uuid4().hex}"
        self.request_ids.append(rid)
        req = lpb.LeaseRequest(
            ask=lpb.LeaseAsk(
                request_id=rid,
                subject=self.subject,
                metric=self.cfg["metric"],
                lease_id=self.lease_id,
                requested=requested,
                used=self.unreported,
                release=release,
                holder=self.name,
            )
        )
        used = self.unreported
        sent = time.monotonic()  # the expiry counts from before the ask: never late
        # a transport failure or a store outage: resend the same request id (applied once)
        while True:
            try:
                a = (await self.stub.Lease(req, metadata=self.metadata, timeout=10)).answer
            except grpc.aio.AioRpcError as err:
                if err.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                await asyncio.sleep(0.05)
                continue
            self.asks += 1
            if a.reason != pb.REASON_STORE_UNAVAILABLE:
                break
            self.unavailable += 1
            await asyncio.sleep(0.05)
        self.decided_at.append(a.decided_at.seconds * 1000 + a.decided_at.nanos // 1_000_000)
        self.unreported -= used
        self.reported += used
        self.recorded += a.recorded
        self.overage += a.overage
        self.granted += a.granted
        if a.closed or (not self.lease_id and not a.lease_id):
            self.lease_id, self.available = "", 0
        else:
            self.lease_id = a.lease_id
            self.available = a.available
            self.renew_below = a.renew_below
            valid_for = a.valid_for.seconds + a.valid_for.nanos / 1e9
            self.valid_until = sent + valid_for
        if a.granted == 0 and not release:
            self.refused += 1
        return a

    async def run(self) -> None:
        cfg = self.cfg
        want = cfg["want"]
        end = time.monotonic() + cfg["seconds"]
        per_tick = max(1, int(cfg["rate"] * TICK_S))
        while time.monotonic() < end:
            if self.available <= self.renew_below:
                a = await self.ask(requested=want)
                if self.available == 0 and a.granted == 0:
                    wait = a.retry_after.seconds + a.retry_after.nanos / 1e9
                    await asyncio.sleep(min(max(wait, TICK_S), 0.2))
                    continue
            if time.monotonic() >= self.valid_until - 0.05:
                self.available = 0  # expired (or about to): its units go back, not spent
                continue
            n = min(per_tick, self.available)  # never spend past the grant
            self.available -= n
            self.unreported += n
            self.spent += n
            await asyncio.sleep(TICK_S)
        if self.lease_id:
            await self.ask(requested=0, release=True)
        assert self.unreported == 0, "a closed lease left use unreported"

    async def hold(self) -> None:
        await self.ask(requested=self.cfg["want"])
        n = self.cfg["report_then_hold"]
        self.available -= n
        self.unreported += n
        self.spent += n
        await self.ask(requested=0)

    def result(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spent": self.spent,
            "reported": self.reported,
            "recorded": self.recorded,
            "overage": self.overage,
            "granted": self.granted,
            "asks": self.asks,
            "refused": self.refused,
            "unavailable": self.unavailable,
            "request_ids": self.request_ids,
            "decided_at": self.decided_at,
            "lease_id": self.lease_id,
        }


async def main(cfg: dict[str, Any]) -> None:
    metadata = (("authorization", f"Bearer {cfg['key']}"),)
    async with grpc.aio.insecure_channel(cfg["address"]) as channel:
        stub = lpb_grpc.LeaseServiceStub(channel)
        holders = [Holder(stub, cfg, f"{cfg['name']}-{i}", metadata) for i in range(cfg["holders"])]
        if cfg.get("hold_forever"):
            await asyncio.gather(*(h.hold() for h in holders))
            write_results(cfg["out"], holders)
            await asyncio.Event().wait()
        await asyncio.gather(*(h.run() for h in holders))
    write_results(cfg["out"], holders)


def write_results(path: str, holders: list[Holder]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps([h.result() for h in holders]))
    tmp.replace(path)  # whole, or not there: the tests poll for it


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
