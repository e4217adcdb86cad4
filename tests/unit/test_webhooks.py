"""Webhooks without I/O: the plan file's section, signatures checked by the example receiver,
the retry schedule, event ids and the degraded-mode notice."""

from __future__ import annotations

import json

import pytest

from chargepath.core.plans import PolicyError, load_policy_text
from chargepath.core.webhooks import (
    DEGRADED,
    QUOTA_80,
    QUOTA_100,
    DegradedNotice,
    Endpoint,
    RetrySchedule,
    WebhookEvent,
    signature_header,
    suspension_event,
    threshold_event,
)
from tests.webhook_receiver import example_receiver

pytestmark = pytest.mark.unit

BASE = """\
metrics:
  - {name: api.sms.send}
plans:
  - name: p
    limits:
      - {name: q, metric: api.sms.send, quota: {amount: 10, per: day}}
tenants:
  - {name: acme, plan: p}
  - {name: other, plan: p}
"""

HOOK = """\
webhooks:
  - name: ops
    url: https://hooks.example.com/chargepath?x=1
    events: [quota.80, quota.100, suspension, degraded]
    tenants: [acme]
    secret_env: HOOK_SECRET
"""


def test_a_webhook_section_parses_into_endpoints() -> None:
    doc = load_policy_text(BASE + HOOK)
    (endpoint,) = [Endpoint.of(w) for w in doc.webhooks]
    assert endpoint.url == "https://hooks.example.com/chargepath?x=1"
    assert endpoint.secret_env == "HOOK_SECRET" and endpoint.secret_file is None
    acme = WebhookEvent("e1", QUOTA_80, "acme", 0)
    assert endpoint.wants(acme)
    assert not endpoint.wants(WebhookEvent("e2", QUOTA_80, "other", 0))
    # a process's event has no tenant: every subscribed endpoint gets it
    assert endpoint.wants(WebhookEvent("e3", DEGRADED, "", 0))
    assert endpoint.wants_tenant("acme", (QUOTA_80,))
    assert not endpoint.wants_tenant("other", (QUOTA_80,))


def test_a_document_without_webhooks_keeps_its_digest() -> None:
    doc = load_policy_text(BASE)
    assert "webhooks" not in json.loads(doc.canonical_json())
    assert load_policy_text(BASE + "webhooks: []\n").digest() == doc.digest()
    assert load_policy_text(BASE + HOOK).digest() != doc.digest()


@pytest.mark.parametrize(
    ("hook", "line", "path", "message"),
    [
        (
            "    secret: hunter2\n",
            15,
            "webhooks.0.secret",
            "the signing secret may not be written in the policy",
        ),
        ("    secret_file: /etc/hook\n", 11, "webhooks.0", "exactly one of 'secret_env'"),
        ("    events: [quota.50]\n", 14, "webhooks.0.events.0", "Input should be"),
        ("    url: ftp://x\n", 14, "webhooks.0.url", "must be an http:// or https:// URL"),
        ("    url: https://u:p@x\n", 14, "webhooks.0.url", "must not carry credentials"),
        ("    tenants: [nobody]\n", 15, "webhooks.0.tenants.0", "unknown tenant 'nobody'"),
        ("    tenants: ['a b']\n", 15, "webhooks.0.tenants", "'a b' must be 1 to 64"),
        ("    secret_env: 'not a name'\n", 14, "webhooks.0.secret_env", "String should match"),
    ],
)
def test_bad_webhooks_are_refused_with_their_line(
    hook: str, line: int, path: str, message: str
) -> None:
    base_hook = {
        "url": "    url: http://127.0.0.1:9/h\n",
        "events": "    events: [quota.80]\n",
        "secret_env": "    secret_env: HOOK_SECRET\n",
    }
    key = hook.strip().split(":")[0]
    fields = [v for k, v in base_hook.items() if k != key]
    text = BASE + "webhooks:\n  - name: ops\n" + "".join(fields) + hook
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, source="plans.yaml")
    (issue,) = err.value.issues
    assert issue.path == path, issue
    assert issue.message.startswith(message) or message in issue.message, issue
    assert issue.line == line, str(issue)
    assert "hunter2" not in str(err.value)


def test_signatures_verify_with_the_example_receiver() -> None:
    example = example_receiver()
    verify, SignatureError = example.verify, example.SignatureError
    body = WebhookEvent("evt_1", QUOTA_100, "acme", 1_700_000_000_000, {"used": 10}).body()
    header = signature_header(b"s3cret", 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify(b"s3cret", header, body, now=1_700_000_100) == 1_700_000_000
    with pytest.raises(SignatureError, match="does not match"):
        verify(b"wrong", header, body, now=1_700_000_100)
    with pytest.raises(SignatureError, match="does not match"):
        verify(b"s3cret", header, body.replace(b"10", b"11"), now=1_700_000_100)
    # a captured delivery replayed later than the tolerance
    with pytest.raises(SignatureError, match="replayed"):
        verify(b"s3cret", header, body, now=1_700_000_000 + 301)
    with pytest.raises(SignatureError, match="no Chargepath-Signature"):
        verify(b"s3cret", None, body)
    # during a rotation the header may carry several v1 values: any one may match
    rotated = f"{header},v1={'0' * 64}"
    assert verify(b"s3cret", rotated, body, now=1_700_000_000)


def test_the_retry_schedule_doubles_with_jitter_up_to_its_cap() -> None:
    s = RetrySchedule(base_s=1.0, max_s=30.0, max_attempts=5)
    assert s.wait_s(1, lambda: 0.0) == 0.5 and s.wait_s(1, lambda: 1.0) == 1.0
    assert s.wait_s(4, lambda: 0.0) == 4.0 and s.wait_s(4, lambda: 1.0) == 8.0
    assert s.wait_s(10, lambda: 1.0) == 30.0 and s.wait_s(10, lambda: 0.0) == 15.0


def test_event_ids_come_from_the_source() -> None:
    fields = {"l": "q", "sl": "", "k": "", "pc": "80", "u": "8", "c": "10", "ts": "1000"}
    a = threshold_event("acme", "1000-0", fields)
    assert a == threshold_event("acme", "1000-0", dict(fields))
    assert a.type == QUOTA_80 and a.data["used"] == 8 and a.occurred_at_ms == 1000
    full = threshold_event("acme", "1000-0", {**fields, "pc": "100"})
    assert full.type == QUOTA_100 and full.id != a.id
    assert threshold_event("acme", "1000-1", fields).id != a.id
    assert threshold_event("other", "1000-0", fields).id != a.id
    s = suspension_event(
        "5-0", {"t": "acme", "sl": "", "k": "", "s": "1", "r": "r", "v": "3", "ts": "5"}
    )
    assert s.data == {"slice": "", "key": "", "suspended": True, "reason": "r", "policy_version": 3}
    assert s.id.startswith("evt_") and s.id != a.id


def test_degraded_events_are_rate_limited_per_process() -> None:
    n = DegradedNotice("host:1:0", interval_s=60)
    assert n.flip(True, 0, 0) is None  # the start-up status is not a change
    entered = n.flip(False, 1, 1_000)
    assert entered is not None and entered.data == {
        "degraded": True,
        "process": "host:1:0",
        "suppressed": 0,
    }
    left = n.flip(True, 3, 3_000)
    assert left is not None and left.data["degraded"] is False
    assert left.data["degraded_ms"] == 2_000 and left.id != entered.id
    # a flap inside the interval: neither its start nor its end is sent
    assert n.flip(False, 10, 10_000) is None
    assert n.flip(True, 11, 11_000) is None
    assert n.flip(False, 20, 20_000) is None
    assert n.flip(True, 21, 21_000) is None
    again = n.flip(False, 62, 62_000)
    assert again is not None and again.data["suppressed"] == 2
    assert n.flip(False, 63, 63_000) is None  # no change
    assert n.flip(True, 64, 64_000) is not None
    # ids are stable for a process and a sequence: a retry carries the same one
    m = DegradedNotice("host:1:0", interval_s=60)
    m.flip(True, 0, 0)
    replay = m.flip(False, 1, 1_000)
    assert replay is not None and replay.id == entered.id
