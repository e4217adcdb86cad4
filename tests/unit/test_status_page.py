"""The status page's pure parts: session tokens, request heads, decision rates, views."""

from __future__ import annotations

import pytest

from chargepath.core.auth import Principal, Role
from chargepath.core.model import Decision
from chargepath.status.board import Rates, RateWindow, Snapshot, TenantFigures
from chargepath.status.http import BadRequest, bearer, cookie, parse_head
from chargepath.status.session import SessionSigner

pytestmark = pytest.mark.unit

VIEWER = Principal("aaaaaaaaaaaa", Role.VIEWER, "t1")
OPERATOR = Principal("bbbbbbbbbbbb", Role.OPERATOR, None)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def test_a_session_token_verifies_until_it_expires() -> None:
    clock = Clock()
    signer = SessionSigner(clock, ttl_s=900)
    token = signer.issue(VIEWER)
    session = signer.verify(token)
    assert session is not None
    assert session.principal == VIEWER
    assert session.expires_ms == clock.ms + 900_000
    clock.ms += 899_999
    assert signer.verify(token) is not None
    clock.ms += 1
    assert signer.verify(token) is None


def test_a_token_changed_or_signed_elsewhere_is_no_session() -> None:
    clock = Clock()
    signer = SessionSigner(clock)
    token = signer.issue(VIEWER)
    payload, mac = token.split(".")
    other = SessionSigner(clock).issue(OPERATOR)
    forged_payload = other.split(".")[0]  # an operator's payload with the viewer's mac
    for bad in (
        f"{forged_payload}.{mac}",
        f"{payload}.{mac[:-2]}AA",
        payload,
        "",
        "." * 3,
        "x" * 600,
        other,  # a valid token of another process's secret
    ):
        assert signer.verify(bad) is None, bad


def test_parse_head_reads_the_request_line_query_and_headers() -> None:
    head = (
        b"GET /events?tenant=t1 HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\n"
        b"cookie: cp_status=tok\r\nAuthorization: Bearer k\r\n\r\n"
    )
    request = parse_head(head, 10)
    assert (request.method, request.path, dict(request.query)) == (
        "GET",
        "/events",
        {"tenant": "t1"},
    )
    assert cookie(request.headers, "cp_status") == "tok"
    assert cookie(request.headers, "a") == "1"
    assert bearer(request.headers) == "k"
    assert bearer({"authorization": "Basic abc"}) == ""
    assert bearer({}) is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: 1\r\nA: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /?a=1&b=2&c=3&d=4&e=5 HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_parse_head_refuses_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_head(head, 10)
    assert refused.value.status == status


def test_rates_are_the_counters_differences_per_second() -> None:
    window = RateWindow()
    first = {("t1", Decision.ALLOW, False): 10, ("t1", Decision.THROTTLE, False): 5}
    assert window.advance(100.0, first) == (None, 0.0)
    later = {
        ("t1", Decision.ALLOW, False): 30,
        ("t1", Decision.THROTTLE, False): 25,
        ("t1", Decision.DENY, True): 4,
        ("t2", Decision.ALLOW, False): 2,
    }
    rates, seconds = window.advance(102.0, later)
    assert seconds == 2.0
    assert rates is not None
    assert rates["t1"] == Rates(decisions=22.0, throttled=10.0, denied=2.0, degraded=2.0)
    assert rates["t2"] == Rates(decisions=1.0)
    assert rates["t1"].to_json()["throttle_share"] == round(10 / 22, 4)


def _snapshot() -> Snapshot:
    figures = {
        t: TenantFigures(t, "p", "deny", True, (), ((("", "k1", "why"),) if t == "t1" else ()), 0)
        for t in ("t1", "t2")
    }
    return Snapshot(
        seq=3,
        read_at_ms=0,
        health="SERVING",
        policy_version=7,
        store_reachable=True,
        store_ping_ms=0.2,
        breaker="closed",
        spool_depth=None,
        tenant_names=frozenset({"t1", "t2", "t3"}),
        tenants=figures,
        rates={"t1": Rates(10, 5), "t2": Rates(4), "": Rates(1)},
        window_s=1.0,
        worker=0,
        workers=1,
        refresh_s=1.0,
    )


def test_a_viewer_sees_its_tenant_and_its_own_rates_only() -> None:
    view = _snapshot().view(VIEWER)
    assert [t["tenant"] for t in view["tenants"]] == ["t1"]
    assert view["decisions"]["decisions_per_s"] == 10
    assert view["tenants_total"] == 1
    # asking for another tenant changes nothing for a viewer (the server refuses it first)
    assert [t["tenant"] for t in _snapshot().view(VIEWER, "t2")["tenants"]] == ["t1"]


def test_an_operator_sees_every_tenant_and_every_decision() -> None:
    snapshot = _snapshot()
    view = snapshot.view(OPERATOR)
    assert [t["tenant"] for t in view["tenants"]] == ["t1", "t2"]
    assert view["tenants_total"] == 3
    assert view["decisions"]["decisions_per_s"] == 15  # "" (no tenant) included
    only = snapshot.view(OPERATOR, "t2")
    assert [t["tenant"] for t in only["tenants"]] == ["t2"]
    assert only["decisions"]["decisions_per_s"] == 4
    assert snapshot.covers("t1") and snapshot.covers("nope") and not snapshot.covers("t3")
