"""``chargepath ledger summary`` after a mixed run against a live gateway: its totals per
subject and metric equal the amounts of the verdicts the client got answered ``recorded``
(each request id once), over admits that ALLOW, THROTTLE and DENY, reports into debt and past a
quota, a stream of batches with a session, and retries of the same request ids. The ledger
commands find the embedded Redis (and its password) in the gateway's data dir; a caller
without that credential is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

PLANS = """
metrics:
  - {name: api.sms.send, unit: message}
  - {name: api.voice.minutes, unit: minute}
  - {name: slice.bytes, unit: byte}
plans:
  - name: cpaas
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: 6, refill: 1, per: hour}}
      - {name: sms-daily, metric: api.sms.send, scope: tenant, quota: {amount: 10, per: day}}
      - {name: voice-monthly, metric: api.voice.minutes, scope: tenant,
         quota: {amount: 50, per: month}, soft: true}
  - name: mvno
    limits:
      - {name: bytes-rate, metric: slice.bytes, scope: slice,
         rate: {capacity: 5000, refill: 1, per: hour}}
      - {name: bytes-daily, metric: slice.bytes, scope: tenant, quota: {amount: 9000, per: day}}
tenants:
  - {name: shop, plan: cpaas}
  - {name: mvno, plan: mvno}
"""

Subject = tuple[str, str, str, str]  # tenant, slice, key, metric


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("summary")
    plans = work / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(work, plans=plans, embedded=True)
    yield gw
    assert gw.stop() == 0, gw.log()


def ledger_cli(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPATH_")}
    if data_dir is not None:
        env["CHARGEPATH_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "chargepath", "ledger", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def usage(
    rid: str,
    tenant: str,
    metric: str,
    amount: int,
    *,
    slice_: str = "",
    key: str = "",
    report: bool = False,
    session: str = "",
    sequence: int = 0,
) -> pb.Usage:
    return pb.Usage(
        request_id=rid,
        subject=pb.Subject(tenant=tenant, slice=slice_, key=key),
        metric=metric,
        amount=amount,
        mode=pb.MODE_REPORT if report else pb.MODE_ADMIT,
        session_id=session,
        sequence=sequence,
    )


def mixed_run(gw: GatewayProcess) -> list[tuple[pb.Usage, pb.Verdict]]:
    """Every usage sent and the verdict it got, in order."""
    out: list[tuple[pb.Usage, pb.Verdict]] = []
    with gw.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)

        def check(u: pb.Usage) -> None:
            out.append((u, stub.Check(pb.CheckRequest(usage=u), timeout=10).verdict))

        # admits: a per-key bucket of 6 and a daily quota of 10 for the tenant
        for i in range(5):
            check(usage(f"k1-{i}", "shop", "api.sms.send", 2, key="k1"))  # 3 allow, 2 throttle
        check(usage("k1-0", "shop", "api.sms.send", 2, key="k1"))  # a retry: replayed
        for i in range(4):
            check(usage(f"k2-{i}", "shop", "api.sms.send", 2, key="k2"))  # 2 allow, then deny
        check(usage("k2-3", "shop", "api.sms.send", 2, key="k2"))  # a retry of a deny
        # a soft quota: crossing it allows, as overage
        for i in range(4):
            check(usage(f"v-{i}", "shop", "api.voice.minutes", 20, key=f"p{i % 2}"))
        # reports: into debt (throttle), past the daily quota (deny): all recorded
        for i in range(3):
            check(usage(f"r-{i}", "mvno", "slice.bytes", 3000, slice_="s1", report=True))
        check(usage("r-1", "mvno", "slice.bytes", 3000, slice_="s1", report=True))  # retry
        # a stream of batches with a session, then the last batch resent after a reconnect
        batches = [
            [
                usage(f"st-{n}-{j}", "mvno", "slice.bytes", 100 + j, slice_=f"s{2 + j % 2}",
                      key=f"ue-{j}", report=True, session="ctl", sequence=n * 10 + j + 1)
                for j in range(5)
            ]
            for n in range(3)
        ]  # fmt: skip
        for sent in (batches, batches[-1:]):
            requests = [pb.StreamUsageRequest(usages=b) for b in sent]
            responses = list(stub.StreamUsage(iter(requests), timeout=20))
            for b, r in zip(sent, responses, strict=True):
                out.extend(zip(b, r.verdicts, strict=True))
    return out


def test_summary_equals_the_verdicts_recorded(gateway: GatewayProcess) -> None:
    run = mixed_run(gateway)
    decisions = Counter(pb.Decision.Name(v.decision) for _, v in run)
    assert decisions["DECISION_ALLOW"] and decisions["DECISION_THROTTLE"]
    assert decisions["DECISION_DENY"] and any(v.replayed for _, v in run)
    # what the client was told was recorded, each request id once
    want: Counter[Subject] = Counter()
    entries: Counter[Subject] = Counter()
    overage: Counter[Subject] = Counter()
    seen: set[str] = set()
    for u, v in run:
        if v.recorded and u.request_id not in seen:
            seen.add(u.request_id)
            s = (u.subject.tenant, u.subject.slice, u.subject.key, u.metric)
            want[s] += u.amount
            entries[s] += 1
            if v.reason in (
                pb.REASON_SOFT_LIMIT_EXCEEDED,
                pb.REASON_RATE_LIMITED,
                pb.REASON_QUOTA_EXHAUSTED,
            ):
                overage[s] += u.amount
    assert any(not v.recorded for _, v in run) and sum(overage.values()) > 0

    out = ledger_cli("summary", "--json", "--period", "hour", data_dir=gateway.data_dir)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    got: Counter[Subject] = Counter()
    got_entries: Counter[Subject] = Counter()
    got_overage: Counter[Subject] = Counter()
    units = {}
    for t in doc["totals"]:
        s = (t["tenant"], t["slice"], t["key"], t["metric"])
        got[s] += t["units"]
        got_entries[s] += t["entries"]
        got_overage[s] += t["overage"]
        units[t["metric"]] = t["unit"]
        assert t["reversals"] == 0
    assert got == want
    assert got_entries == entries
    assert got_overage == overage
    assert units == {"api.sms.send": "message", "api.voice.minutes": "minute",
                     "slice.bytes": "byte"}  # fmt: skip
    # one tenant, a range that holds the whole run, and a range that holds none of it
    shop = json.loads(
        ledger_cli("summary", "--json", "--tenant", "shop", "--since", "1h",
                   data_dir=gateway.data_dir).stdout
    )  # fmt: skip
    assert sum(t["units"] for t in shop["totals"]) == sum(
        n for s, n in want.items() if s[0] == "shop"
    )
    past = ledger_cli("summary", "--json", "--until", "1h", data_dir=gateway.data_dir)
    assert json.loads(past.stdout)["totals"] == []
    # the table shows the same totals, numbers in full
    table = ledger_cli("summary", data_dir=gateway.data_dir)
    assert table.returncode == 0, table.stderr
    for n in want.values():
        assert f"{n:,}" in table.stdout
    # export reads only: the same rows twice, and they sum to the same totals
    a = ledger_cli("export", "--tenant", "mvno", data_dir=gateway.data_dir)
    b = ledger_cli("export", "--tenant", "mvno", data_dir=gateway.data_dir)
    assert a.returncode == 0 and a.stdout == b.stdout, a.stderr
    rows = [json.loads(x) for x in a.stdout.splitlines()]
    assert sum(r["billed_amount"] for r in rows) == sum(
        n for s, n in want.items() if s[0] == "mvno"
    )


def test_a_caller_without_the_credential_is_refused(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """The ledger commands read the gateway's Redis with the password in
    ``<data-dir>/redis/url`` (mode 0600): a caller who cannot read it has no credential, and
    a URL without the password is refused by Redis."""
    url_file = gateway.data_dir / "redis" / "url"
    assert url_file.stat().st_mode & 0o777 == 0o600
    url = url_file.read_text().strip()
    nowhere = ledger_cli("summary", data_dir=tmp_path)
    assert nowhere.returncode == 2 and "no Redis URL" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1
    password = url.split("://:", 1)[1].split("@", 1)[0]
    bare = url.replace(f":{password}@", "")
    for cmd in ("summary", "export"):
        out = ledger_cli(cmd, "--tenant", "shop", "--redis-url", bare, data_dir=tmp_path)
        assert out.returncode == 1 and out.stdout == "", out.stderr
        assert "refused the credential" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and password not in out.stderr
