"""The status page (``--http-port``) of a live gateway: who may see it, and headless Chromium
reading it under load.

The browser test logs in through the page's form, checks that the page shows the figures
Redis holds (each quota's use equals what ``GetState`` says), sees the page change over
server-sent events without a reload, and inspects a screenshot. With
``CHARGEPATH_STATUS_SCREENSHOT=docs/status-page.png`` it also writes the screenshot there
(README's picture).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chargepath.store.embedded import free_port
from chargepath_client import Client
from chargepath_protos.v1 import admin_pb2, admin_pb2_grpc, keys_pb2, keys_pb2_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from tests.browser import Chromium, Tab, chromium_binary
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

CPAAS = "cpaas-demo"
MVNO = "mvno-demo"
SMS = "api.sms.send"
BYTES = "slice.bytes"
EMBB = "1-000001"
URLLC = "1-000002"
WIDTH, HEIGHT = 1280, 900


@dataclass
class StatusPage:
    gateway: GatewayProcess
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            got = {k.lower(): v for k, v in response.getheaders()}
            return response.status, got, response.read()
        finally:
            conn.close()

    def get(self, path: str, *, key: str | None = None, cookie: str | None = None) -> Any:
        headers = {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if cookie is not None:
            headers["Cookie"] = f"cp_status={cookie}"
        return self.request("GET", path, headers=headers)

    def login(self, key: str, **extra: str) -> tuple[int, dict[str, str], bytes]:
        body = urllib.parse.urlencode({"key": key}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **extra}
        return self.request("POST", "/login", headers=headers, body=body)

    def session(self, key: str) -> str:
        status, headers, _ = self.login(key)
        assert status == 303, status
        return headers["set-cookie"].split(";")[0].removeprefix("cp_status=")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StatusPage]:
    port = free_port()
    gw = start_gateway(tmp_path_factory.mktemp("status"), extra_args=("--http-port", str(port)))
    yield StatusPage(gw, port)
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def create_key(gw: GatewayProcess, tenant: str, role: int) -> tuple[str, str]:
    """(key id, the key) of a new key."""
    with gw.channel() as ch:
        made = keys_pb2_grpc.KeyServiceStub(ch).CreateKey(
            keys_pb2.CreateKeyRequest(tenant=tenant, role=role)
        )
    return made.key.key_id, made.secret_key


def revoke(gw: GatewayProcess, key_id: str) -> None:
    with gw.channel() as ch:
        keys_pb2_grpc.KeyServiceStub(ch).RevokeKey(keys_pb2.RevokeKeyRequest(key_id=key_id))


def get_state(gw: GatewayProcess, tenant: str, slice_: str = "") -> admin_pb2.GetStateResponse:
    with gw.channel() as ch:
        state: admin_pb2.GetStateResponse = admin_pb2_grpc.AdminServiceStub(ch).GetState(
            admin_pb2.GetStateRequest(subject=pb.Subject(tenant=tenant, slice=slice_))
        )
    return state


def suspend(gw: GatewayProcess, reason: str, tenant: str, slice_: str = "", key: str = "") -> None:
    with gw.channel() as ch:
        admin_pb2_grpc.AdminServiceStub(ch).Suspend(
            admin_pb2.SuspendRequest(
                subject=pb.Subject(tenant=tenant, slice=slice_, key=key), reason=reason
            )
        )


def used(state: admin_pb2.GetStateResponse, limit: str) -> int:
    return next(int(lim.used) for lim in state.limits if lim.name == limit)


# -- who may see it --------------------------------------------------------------------------


def test_a_caller_without_a_credential_gets_the_login_form(page: StatusPage) -> None:
    status, headers, body = page.get("/")
    assert status == 401
    assert b'name="key"' in body and b'action="/login"' in body
    assert "default-src 'none'" in headers["content-security-policy"]
    for path in ("/events", "/status.json"):
        status, _, body = page.get(path)
        assert status == 401, path
        assert "log in" in json.loads(body)["error"]
    # a key in the URL is no credential
    assert page.get(f"/?key={page.gateway.operator_key}")[0] == 401
    assert page.get(f"/status.json?key={page.gateway.operator_key}")[0] == 401


def test_wrong_and_malformed_keys_are_refused(page: StatusPage) -> None:
    forged = "cpk_" + "a" * 12 + "_" + "A" * 43
    for key in (forged, "not-a-key", page.gateway.operator_key[:-1] + "x"):
        assert page.get("/status.json", key=key)[0] == 401, key
        status, headers, body = page.login(key)
        assert status == 401, key
        assert "set-cookie" not in headers
        assert b'name="key"' in body
    status, _, _ = page.get("/status.json", cookie="forged.session")
    assert status == 401


def test_a_meter_key_is_forbidden(page: StatusPage) -> None:
    _, meter = create_key(page.gateway, CPAAS, keys_pb2.ROLE_METER)
    status, _, body = page.get("/status.json", key=meter)
    assert status == 403
    assert "meter key" in json.loads(body)["error"]
    status, headers, body = page.login(meter)
    assert status == 403
    assert "set-cookie" not in headers
    assert b"meter key cannot read the status page" in body


def test_a_viewer_sees_its_own_tenant_only(page: StatusPage) -> None:
    _, viewer = create_key(page.gateway, MVNO, keys_pb2.ROLE_VIEWER)
    status, headers, _ = page.login(viewer)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    attributes = {a.strip().split("=")[0] for a in cookie.split(";")[1:]}
    assert {"HttpOnly", "SameSite", "Path", "Max-Age"} <= attributes
    assert "SameSite=Strict" in cookie
    session = cookie.split(";")[0].removeprefix("cp_status=")
    assert viewer.split("_")[-1] not in session  # the secret is never in the cookie
    assert page.get("/", cookie=session)[0] == 200
    for credential in ({"cookie": session}, {"key": viewer}):
        status, _, body = page.get("/status.json", **credential)
        assert status == 200
        snapshot = json.loads(body)
        assert [t["tenant"] for t in snapshot["tenants"]] == [MVNO]
        assert snapshot["viewer"]["role"] == "viewer"
        assert page.get(f"/status.json?tenant={CPAAS}", **credential)[0] == 403
        assert page.get(f"/events?tenant={CPAAS}", **credential)[0] == 403
        assert page.get(f"/?tenant={CPAAS}", **credential)[0] == 403
        assert page.get(f"/status.json?tenant={MVNO}", **credential)[0] == 200


def test_an_operator_sees_every_tenant(page: StatusPage) -> None:
    status, _, body = page.get("/status.json", key=page.gateway.operator_key)
    assert status == 200
    snapshot = json.loads(body)
    assert sorted(t["tenant"] for t in snapshot["tenants"]) == [CPAAS, MVNO]
    assert snapshot["health"] == "SERVING"
    assert snapshot["store"]["reachable"] is True
    _, _, body = page.get(f"/status.json?tenant={CPAAS}", key=page.gateway.operator_key)
    assert [t["tenant"] for t in json.loads(body)["tenants"]] == [CPAAS]


def test_a_login_from_another_site_is_refused(page: StatusPage) -> None:
    status, headers, _ = page.login(page.gateway.operator_key, Origin="http://evil.example")
    assert status == 403
    assert "set-cookie" not in headers


def test_revoking_a_key_ends_its_sessions(page: StatusPage) -> None:
    key_id, viewer = create_key(page.gateway, CPAAS, keys_pb2.ROLE_VIEWER)
    session = page.session(viewer)
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=15)
    conn.request("GET", "/events", headers={"Cookie": f"cp_status={session}"})
    stream = conn.getresponse()
    assert stream.status == 200
    assert stream.getheader("Content-Type") == "text/event-stream"
    assert b"event: status" in _read_event(stream)
    revoke(page.gateway, key_id)
    deadline = time.monotonic() + 10
    while True:
        event = _read_event(stream)
        if event.startswith(b"event: end"):
            assert b"revoked" in event
            break
        assert time.monotonic() < deadline, "the stream of a revoked key went on"
    conn.close()
    assert page.get("/", cookie=session)[0] == 401
    assert page.get("/status.json", key=viewer)[0] == 401
    assert page.login(viewer)[0] == 401


def _read_event(stream: http.client.HTTPResponse) -> bytes:
    """The next server-sent event (``retry:`` and comment lines skipped)."""
    lines: list[bytes] = []
    while True:
        line = stream.readline()
        assert line, "the stream ended"
        if line == b"\n":
            if lines and not lines[0].startswith((b"retry:", b":")):
                return b"".join(lines)
            lines = []
            continue
        lines.append(line)


# -- in a browser, under load ----------------------------------------------------------------


class Load:
    """Admits on cpaas-demo (one API key, faster than its 10/s bucket: many THROTTLEs) and
    byte reports on an mvno-demo slice, from a thread, until stopped."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.stop = threading.Event()
        self.verdicts = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="status-load", daemon=True)

    def _run(self) -> None:
        try:
            with Client(self.gw.address, api_key=self.gw.operator_key) as client:
                while not self.stop.is_set():
                    client.check(CPAAS, SMS, 1, key="load-key")
                    client.report(MVNO, BYTES, 1_000_000, slice=EMBB)
                    self.verdicts += 2
                    time.sleep(0.02)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _figure(tab: Tab, tenant: str, limit: str, slice_: str = "") -> int | None:
    value = tab.evaluate(
        f"(() => {{ const c = document.querySelector('[data-tenant={json.dumps(tenant)}] "
        f"tr[data-limit={json.dumps(limit)}][data-slice={json.dumps(slice_)}] "
        "[data-field=used]'); return c ? c.dataset.value : null; })()"
    )
    return None if value is None else int(value)


def _updates(tab: Tab) -> int:
    return int(tab.evaluate("document.getElementById('updates').dataset.value"))


def test_chromium_shows_the_figures_redis_holds_and_updates_live(
    page: StatusPage, tmp_path: Path
) -> None:
    if chromium_binary() is None:
        pytest.fail("no chromium on PATH: run 'make chromium' (Debian's package)")
    gw = page.gateway
    suspend(gw, "fraud review", CPAAS, key="stolen-key")
    with Load(gw) as load, Chromium(tmp_path / "profile", width=WIDTH, height=HEIGHT) as browser:
        tab = Tab(browser, width=WIDTH, height=HEIGHT)
        tab.navigate(page.base + "/")
        assert tab.evaluate("document.title") == "Chargepath status: log in"
        tab.submit(
            f"document.getElementById('key').value = {json.dumps(gw.operator_key)};"
            "document.querySelector('form').submit()"
        )
        assert tab.evaluate("document.title") == "Chargepath status"
        tab.wait_until("Number(document.getElementById('updates').dataset.value) >= 1")
        tab.evaluate("window.sameDocument = true")

        # under load: the throttle rate of the tenant being throttled shows up (its rate is
        # this worker's counters over the last refresh)
        tab.wait_until(
            f"Number(document.querySelector('[data-tenant={json.dumps(CPAAS)}] "
            "[data-field=throttle]').dataset.value || 0) > 0"
        )
        # live: new events move the figures, in the same document (no reload)
        first, first_bytes = _updates(tab), _figure(tab, MVNO, "tenant-bytes-monthly")
        assert first_bytes is not None
        deadline = time.monotonic() + 20
        while (
            _updates(tab) < first + 2 or _figure(tab, MVNO, "tenant-bytes-monthly") == first_bytes
        ):
            assert time.monotonic() < deadline, "no live update over the event stream"
            time.sleep(0.2)
        # a suspension made now appears without a reload
        suspend(gw, "maintenance", MVNO, slice_=URLLC)
        tab.wait_until(
            f"document.querySelector('[data-tenant={json.dumps(MVNO)}] "
            "[data-field=suspensions]').textContent.includes('slice 1-000002 (maintenance)')"
        )
        assert tab.evaluate("window.sameDocument") is True
        version = get_state(gw, CPAAS).policy_version
        tab.wait_until(f"document.getElementById('policy-version').dataset.value === '{version}'")
        png = tab.screenshot()  # under load
        dom = tab.dom()
        load.stop.set()
        load.thread.join(10)
        assert not load.errors, load.errors
        assert load.verdicts > 50

        # the load stopped: within a refresh or two, every quota on the page is GetState's
        expected: dict[tuple[str, str, str], int] = {}
        deadline = time.monotonic() + 15
        while True:
            cpaas, mvno, embb = get_state(gw, CPAAS), get_state(gw, MVNO), get_state(gw, MVNO, EMBB)
            expected = {
                (CPAAS, "sms-monthly", ""): used(cpaas, "sms-monthly"),
                (CPAAS, "voice-daily", ""): used(cpaas, "voice-daily"),
                (MVNO, "tenant-bytes-monthly", ""): used(mvno, "tenant-bytes-monthly"),
                (MVNO, "slice-bytes-monthly", EMBB): used(embb, "slice-bytes-monthly"),
            }
            shown = {k: _figure(tab, *k) for k in expected}
            if shown == expected:
                break
            assert time.monotonic() < deadline, (shown, expected)
            time.sleep(0.3)
        assert expected[(CPAAS, "sms-monthly", "")] > 0
        assert expected[(MVNO, "tenant-bytes-monthly", "")] >= 25 * 1_000_000
        urls = tab.requested_urls()

    # what the page loaded: its own URLs only (the document, the login post, the events)
    assert urls, "the browser made no request"
    assert all(u.startswith(page.base + "/") or u == "about:blank" for u in urls), urls
    assert page.base + "/events" in urls

    # the DOM (what --dump-dom prints) has the figures' words
    for text in (
        "SERVING",
        f"v{version}",
        CPAAS,
        MVNO,
        "sms-monthly",
        "tenant-bytes-monthly",
        "suspended: key stolen-key (fraud review)",
        "slice 1-000002 (maintenance)",
        "throttled",
        "operator key",
    ):
        assert text in dom, text

    # the screenshot: a PNG of the viewport's size, with more than a blank page in it
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(png) > 20_000
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    assert pixels[:40].mean() < 0.3  # the dark header bar
    assert pixels.std() > 0.1  # not one colour
    target = os.environ.get("CHARGEPATH_STATUS_SCREENSHOT")
    (tmp_path / "status-page.png").write_bytes(png)
    if target:
        shutil.copyfile(tmp_path / "status-page.png", target)


def test_with_workers_one_process_serves_the_page(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = free_port()
    gw = start_gateway(
        tmp_path_factory.mktemp("status-workers"),
        workers=2,
        extra_args=("--http-port", str(port)),
        ready_line="status page on http://",
    )
    try:
        status = StatusPage(gw, port)
        for _ in range(3):  # new connections: the same process answers every time
            code, _, body = status.get("/status.json", key=gw.operator_key)
            assert code == 200
            snapshot = json.loads(body)
            assert (snapshot["worker"], snapshot["workers"]) == (0, 2)
        assert gw.log().count("status page on http://") == 1
    finally:
        code = gw.stop()
        if gw.redis is not None:
            gw.redis.stop()
    assert code == 0, gw.log()
